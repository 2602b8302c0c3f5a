"""Plan a pod run from a CPU box: compile the real train step for a TPU topology and report what fits.

  python -m ediff_jax.plan --config configs/base64.py:size=tiny --topology v5e:2x2 [--out plan.json]

  chips.py     published per-chip figures (peak FLOP/s, HBM, ICI) by TPU generation
  encoders.py  T5/CLIP as shapes only (their config.json, or the paper checkpoints' published configs)
  hlo.py       collectives read from compiled HLO text: count, bytes, ring wire bytes
  compile.py   build the experiment on compile-only topology devices, compile the trainer's step, report
  __main__.py  the CLI

Needs the TPU compiler (`pip install -e .[tpu]`, libtpu); no TPU.
"""
