"""The experiment and its train state: what a config builds, how the state is created,
sharded and branched, and how a checkpoint is checked and restored onto it.

Training (`training.loop`) and sampling (`ediff_jax.workdirs`) both build an `Experiment`
and restore through `restore_checkpoint`, so a checkpoint of another model is refused the
same way in both, before any array is read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from ediff_jax import edm, experts, parallel, resume_policy, sharding, sr
from ediff_jax.checkpoints import (
    Checkpointer,
    CheckpointMismatchError,
    abstract_with_shardings,
)
from ediff_jax.config_utils import config_from_json, validate_config
from ediff_jax.models import build_model, check_image_size
from ediff_jax.text.conditioning import TextEncoders, load_text_encoders


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. `rng` is a raw uint32 key so it checkpoints as data."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    extra_emas: tuple = ()  # one params-shaped EMA per config.train.extra_ema_decays
    power_emas: tuple = ()  # one params-shaped power EMA per config.train.posthoc_ema.gammas (post-hoc EMA)


def make_optimizer(train_config: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup to a constant rate, an optional linear decay, and global-norm clipping.

    The rate at step t (the t-th update, counted from 0) is
    lr * min(1, (t+1)/warmup) * min(1, (num_steps - t) / (lr_decay_fraction * num_steps)):
    the first step already learns, and with a decay the last step still moves (by 1/decay_steps of lr).
    """
    lr, warmup = float(train_config["lr"]), max(int(train_config["warmup_steps"]), 1)
    num_steps = int(train_config["num_steps"])
    decay_steps = float(train_config.get("lr_decay_fraction", 0.0)) * num_steps

    def schedule(step: jax.Array) -> jax.Array:
        rate = lr * jnp.minimum(1.0, (step + 1.0) / warmup)
        if decay_steps > 0:
            rate = rate * jnp.clip((num_steps - step) / decay_steps, 0.0, 1.0)
        return rate

    tx = optax.chain(
        optax.clip_by_global_norm(train_config["grad_clip"]),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=train_config["weight_decay"]),
    )
    return tx, schedule



# Model keys that do not change the parameters: a checkpoint fits either way.
FREE_MODEL_KEYS = ("remat", "dtype")
# Model keys added after checkpoints existed, with the value that the code before them
# behaved as. At that value a key is left out of the model's metadata, so checkpoints
# written before it keep loading and resuming; any other value is recorded and compared.
ADDED_MODEL_KEYS = {"coord_input": False}


def _compared_model_keys(model: Mapping[str, Any]) -> dict:
    return {k: v for k, v in model.items()
            if k not in FREE_MODEL_KEYS and not (k in ADDED_MODEL_KEYS and v == ADDED_MODEL_KEYS[k])}


def model_meta(config: ml_collections.ConfigDict) -> dict:
    """What a checkpoint belongs to; compared on resume and when sampling."""
    out = {
        "stage": "sr" if sr.is_sr(config) else "base",
        "model": _compared_model_keys(config.model.to_dict()),
        "image_size": int(config.data.image_size),
        "experts": {"phases": [[list(iv) for iv in phase] for phase in config.experts.phases]},
    }
    if sr.is_sr(config):
        out["sr"] = {"lowres_size": int(config.sr.lowres_size), "crop_size": int(config.sr.crop_size)}
        if sr.is_residual(config):  # only when set: checkpoints from before the option stay compatible
            out["sr"]["residual"] = True
    return out


def progress_meta(exp: "Experiment", phase: int) -> dict:
    """The part of a checkpoint's metadata that changes during a run (not compared by model
    shape): the phase, the experts' boundaries, and the run's whole config and process
    count, which `resume_policy` compares on resume."""
    out: dict[str, Any] = {"phase": phase, "config": exp.config.to_dict(), "process_count": jax.process_count()}
    out["text_encoders"] = {
        name: {"path": str(exp.config.text[f"{name}_path"]), "sha256": sha}
        for name, sha in exp.encoders.fingerprints.items()
    }
    if exp.phases:
        out["boundaries"] = experts.boundaries_from_intervals(
            exp.phases[phase], exp.config.edm.p_mean, exp.config.edm.p_std).tolist()
    return out


