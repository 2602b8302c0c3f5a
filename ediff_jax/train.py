"""Train a model: `python -m ediff_jax.train --config configs/quickstart.py --workdir DIR`.

Config variants go after a colon (`configs/base64.py:size=tiny`); any key can be
overridden with `--config.train.lr=3e-4`.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.", required=True)
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py[:arg].", lock_config=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    from ediff_jax import trainer  # deferred so --help is fast

    try:
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FloatingPointError) as e:  # user-facing errors: message, not traceback
        logging.error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
