"""Train a model: `python -m ediff_jax.train --config configs/quickstart.py --workdir DIR`.

Config variants go after a colon (`configs/base64.py:size=tiny`); any key can be
overridden with `--config.train.lr=3e-4`.

Multi-host: on a TPU pod run the same command on every host (jax.distributed joins
automatically). On GPU/CPU clusters give each process --coordinator_address HOST:PORT
--num_processes N --process_id I (or the EDIFF_COORDINATOR / EDIFF_NUM_PROCESSES /
EDIFF_PROCESS_ID variables; SLURM and Open MPI jobs are detected).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only our data loader: hide its C++ banners

import sys

from absl import app, flags

from ediff_jax.logs import quiet_library_logs
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.", required=True)
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py[:arg].", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0 (GPU/CPU clusters).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes in the job.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    from ediff_jax import distributed, trainer  # deferred so --help is fast

    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FloatingPointError) as e:  # user-facing errors: message, not traceback
        sys.exit(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with bad `--config.x=...` overrides reported in one line, not a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        detail: object = e
        while isinstance(detail, BaseException) and detail.args:  # ml_collections nests KeyError in AttributeError
            detail = detail.args[0]
        sys.exit(f"error: invalid --config override ({' '.join(str(detail).split())}). See --helpfull for keys.")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