@dataclasses.dataclass
class Experiment:
    """The pieces built from a config: model, text encoders, mesh, optimizer, expert phases."""

    config: ml_collections.ConfigDict
    model: nn.Module
    encoders: TextEncoders
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    phases: list[list[experts.Interval]] = dataclasses.field(default_factory=list)  # [] = single model
    phase_ends: list[int] = dataclasses.field(default_factory=list)
    boundaries: np.ndarray | None = None  # set by `workdirs.load_workdir` for ensembles
    restored_step: int | None = None  # set by `workdirs.load_workdir`: the checkpoint's step

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape the model generates (whole images, also for stages trained on crops)."""
        size = int(self.config.data.image_size)
        return (size, size, 3)

    @property
    def is_sr(self) -> bool:
        return sr.is_sr(self.config)

    @property
    def train_shape(self) -> tuple[int, int, int]:
        size = sr.train_size(self.config)
        return (size, size, 3)

    def num_experts(self, phase: int) -> int | None:
        """Experts trained in `phase`; None for a single (unstacked) model."""
        return len(self.phases[phase]) if self.phases else None

    def phase_at(self, step: int) -> int:
        """The phase that 1-based training step `step` belongs to."""
        for p, end in enumerate(self.phase_ends):
            if step <= end:
                return p
        return max(len(self.phase_ends) - 1, 0)

    def example_cond(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of the conditioning a training step sees (text, and the low-res input of SR)."""
        tokens = self.encoders.tokenize([""] * batch)
        cond = jax.eval_shape(self.encoders.encode, self.encoders.params, tokens)
        if self.is_sr:
            low = sr.lowres_train_size(self.config)
            cond["lowres"] = jax.ShapeDtypeStruct((batch, low, low, 3), jnp.float32)
            cond["aug_level"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
        return cond


def _expert_phases(config: ml_collections.ConfigDict) -> tuple[list[list[experts.Interval]], list[int]]:
    """Validates `config.experts` and returns the phases and each phase's last step."""
    phases = [[(float(lo), float(hi)) for lo, hi in phase] for phase in config.experts.phases]
    if not phases:
        return [], []
    steps = [int(n) for n in config.experts.phase_steps]
    if len(steps) != len(phases) or sum(steps) != int(config.train.num_steps):
        raise ValueError(
            f"config.experts.phase_steps {steps} must give one length per phase ({len(phases)}) and sum to "
            f"config.train.num_steps={config.train.num_steps}."
        )
    for i, phase in enumerate(phases):
        experts.validate_intervals(phase)
        if i:
            experts.parents_of(phase, phases[i - 1])
    return phases, list(np.cumsum(steps))


def _check_batch_splits(config: ml_collections.ConfigDict, phases: list[list[experts.Interval]],
                        process_count: int) -> None:
    """Every phase's batch split must work, checked before phase 0 trains.

    Each expert takes every E-th row of the global batch (`experts.expert_shares`), so its
    share holds rows of every host when each host's rows are a multiple of E; gradient
    accumulation then splits each share into micro-batches. On one process E need not divide
    the batch: the shares are padded to ceil(B / E) rows (padding has weight 0) and the
    shorter shares rotate over the experts step by step.
    """
    batch, accum = int(config.train.batch_size), int(config.train.grad_accum)
    if accum < 1:
        raise ValueError(f"config.train.grad_accum={accum} must be >= 1.")
    if batch % process_count:
        raise ValueError(f"config.train.batch_size={batch} is not divisible by the {process_count} processes; "
                         "pick a multiple.")
    for i, phase in enumerate(phases or [[(0.0, 1.0)]]):
        e, where = len(phase), f"the {len(phase)} experts of phase {i}" if phases else "the model"
        if process_count > 1 and (batch // process_count) % e:
            raise ValueError(f"config.train.batch_size={batch} gives each of the {process_count} processes "
                             f"{batch // process_count} examples, not divisible by {where}; each expert takes an "
                             f"equal share of every process's examples. Use a multiple of {e * process_count}.")
        if batch < e:
            raise ValueError(f"config.train.batch_size={batch} is smaller than {where}; each expert needs at "
                             f"least one example per step. Use at least {e}.")
        share = -(-batch // e)  # an uneven split pads every share to the longest
        if share % accum:
            raise ValueError(f"config.train.grad_accum={accum} must divide the {share} examples that each of "
                             f"{where} gets per step; pick a divisor or change config.train.batch_size.")


def build_experiment(config: ml_collections.ConfigDict, devices: list | None = None,
                     encoders: TextEncoders | None = None, process_count: int | None = None) -> Experiment:
    """Validates the config and builds everything that does not depend on the workdir.

    `devices` (default: all) make the mesh; `encoders` replace the ones config.text names and
    `process_count` this job's (both for planning a pod from elsewhere: `ediff_jax.plan`).
    """
    validate_config(config)
    sr.check_sr_config(config)
    try:  # the grids written during and after training sample with these: refused now, not after the run
        edm.check_sampler(str(config.sample.sampler), int(config.sample.steps))
    except ValueError as e:
        raise ValueError(f"config.sample: {e}") from None
    # An SR stage is the same UNet with the low-res input path, which follows from config.sr.
    model = build_model({**config.model.to_dict(), "lowres_cond": sr.is_sr(config),
                         "lowres_residual": sr.is_residual(config)})
    check_image_size(model, int(config.data.image_size))
    check_image_size(model, sr.train_size(config))
    phases, phase_ends = _expert_phases(config)
    mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
    dp = parallel.data_parallel_size(mesh)
    if config.train.batch_size % dp:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by the {dp} data-parallel "
            "devices; pick a multiple."
        )
    _check_batch_splits(config, phases, jax.process_count() if process_count is None else process_count)
    encoders = place_encoders(config, mesh, encoders)
    tx, schedule = make_optimizer(config.train)
    return Experiment(config, model, encoders, mesh, tx, schedule, phases, phase_ends)


def place_encoders(config: ml_collections.ConfigDict, mesh: Mesh, encoders: TextEncoders | None) -> TextEncoders:
    """The text encoders on `mesh`, split as `sharding.encoder_shardings` says (loaded that way, leaf by
    leaf, or moved there when given; shape-only encoders, as a plan uses, are left as they are)."""
    min_size = int(config.sharding.fsdp_min_size)
    if encoders is None:
        return load_text_encoders(config.text, sharding=sharding.encoder_leaf_sharding(mesh, min_size))
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(encoders.params)):
        return encoders
    placed = jax.device_put(encoders.params, sharding.encoder_shardings(encoders.params, mesh, min_size))
    return dataclasses.replace(encoders, params=placed)


def _state_initializer(exp: Experiment, e: int | None) -> tuple[Callable[[jax.Array], TrainState], jax.Array]:
    """The train state's init function for `e` stacked experts (None: one unstacked model)."""
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), exp.example_cond(1))
    x = jnp.zeros((1, *exp.train_shape), jnp.float32)

    def init(rng: jax.Array) -> TrainState:
        params = exp.model.init(jax.random.fold_in(rng, 0), x, jnp.zeros((1,)), cond)["params"]
        if e is None:
            opt_state = exp.tx.init(params)
        else:  # identical experts: branching from a shared model is a copy
            params = experts.stack_experts([params] * e)
            opt_state = jax.vmap(exp.tx.init)(params)
        extra = tuple(params for _ in exp.config.train.extra_ema_decays)
        power = tuple(params for _ in exp.config.train.posthoc_ema.gammas)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=opt_state, rng=rng, extra_emas=extra, power_emas=power)

    return init, jax.random.PRNGKey(int(exp.config.seed))


