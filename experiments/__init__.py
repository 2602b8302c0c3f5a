"""Experiments, ablations and benchmarks: scripts run as `python experiments/NAME.py`, importable as `experiments.*`
(installed with the package by `pip install -e .`)."""
