"""Ablations of eDiff-I and MultiDiffusion on ediff_shapes: one script per ablation, `common` shared.

Each script runs end to end (`python experiments/ablations/NAME.py --out DIR`), writes
`results.md`, `results.csv` and PNG plots, has a `--smoke` mode for the tests, and exposes
`main(argv)` so tests and notebooks can run it in-process.
"""