def _shardings_for(exp: Experiment, abstract: TrainState, stacked: bool) -> Any:
    """Shardings of the whole train state from `config.sharding` (regex rules, FSDP by default).

    Parameters follow the rules; the EMA copy mirrors them and the optimizer state
    follows its parameters; a stacked expert axis goes on an `expert` mesh axis if any.
    """
    config = exp.config
    return sharding.train_state_shardings(
        abstract, sharding.rules_from_config(config.sharding.rules), exp.mesh, optimizer=exp.tx,
        stacked_experts=stacked, min_size=int(config.sharding.fsdp_min_size),
    )


def state_shardings(exp: Experiment, phase: int = 0, *, single: bool = False) -> tuple[TrainState, Any]:
    """The abstract train state of `phase` (shapes only, nothing allocated) and its shardings.

    `single`: the state of one unstacked model instead, whatever the phases (what a shared
    model's workdir holds when a run branches from it: `warm_start`).
    """
    e = None if single else exp.num_experts(phase)
    init, rng = _state_initializer(exp, e)
    abstract = jax.eval_shape(init, rng)
    return abstract, _shardings_for(exp, abstract, e is not None)


def init_train_state(exp: Experiment) -> tuple[TrainState, Any]:
    """Creates the train state already sharded (jit of init with out_shardings)."""
    init, rng = _state_initializer(exp, exp.num_experts(0))
    _, shardings = state_shardings(exp, 0)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def branch_state(exp: Experiment, state: TrainState, phase: int) -> tuple[TrainState, Any]:
    """Enters `phase`: each child expert starts as a copy of its parent (params, EMA, optimizer)."""
    parents = jnp.asarray(experts.parents_of(exp.phases[phase], exp.phases[phase - 1]))
    take = lambda tree: jax.tree.map(lambda x: x[parents], tree)
    _, shardings = state_shardings(exp, phase)
    branch = jax.jit(lambda st: st.replace(params=take(st.params), ema_params=take(st.ema_params),
                                           opt_state=take(st.opt_state), extra_emas=take(st.extra_emas),
                                           power_emas=take(st.power_emas)),
                     out_shardings=shardings)
    return branch(state), shardings


