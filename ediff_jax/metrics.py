"""Metrics to TensorBoard and a JSON-lines file (process 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import jax
import numpy as np


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files."""

    def __init__(self, workdir: str | Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if not self.enabled:
            return
        self.path = Path(workdir) / "metrics.jsonl"
        import tensorflow as tf  # deferred: only the writer process needs TF's summary ops

        tf.config.set_visible_devices([], "GPU")
        self._tf = tf
        self._tb = tf.summary.create_file_writer(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        with self._tb.as_default(step=int(step)):
            for k, v in scalars.items():
                self._tf.summary.scalar(k, v)
        self._tb.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            with self._tb.as_default(step=int(step)):
                self._tf.summary.image(name, image[None])
            self._tb.flush()
