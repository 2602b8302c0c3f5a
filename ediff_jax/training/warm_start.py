"""Start a run from another workdir's checkpoint: eDiff-I's experts branched from a trained shared model.

eDiff-I trains one model on every noise level, then branches it and fine-tunes each copy on
its own interval. `config.experts.init_from = "WORKDIR[@STEP]"` starts a new, empty workdir
from a single model that another run trained (its newest checkpoint, or STEP). The new
run's expert phases must begin with the shared interval [(0, 1)]: that phase's first STEP
steps are the ones the source workdir trained, so the step counter, the data stream
(exact resume: step k starts at example k x batch), the learning-rate warm-up and the EMA
warm-up all continue where the source stopped, and the loop branches at the phase's end
as it does in one run. Several layouts can then share one shared phase, which is what
makes an expert ablation at equal training samples affordable.

Without expert phases, the same setting continues a single model in a new workdir.

The source must fit the new config as a resume would (`resume_policy`): the model, data,
encoders and p(sigma) must match; the expert layout and the step count may change, and the
post-hoc EMA may be dropped (with the source's exponents it carries over, stacked like the
params, and the branched run's snapshots reconstruct its experts' EMAs). The source workdir
is only read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from ediff_jax import logs, resume_policy
from ediff_jax.checkpoints import Checkpointer, abstract_with_shardings, kept_steps
from ediff_jax.config_utils import parse_init_from
from ediff_jax.paths import is_remote
from ediff_jax.training.experiment import (
    Experiment,
    TrainState,
    _compared_model_keys,
    check_config_against,
    check_text_encoders,
    model_meta,
    saved_config,
    state_shardings,
)

# Keys a warm start may change besides what a resume may: the layout being branched into,
# its length, and the post-hoc EMA (dropped, or the source's exponents: `_check_settings`).
BRANCH_KEYS = ("experts.phases", "experts.phase_steps", "experts.init_from", "train.posthoc_ema.gammas",
               "train.posthoc_ema.every")


def warm_start(exp: Experiment, workdir: str | Path) -> tuple[TrainState, Any, int, dict]:
    """The train state `exp` starts from, read from `config.experts.init_from`'s checkpoint.

    Returns the state (sharded as phase 0 of `exp` needs), its shardings, the phase (0) and
    the config changes from the source run (`resume_policy.compare`). Every check runs
    before an array is read; nothing is written to either workdir.
    """
    config = exp.config
    value = str(config.experts.init_from)
    source, step = parse_init_from(value)
    where = f"config.experts.init_from={value!r}"
    steps = kept_steps(source)
    if not steps:
        raise FileNotFoundError(f"{where}: {source} holds no checkpoint. Train the shared model there first, "
                                "or point init_from at a workdir that has one.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{where}: {source} has no checkpoint of step {step}; its kept steps are {steps}.")
    if _same_path(source, workdir):
        raise ValueError(f"{where} names the run's own workdir; a run resumes from its own checkpoints by itself. "
                         "Give a new --workdir for the branched run.")
    src = Checkpointer(source, keep=None, read_only=True)
    try:
        saved = src.read_meta(step)
        _check_source(exp, src, saved, source, step, where)
        changes = _check_settings(exp, saved, source, where)
        keep_power = bool(config.train.posthoc_ema.gammas)
        abstract, single = state_shardings(exp, single=True)
        fields = {"step": abstract.step, "params": abstract.params, "ema_params": abstract.ema_params,
                  "opt_state": abstract.opt_state, "rng": abstract.rng}
        if config.train.extra_ema_decays:
            fields["extra_emas"] = abstract.extra_emas
        if keep_power:
            fields["power_emas"] = abstract.power_emas
        restored = src.restore_fields(step, {name: abstract_with_shardings(tree, getattr(single, name))
                                             for name, tree in fields.items()})
    finally:
        src.close()
    state = abstract.replace(**{k: restored.get(k, ()) for k in
                                ("step", "params", "ema_params", "opt_state", "rng", "extra_emas", "power_emas")})
    if not exp.phases:
        shardings = single
    else:  # the shared model is phase 0's one expert: stack it on the expert axis
        _, shardings = state_shardings(exp, 0)
        stack = lambda tree: jax.tree.map(lambda x: x[None], tree)
        state = jax.jit(lambda st: st.replace(params=stack(st.params), ema_params=stack(st.ema_params),
                                              opt_state=stack(st.opt_state), extra_emas=stack(st.extra_emas),
                                              power_emas=stack(st.power_emas)),
                        out_shardings=shardings)(state)
    logs.info(f"Starting from {source} at step {step} ({where}); "
              + (f"the experts branch at step {exp.phase_ends[0]}." if exp.phases else "one model, as it was."))
    return state, shardings, 0, changes


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _check_source(exp: Experiment, src: Checkpointer, saved: dict | None, source: str, step: int,
                  where: str) -> None:
    """The source holds one model of this config's architecture, early enough for the shared phase."""
    if not saved:
        raise FileNotFoundError(f"{where}: the checkpoint of step {step} in {source} has no metadata; it was not "
                                "written by ediff_jax training.")
    if saved.get("experts", {}).get("phases"):
        raise ValueError(f"{where}: {source} holds an expert ensemble; init_from branches one shared model. "
                         "Give the shared model's workdir (or a step from before it branched, in a run of its own).")
    check_text_encoders(saved, exp)
    # The architecture must match; the expert layout is what the warm start changes.
    src.check_compatible({**model_meta(exp.config), "experts": {"phases": []}},
                         {**saved, "model": _compared_model_keys(saved.get("model", {}))})
    num_steps = int(exp.config.train.num_steps)
    if step >= num_steps:
        raise ValueError(f"{where}: the source is at step {step}, but config.train.num_steps={num_steps}; a warm "
                         "start trains further, so num_steps must be larger.")
    if exp.phases and step > exp.phase_ends[0]:
        raise ValueError(f"{where}: the source is at step {step}, past the shared phase, which ends at step "
                         f"{exp.phase_ends[0]} (config.experts.phase_steps[0]); make the shared phase at least {step} steps.")


def _check_settings(exp: Experiment, saved: dict, source: str, where: str) -> dict:
    """The resume policy between the source's run and this config, the branch keys allowed."""
    old = saved_config(saved, source)
    power_old = (old or {}).get("train.posthoc_ema.gammas", [])
    power_new = list(exp.config.train.posthoc_ema.gammas)
    if old is not None and power_new and power_new != list(power_old):
        raise ValueError(f"{where}: config.train.posthoc_ema.gammas={tuple(power_new)} differs from the source's "
                         f"{tuple(power_old)}; keep the source's exponents, or () to track none.")
    try:
        return check_config_against(exp, saved, source, BRANCH_KEYS)
    except resume_policy.ResumeChangeError as e:
        raise resume_policy.ResumeChangeError(f"{where}: {e}") from None