def check_checkpoint_kind(saved: Mapping[str, Any] | None, exp: Experiment) -> None:
    """A clear error for an ensemble checkpoint under a single-model config, or the reverse."""
    if not saved:
        return
    saved_phases = saved.get("experts", {}).get("phases", [])
    if bool(saved_phases) != bool(exp.phases):
        found = f"an ensemble of {len(saved_phases[saved.get('progress', {}).get('phase', 0)])} experts" \
            if saved_phases else "a single model"
        wanted = f"an ensemble (phases {exp.phases})" if exp.phases else "a single model"
        raise CheckpointMismatchError(
            f"The workdir's checkpoint holds {found} but the config describes {wanted}. The checkpoint was "
            "left untouched; use the config that wrote it (see its config.json) or a new --workdir."
        )


def check_text_encoders(saved: Mapping[str, Any], exp: Experiment) -> None:
    """A model only understands the encoders it was trained with: same weights, not just same path.

    Checkpoints written before the record existed carry none and are not checked.
    """
    recorded = saved.get("progress", {}).get("text_encoders", {})
    for name, record in recorded.items():
        loaded = exp.encoders.fingerprints.get(name)
        if loaded is not None and loaded != record["sha256"]:
            raise CheckpointMismatchError(
                f"This checkpoint was trained with the {name} encoder {record['path']!r} (weights sha256 "
                f"{record['sha256'][:12]}...), but config.text.{name}_path={exp.config.text[f'{name}_path']!r} "
                f"loads different weights ({loaded[:12]}...). Point config.text.{name}_path at the encoder "
                "the model was trained with."
            )


def checked_abstract_state(exp: Experiment, ckpt: Checkpointer, saved: Mapping[str, Any]) -> tuple[TrainState, Any, int]:
    """The abstract train state (with shardings) that a checkpoint restores onto, after
    checking that the checkpoint holds this model; also its shardings and expert phase.
    Training and sampling both restore through here."""
    check_checkpoint_kind(saved, exp)
    check_text_encoders(saved, exp)
    saved = {**saved, "model": _compared_model_keys(saved.get("model", {}))}
    ckpt.check_compatible(model_meta(exp.config), saved)
    phase = int(saved.get("progress", {}).get("phase", 0))
    abstract, shardings = state_shardings(exp, phase)
    return abstract_with_shardings(abstract, shardings), shardings, phase


