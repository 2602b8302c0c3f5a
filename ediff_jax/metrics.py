"""Metrics to TensorBoard and a JSON-lines file (process 0 only)."""

from __future__ import annotations

import json
import time
import os
from typing import Mapping

import jax
import numpy as np

from ediff_jax.paths import as_path, is_remote


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if not self.enabled:
            return
        self.path = as_path(workdir) / "metrics.jsonl"
        # Object stores cannot append: there the file is rewritten whole, from the lines of
        # earlier runs (a resumed workdir) and this one's.
        self._lines: list[str] | None = None
        if is_remote(self.path):
            self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        import tensorflow as tf  # deferred: only the writer process needs TF's summary ops

        tf.config.set_visible_devices([], "GPU")
        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.fspath(as_path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        line = json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n"
        if self._lines is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        with self._tb.as_default(step=int(step)):
            for k, v in scalars.items():
                self._tf.summary.scalar(k, v)
        self._tb.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            with self._tb.as_default(step=int(step)):
                self._tf.summary.image(name, image[None])
            self._tb.flush()


BUCKET_PREFIX = "loss/sigma_"  # the trainer's per-sigma-bucket losses (`training.sigma_bucket_names`)


def read_bucket_losses(workdir: str | os.PathLike, step: int, window: int = 1000) -> tuple[list[float], list[float]]:
    """The training loss per sigma bucket that a run logged over the steps (step - window, step]:
    (edges from 0 to inf, the mean loss of each bucket). What `experts.loss_mass_boundaries` splits.

    Read from `workdir/metrics.jsonl` (the bucket names carry their edges, `loss/sigma_LO-HI`).
    """
    path = as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: loss-based expert boundaries need the shared run's logged "
                                "per-sigma losses; train the shared phase into that workdir first.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {number}, is not JSON; the file is damaged.") from None
        if step - window < int(row.get("step", -1)) <= step and any(k.startswith(BUCKET_PREFIX) for k in row):
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} logs no per-sigma losses between steps {step - window} and {step}; name a step the "
                         "shared run reached (WORKDIR@STEP).")
    names = sorted({k for row in rows for k in row if k.startswith(BUCKET_PREFIX)},
                   key=lambda k: float(k[len(BUCKET_PREFIX):].split("-")[0]))
    edges = [float(k[len(BUCKET_PREFIX):].split("-")[0]) for k in names] + [float(names[-1].split("-")[-1])]
    losses = [float(np.nanmean([row.get(k, np.nan) for row in rows])) for k in names]
    return edges, losses
