"""`python -m ediff_jax.plan --config CONFIG --topology v5e:16x16 [--config.mesh.fsdp=-1 ...] [--out plan.json]`.

Compiles the train step for the topology and prints memory per chip (fits or not, with the
headroom), FLOPs per image with throughput ceilings, and collective traffic; `--out` also writes
the plan as JSON. Config variants and overrides work as in `python -m ediff_jax.train`.
"""

from __future__ import annotations

import json
import os

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
flags.DEFINE_string("out", None, "Also write the plan as JSON to this file.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        logs.fail(f"unexpected arguments {argv[1:]}: every setting is a flag, e.g. --config.mesh.fsdp=-1.")
    if FLAGS.config is None:
        logs.fail("--config is required, e.g. --config configs/base64.py:size=tiny.")
    logs.quiet_library_logs()
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
