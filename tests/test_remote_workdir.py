"""A gs:// workdir, end to end, against a local GCS emulator (tests/conftest.py: gcs_bucket):
train, SIGTERM, resume bitwise, sample. Every file lands in the bucket, none on local disk."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from ediff_jax import training
from helpers import tiny_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gs_workdir_trains_is_preempted_resumes_bitwise_and_samples(shapes_data_dir, gcs_bucket, tmp_path):
    from ediff_jax.checkpoints import kept_steps
    from ediff_jax.generation import sample_from_workdir

    config = tiny_train_config(shapes_data_dir, num_steps=6, ckpt_every=2)
    config_json = tmp_path / "config.json"
    config_json.write_text(config.to_json_best_effort())
    workdir = f"{gcs_bucket}/runs/b64"
    root = epath.Path(workdir)
    driver = textwrap.dedent(f"""
        from ediff_jax import training
        from ediff_jax.config_utils import config_from_json
        training.train_and_evaluate(config_from_json(open({str(config_json)!r}).read()), {workdir!r})
    """)
    # The emulator's environment (gcs_bucket) and this process's XLA flags reach the subprocess.
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=str(tmp_path), env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = root / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.5)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "SIGTERM: saved step" in output, output
    stopped_at = kept_steps(workdir)[-1]
    assert 2 <= stopped_at < 6, output

    resumed = training.train_and_evaluate(config, workdir)
    straight = training.train_and_evaluate(config, tmp_path / "local")
    jax.tree.map(np.testing.assert_array_equal, (resumed.params, resumed.ema_params),
                 (straight.params, straight.ema_params))

    images = sample_from_workdir(workdir, ["a red circle"], num=2, steps=2, progress=False)
    assert images.shape == (2, 32, 32, 3)

    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and steps[:stopped_at] == list(range(1, stopped_at + 1))  # both runs' lines kept
    assert (root / "config.json").exists() and len(list((root / "config_history").iterdir())) == 2
    assert [p for p in (root / "tensorboard").iterdir() if "tfevents" in p.name]
    assert kept_steps(workdir)[-1] == 6 and not (root / "lock.json").exists()
    assert (root / "samples" / "grid.png").exists() and (root / "samples" / "00_01.png").exists()
    assert not list(tmp_path.glob("gs*")) and not list(REPO.glob("gs*"))  # nothing went to a local "gs:" folder
