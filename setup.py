"""ediff-jax: eDiff-I (expert denoisers, paint-with-words) and MultiDiffusion in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "ml-collections>=1.1,<1.2",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "transformers>=5.23,<6",  # tokenizers and configs only: the encoders are our own Flax code
    "huggingface_hub>=1",  # hub model ids for the text encoders (ediff_jax/hub.py)
    "tokenizers>=0.23,<0.24",
    "sentencepiece>=0.2.3,<0.3",
    "safetensors>=0.8,<0.9",
    "protobuf>=5",
    "google-cloud-storage>=3,<4",  # orbax lists and deletes checkpoint steps on gs:// through it
    "importlib_resources",  # tensorflow-datasets imports it without declaring it
    "numpy>=2.0,<3",
    "pillow>=11",
    "tqdm>=4.66",
    "absl-py>=2.1",
    "tensorboard>=2.21,<2.22",
    # Real photographs for the SR stages (configs/sr_photos.py) ship inside these wheels.
    "scikit-image>=0.26,<0.27",
    "scikit-learn>=1.9,<2",
    "scipy>=1.13",  # image segmentation in the alignment scorer (ediff_jax/eval)
    "matplotlib>=3.9",  # plots written by experiments/
]

EXTRAS = {
    # PyTorch (CPU) serves as the reference implementation in parity tests. pytest-xdist runs the
    # suite on both cores in CI (the tests mostly compile, and XLA compiles on one thread); filelock
    # guards the JAX compilation cache the two workers share.
    # gcp-storage-emulator (pinned: tests/gcs_emulator.py patches its handlers) and cryptography
    # (the TLS proxy's certificate) serve gs:// on 127.0.0.1 for the remote-workdir test.
    "test": ["pytest>=8", "pytest-xdist>=3.6", "filelock>=3.12", "torch==2.13.0", "nbclient>=0.10",
             "nbformat>=5.10", "ipykernel>=6", "gcp-storage-emulator==2026.7.19", "cryptography>=42"],
    # diffusers' UNet2DConditionModel (PyTorch, CPU) as the baseline of experiments/benchmarks/train_bench.py.
    "bench": ["diffusers==0.42.1", "torch==2.13.0"],
    # The XLA TPU compiler (libtpu) for `python -m ediff_jax.plan`: compiles TPU programs on a CPU-only machine.
    "tpu": ["jax[tpu]==0.10.2"],
}

setup(
    name="ediff-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    # experiments/ installs too, so its scripts import `experiments.*` without sys.path edits.
    packages=find_packages(include=["ediff_jax", "ediff_jax.*", "experiments", "experiments.*"]),
    package_data={"ediff_jax": ["assets/text/*/*", "assets/eval/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
