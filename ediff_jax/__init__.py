"""ediff-jax: eDiff-I and MultiDiffusion in JAX/Flax.

Libraries live in subpackages (``edm``, ``models``, ``text``, ``data``); the command line
entry points ``python -m ediff_jax.train`` and ``python -m ediff_jax.sample`` are thin
wrappers over them so that everything is usable from a notebook.
"""

__version__ = "0.1.0"
