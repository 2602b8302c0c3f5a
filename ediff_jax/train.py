"""Train a model: `python -m ediff_jax.train --config configs/quickstart.py --workdir DIR`.

Config variants go after a colon (`configs/base64.py:size=tiny`); any key can be
overridden with `--config.train.lr=3e-4`.

Multi-host: on a TPU pod run the same command on every host (jax.distributed joins
automatically). On GPU/CPU clusters give each process --coordinator_address HOST:PORT
--num_processes N --process_id I (or the EDIFF_COORDINATOR / EDIFF_NUM_PROCESSES /
EDIFF_PROCESS_ID variables; SLURM and Open MPI jobs are detected).
"""

from __future__ import annotations

from ediff_jax import logs

logs.quiet_startup_banners()  # before anything imports TF (our data loader) or transformers

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.", required=True)
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py[:arg].", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0 (GPU/CPU clusters).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes in the job.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        logs.fail(f"unexpected arguments {argv[1:]}: every setting is a flag, e.g. --config.train.lr=3e-4.")
    logs.quiet_library_logs()
    from ediff_jax import distributed, training  # deferred so --help is fast
    from ediff_jax.checkpoints import CheckpointReadError
    from ediff_jax.workdir_lock import WorkdirLockedError

    # User-facing errors end in their one-line message, not a traceback: bad settings, a
    # missing file, NaN/Inf, a workdir another trainer holds, a checkpoint that fails to read.
    with logs.user_errors(ValueError, FloatingPointError, FileNotFoundError, WorkdirLockedError, CheckpointReadError):
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        training.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing; a bad flag, config file, config argument or `--config.x=...` override
    ends in one line naming it (`logs.fail`), not a traceback."""
    try:
        argv = FLAGS(argv)
    except flags.Error as e:
        logs.fail(_flag_error(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        detail: object = e
        while isinstance(detail, BaseException) and detail.args:  # ml_collections nests KeyError in AttributeError
            detail = detail.args[0]
        logs.fail(f"invalid --config override ({detail}). See --helpfull for keys.")
    if FLAGS.config is None:
        logs.fail("--config is required, e.g. --config configs/quickstart.py (see README.md for the configs).")
    try:
        FLAGS.config.get("seed")  # config_flags defers a file that failed to load to the first use
    except OSError as e:
        logs.fail(_config_load_error(FLAGS["config"].config_filename, e))
    return argv


def _flag_error(e: flags.Error) -> str:
    """The message of a flag that failed to parse; for --config, what the config file said."""
    text = str(e)
    prefix, marker = f"flag --{FLAGS['config'].name}=", ": Error whilst parsing config file"
    wrapper = e.__context__  # config_flags re-raises get_config's error as its traceback's text
    if text.startswith(prefix) and marker in text and wrapper is not None and wrapper.__context__ is not None:
        cause = wrapper.__context__  # what get_config raised (parse_arg: names the key and the fix)
        spec = text[len(prefix):text.index(marker)]
        return str(cause) if str(cause).startswith(spec) else f"{spec}: {cause}"
    return f"{text.rstrip('.')} (--helpshort lists the flags)."


def _config_load_error(spec: str, e: OSError) -> str:
    from pathlib import Path

    path = spec.partition(":")[0]
    if not Path(path).expanduser().is_file():
        return f"config file {path!r} not found (--config {spec}); give a config file, e.g. configs/quickstart.py."
    cause = e.__cause__ or e
    return f"could not load --config {spec}: {cause}"


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
