"""Training, in four files with one job each:

- `experiment.py`: what a config builds (model, encoders, mesh, optimizer, expert phases), the
  train state created sharded, expert branching, and the checks and restore that training and
  sampling share (`restore_checkpoint`).
- `step.py`: the jit-compiled EDM step (loss, AdamW, EMA), for one model or all experts at once.
- `warm_start.py`: a new run started from another workdir's single model (`config.experts.init_from`):
  eDiff-I's experts branched from a trained shared model.
- `loop.py`: `train_and_evaluate`, the loop around the step (resume, time box, preemption,
  logs, checkpoints, sample grids).

`python -m ediff_jax.train` is a thin wrapper over `train_and_evaluate`; everything here is
importable from a notebook.
"""

from ediff_jax.training.experiment import (
                                           ADDED_MODEL_KEYS,
                                           FREE_MODEL_KEYS,
                                           Experiment,
                                           Restored,
                                           TrainState,
                                           branch_state,
                                           build_experiment,
                                           check_checkpoint_kind,
                                           check_text_encoders,
                                           checked_abstract_state,
                                           init_train_state,
                                           make_optimizer,
                                           model_meta,
                                           progress_meta,
                                           restore_checkpoint,
                                           saved_config,
                                           state_shardings,
)
from ediff_jax.training.loop import (
                                           PreemptionGuard,
                                           restore_or_init,
                                           summarize,
                                           train_and_evaluate,
                                           train_iterator,
)
from ediff_jax.training.step import (
                                           EXPERT_TRAIN_MAPS,
                                           SIGMA_BUCKETS,
                                           bucket_sums,
                                           compile_train_step,
                                           ema_decay_at,
                                           expert_train_map,
                                           make_train_step,
                                           make_update,
                                           sigma_bucket_names,
)

__all__ = [
    "ADDED_MODEL_KEYS",
    "EXPERT_TRAIN_MAPS",
    "Experiment",
    "FREE_MODEL_KEYS",
    "PreemptionGuard",
    "Restored",
    "SIGMA_BUCKETS",
    "TrainState",
    "branch_state",
    "bucket_sums",
    "build_experiment",
    "check_checkpoint_kind",
    "check_text_encoders",
    "checked_abstract_state",
    "compile_train_step",
    "ema_decay_at",
    "expert_train_map",
    "init_train_state",
    "make_optimizer",
    "make_train_step",
    "make_update",
    "model_meta",
    "progress_meta",
    "restore_checkpoint",
    "restore_or_init",
    "saved_config",
    "sigma_bucket_names",
    "state_shardings",
    "summarize",
    "train_and_evaluate",
    "train_iterator",
]
