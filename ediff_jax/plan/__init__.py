"""Plan a pod run from a CPU box: compile the real train step for a TPU topology and report what fits.

  python -m ediff_jax.plan --config configs/base64.py:size=tiny --topology v5e:2x2 [--out plan.json]
  python -m ediff_jax.plan --config configs/base64.py:size=tiny --topology v5e:2x2 --sweep [--sweep_batches=2,4]

  chips.py     published per-chip figures (peak FLOP/s, HBM, ICI) by TPU generation
  encoders.py  T5/CLIP as shapes only (their config.json, or the paper checkpoints' published configs)
  hlo.py       collectives read from compiled HLO text: count, bytes, ring wire bytes
  compile.py   build the experiment on compile-only topology devices, compile the trainer's step, report
  encode.py    --encode: the text-embedding cache's T5 + CLIP encoding, sharded or replicated
  sweep.py     --sweep: plan every mesh shape x remat x per-chip batch, rank what fits by predicted throughput
  __main__.py  the CLI

Needs the TPU compiler (`pip install -e .[tpu]`, libtpu); no TPU.
"""
