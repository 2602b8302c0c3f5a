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