def saved_config(saved: Mapping[str, Any], workdir: epath.Path) -> dict | None:
    """The config a checkpoint was written with: its own record, else (checkpoints from
    before that record) the workdir's config.json, which the last run wrote."""
    # Either record is laid over today's defaults: keys added to the code since take the
    # value the old code behaved as, and are not reported as changed.
    progress = saved.get("progress", {})
    if "config" in progress:
        config = config_from_json(json.dumps(progress["config"]), "the checkpoint's config record")
        return {**resume_policy.flatten(config.to_dict()), "process_count": progress.get("process_count", 1)}
    path = workdir / "config.json"
    if path.exists():
        return {**resume_policy.flatten(config_from_json(path.read_text()).to_dict()), "process_count": None}
    return None



def check_config_against(exp: "Experiment", saved: Mapping[str, Any], workdir: Any,
                         also_allowed: tuple[str, ...] = ()) -> dict:
    """The resume policy between the run that wrote `saved` (in `workdir`) and `exp.config`.

    Returns `resume_policy.compare`'s result ({} when the checkpoint has no config record);
    raises `ResumeChangeError` for a refused change. `also_allowed`: keys accepted besides
    `config.train.allow_resume_change` (a warm start's branch keys).
    """
    old = saved_config(saved, workdir)
    if old is None:
        return {}
    new = {**resume_policy.flatten(exp.config.to_dict()), "process_count": jax.process_count()}
    if old["process_count"] is None:  # not recorded: nothing to compare against
        new["process_count"] = None
    allowed = [*resume_policy.allowed_changes(exp.config), *also_allowed]
    return resume_policy.check_resume(old, new, allowed, str(workdir))


@dataclasses.dataclass
class Restored:
    """A checkpoint restored onto an experiment: what `restore_checkpoint` returns."""

    step: int
    tree: Any  # the whole TrainState, or {name: subtree} for the fields asked for
    meta: dict  # the checkpoint's metadata
    shardings: Any  # of the whole train state of the checkpoint's expert phase
    phase: int


def restore_checkpoint(exp: Experiment, ckpt: Checkpointer, *, fields: Callable[[TrainState], Mapping[str, Any]] | None = None,
                       step: int | None = None, check: Callable[[dict], None] | None = None,
                       quarantine: bool = False) -> Restored:
    """Restores the newest readable checkpoint (or the kept `step`) after checking it holds this model.

    `fields(abstract_state)` -> {name: abstract subtree} restores only those TrainState fields
    (sampling reads one EMA, not the optimizer state); None restores the whole state.
    `check(meta)` runs further checks before any array is read (training: the resume policy).
    A damaged newest checkpoint falls back to the previous one (`Checkpointer.restore_latest_good`;
    `quarantine` moves it aside, for training only).
    """
    found: dict[str, Any] = {}

    def abstract_for(meta: dict) -> Any:
        abstract, found["shardings"], found["phase"] = checked_abstract_state(exp, ckpt, meta)
        if check is not None:
            check(meta)
        return abstract if fields is None else fields(abstract)

    def restore(at: int, abstract: Any) -> Any:
        return ckpt.restore(abstract, at) if fields is None else ckpt.restore_fields(at, abstract)

    if step is None:
        at, tree, meta = ckpt.restore_latest_good(abstract_for, restore, quarantine=quarantine)
    else:
        if int(step) not in ckpt.all_steps():
            raise FileNotFoundError(f"No checkpoint of step {step} in {ckpt.directory}; the kept steps are "
                                    f"{ckpt.all_steps()}.")
        at, meta = int(step), ckpt.read_meta(int(step))
        tree = restore(at, abstract_for(meta))
    return Restored(int(at), tree, meta, found["shardings"], found["phase"])
