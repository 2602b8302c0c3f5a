"""`python -m ediff_jax.plan --config CONFIG --topology v5e:16x16 [--config.mesh.fsdp=-1 ...] [--out plan.json]`.

Compiles the train step for the topology and prints memory per chip (fits or not, with the
headroom), FLOPs per image with throughput ceilings, and collective traffic; `--out` also writes
the plan as JSON. Config variants and overrides work as in `python -m ediff_jax.train`.

`--sweep [--sweep_batches=4,8 --sweep_remat=off,on --sweep_meshes='data=4;data=2,fsdp=2']` plans
every mesh shape, remat setting and per-chip batch instead (`sweep.py`), prints them ranked by
predicted throughput with the best named last; `--out` writes all rows and the best.

`--encode sharded|replicated` plans the text-embedding cache instead (`encode.py`): T5 + CLIP
encoding of `train.batch_size` captions per call, the encoders split as training places them
(FSDP over `mesh.fsdp`) or whole on every chip. It reads `config.text`, `config.mesh`,
`config.train.batch_size` and `config.sharding.fsdp_min_size`; the UNet's settings play no part.
"""

from __future__ import annotations

import json
import os
import sys

# Compile-only: no TPU runtime is started, and libtpu's one-process lock must not block a second
# planner (or a training run) on the same machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ediff_jax import logs  # noqa: E402

logs.quiet_startup_banners()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/base64.py:size=paper,experts=3.",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology, GENERATION:SHAPE, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4.",
                    required=True)
flags.DEFINE_string("out", None, "Also write the plan (or the sweep) as JSON to this file.")
flags.DEFINE_bool("sweep", False, "Plan every data x fsdp (x expert) mesh, remat off/on and per-chip batch; rank "
                  "those that fit by predicted throughput.")
flags.DEFINE_string("sweep_batches", None, "With --sweep: per-chip batches, e.g. 4,8,16 (default: the config's "
                    "per-chip batch, x2, x4).")
flags.DEFINE_string("sweep_remat", None, "With --sweep: off, on or off,on (default).")
flags.DEFINE_string("sweep_meshes", None, "With --sweep: only these meshes, e.g. 'data=4;data=2,fsdp=2' (default: "
                    "every factorisation of the chips).")
flags.DEFINE_enum("encode", None, ["sharded", "replicated"], "Plan the text-embedding cache's encoding (T5 + CLIP "
                  "on train.batch_size captions) instead of the train step: encoders split as training places them "
                  "(FSDP over mesh.fsdp), or whole on every chip.")
FLAGS = flags.FLAGS
SWEEP_FLAGS = ("sweep_batches", "sweep_remat", "sweep_meshes")


def sweep_options(argv: list[str]) -> dict:
    """The --sweep_* flags parsed and checked against each other and the config overrides in `argv`."""
    from ediff_jax.plan import sweep

    given = [name for name in SWEEP_FLAGS if FLAGS[name].present]
    if not FLAGS.sweep:
        if given:
            raise ValueError(f"--{given[0]} only applies to a sweep: add --sweep, or drop --{given[0]}.")
        return {}
    sweep.check_overrides(sweep.config_overrides(argv), batches_given=FLAGS.sweep_batches is not None)
    return {"batches": sweep.parse_batches(FLAGS.sweep_batches) if FLAGS.sweep_batches is not None else None,
            "remats": sweep.parse_remat("off,on" if FLAGS.sweep_remat is None else FLAGS.sweep_remat),
            "meshes": sweep.parse_meshes(FLAGS.sweep_meshes) if FLAGS.sweep_meshes is not None else None}


def print_sweep(options: dict) -> None:
    from ediff_jax.plan import sweep

    result = sweep.run_sweep(FLAGS.config, FLAGS.topology, progress=logs.info, **options)
    print(sweep.format_sweep(result["rows"], FLAGS.topology))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Wrote {FLAGS.out}.")


def print_encoding_plan() -> None:
    from ediff_jax.plan.encode import format_encoding_plan, plan_text_encoding

    plan = plan_text_encoding(FLAGS.config, FLAGS.topology, FLAGS.encode)
    print(format_encoding_plan(plan))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(plan, f, indent=2)
        print(f"Wrote {FLAGS.out}.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        logs.fail(f"unexpected arguments {argv[1:]}: every setting is a flag, e.g. --config.mesh.fsdp=-1.")
    if FLAGS.config is None:
        logs.fail("--config is required, e.g. --config configs/base64.py:size=tiny.")
    with logs.user_errors(ValueError):
        if FLAGS.encode and FLAGS.sweep:
            raise ValueError("--encode plans the text encoders and --sweep the train step: give one of them.")
        options = sweep_options(sys.argv)
    logs.quiet_library_logs()
    if FLAGS.encode:
        with logs.user_errors(ValueError, FileNotFoundError):
            print_encoding_plan()
        return
    if FLAGS.sweep:
        with logs.user_errors(ValueError, FileNotFoundError):
            print_sweep(options)
        return
    from ediff_jax.plan.compile import DoesNotFit, format_plan, plan_train_step

    with logs.user_errors(ValueError, FileNotFoundError):
        try:
            plan = plan_train_step(FLAGS.config, FLAGS.topology)
        except DoesNotFit as e:
            plan = {"topology": FLAGS.topology, "memory": {"fits": False}, "compiler": str(e)}
            print(f"{FLAGS.topology}: DOES NOT FIT. The TPU compiler says: {e}")
        else:
            print(format_plan(plan))
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump(plan, f, indent=2)
            print(f"Wrote {FLAGS.out}.")


if __name__ == "__main__":
    app.run(main)
