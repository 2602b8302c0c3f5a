"""Training library: train state, the jit-compiled EDM step, and the train loop.

`python -m ediff_jax.train` is a thin wrapper over `train_and_evaluate`; everything here
is importable from a notebook.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
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
from tqdm.auto import tqdm

from ediff_jax import edm, experts, logs, parallel, resume_policy, sharding, sr
from ediff_jax.checkpoints import CheckpointMismatchError, Checkpointer, abstract_with_shardings
from ediff_jax.config_utils import config_from_json, validate_config
from ediff_jax.images import ensure_writable_dir, make_grid, save_png
from ediff_jax.metrics import MetricWriter
from ediff_jax.models import build_model, check_image_size
from ediff_jax.text.cache import load_or_build_cache
from ediff_jax.text.conditioning import TextEncoders, dropout_conditioning, load_text_encoders
from ediff_jax.workdir_lock import WorkdirLock, WorkdirLockedError


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. `rng` is a raw uint32 key so it checkpoints as data."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    extra_emas: tuple = ()  # one params-shaped EMA per config.train.extra_ema_decays


def make_optimizer(train_config: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup to a constant rate, and global-norm gradient clipping.

    The rate at step t is lr * min(1, (t+1)/warmup): the first step already learns.
    """
    lr, warmup = float(train_config["lr"]), max(int(train_config["warmup_steps"]), 1)

    def schedule(step: jax.Array) -> jax.Array:
        return lr * jnp.minimum(1.0, (step + 1.0) / warmup)

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


# Loss is also reported per sigma bucket (edges in sigma): where in the noise range a
# change helps or hurts, which is what expert ablations are about.
SIGMA_BUCKETS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def sigma_bucket_names() -> list[str]:
    edges = ["0", *[f"{e:g}" for e in SIGMA_BUCKETS], "inf"]
    return [f"loss/sigma_{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]


def bucket_sums(loss: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-bucket sums of per-example losses, and counts (aggregated over steps by the loop)."""
    index = jnp.searchsorted(jnp.asarray(SIGMA_BUCKETS, jnp.float32), sigma.reshape(-1), side="right")
    one_hot = jax.nn.one_hot(index, len(SIGMA_BUCKETS) + 1, dtype=jnp.float32)
    return one_hot.T @ loss.reshape(-1).astype(jnp.float32), one_hot.sum(0)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with warm-up, (1+t)/(10+t) capped at `decay`: short runs still average."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


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
    boundaries: np.ndarray | None = None  # set by `sampling.load_workdir` for ensembles
    restored_step: int | None = None  # set by `sampling.load_workdir`: the checkpoint's step

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
    accumulation then splits each share into micro-batches.
    """
    batch, accum = int(config.train.batch_size), int(config.train.grad_accum)
    if accum < 1:
        raise ValueError(f"config.train.grad_accum={accum} must be >= 1.")
    if batch % process_count:
        raise ValueError(f"config.train.batch_size={batch} is not divisible by the {process_count} processes; "
                         "pick a multiple.")
    for i, phase in enumerate(phases or [[(0.0, 1.0)]]):
        e, where = len(phase), f"the {len(phase)} experts of phase {i}" if phases else "the model"
        if (batch // process_count) % e:
            raise ValueError(f"config.train.batch_size={batch} gives each of the {process_count} processes "
                             f"{batch // process_count} examples, not divisible by {where}; each expert takes an "
                             f"equal share of every process's examples. Use a multiple of {e * process_count}.")
        if (batch // e) % accum:
            raise ValueError(f"config.train.grad_accum={accum} must divide the {batch // e} examples that each of "
                             f"{where} gets per step; pick a divisor or change config.train.batch_size.")


def build_experiment(config: ml_collections.ConfigDict, devices: list | None = None) -> Experiment:
    """Validates the config and builds everything that does not depend on the workdir."""
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
    _check_batch_splits(config, phases, jax.process_count())
    encoders = load_text_encoders(config.text)
    tx, schedule = make_optimizer(config.train)
    return Experiment(config, model, encoders, mesh, tx, schedule, phases, phase_ends)


def _state_initializer(exp: Experiment, phase: int) -> tuple[Callable[[jax.Array], TrainState], jax.Array]:
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), exp.example_cond(1))
    x = jnp.zeros((1, *exp.train_shape), jnp.float32)
    e = exp.num_experts(phase)

    def init(rng: jax.Array) -> TrainState:
        params = exp.model.init(jax.random.fold_in(rng, 0), x, jnp.zeros((1,)), cond)["params"]
        if e is None:
            opt_state = exp.tx.init(params)
        else:  # identical experts: branching from a shared model is a copy
            params = experts.stack_experts([params] * e)
            opt_state = jax.vmap(exp.tx.init)(params)
        extra = tuple(params for _ in exp.config.train.extra_ema_decays)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=opt_state, rng=rng, extra_emas=extra)

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


def state_shardings(exp: Experiment, phase: int = 0) -> tuple[TrainState, Any]:
    """The abstract train state of `phase` (shapes only, nothing allocated) and its shardings."""
    init, rng = _state_initializer(exp, phase)
    abstract = jax.eval_shape(init, rng)
    return abstract, _shardings_for(exp, abstract, exp.num_experts(phase) is not None)


def init_train_state(exp: Experiment) -> tuple[TrainState, Any]:
    """Creates the train state already sharded (jit of init with out_shardings)."""
    init, rng = _state_initializer(exp, 0)
    _, shardings = state_shardings(exp, 0)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def branch_state(exp: Experiment, state: TrainState, phase: int) -> tuple[TrainState, Any]:
    """Enters `phase`: each child expert starts as a copy of its parent (params, EMA, optimizer)."""
    parents = jnp.asarray(experts.parents_of(exp.phases[phase], exp.phases[phase - 1]))
    take = lambda tree: jax.tree.map(lambda x: x[parents], tree)
    _, shardings = state_shardings(exp, phase)
    branch = jax.jit(lambda st: st.replace(params=take(st.params), ema_params=take(st.ema_params),
                                           opt_state=take(st.opt_state), extra_emas=take(st.extra_emas)),
                     out_shardings=shardings)
    return branch(state), shardings


def make_update(exp: Experiment) -> Callable[..., tuple]:
    """The update of one model (or one expert) on its examples: loss, AdamW, EMA.

    `update(params, opt_state, ema, images, cond, sigma, noise, dropout_rng, step)` ->
    (params, opt_state, ema, loss, grad_norm, per_example_loss). An ensemble vmaps it over
    the expert axis. With `config.train.grad_accum` = A > 1 the examples are split into A
    micro-batches whose gradients are averaged (a scan: activation memory of one micro-batch).
    """
    config, model = exp.config, exp.model
    sigma_data = float(config.edm.sigma_data)
    accum = int(config.train.grad_accum)

    def losses(p: Any, images: jax.Array, cond: Any, sigma: jax.Array, noise: jax.Array, r_dropout: jax.Array):
        net = lambda xs, c_noise: model.apply({"params": p}, xs, c_noise, cond, train=True, rngs={"dropout": r_dropout})
        denoise = edm.denoiser_from_network(net, sigma_data)
        if model.lowres_residual:
            denoise = sr.residual_denoiser(denoise, cond["lowres"])
        per_example = edm.edm_loss(denoise, images, sigma, noise, sigma_data)
        return jnp.mean(per_example), per_example

    grad_fn = jax.value_and_grad(losses, has_aux=True)

    def update(params: Any, opt_state: Any, ema: Any, images: jax.Array, cond: Any, sigma: jax.Array,
               noise: jax.Array, r_dropout: jax.Array, step: jax.Array) -> tuple:
        if accum == 1:
            (loss, per_example), grads = grad_fn(params, images, cond, sigma, noise, r_dropout)
        else:
            micro = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
            xs = (micro(images), jax.tree.map(micro, cond), micro(sigma), micro(noise), jax.random.split(r_dropout, accum))

            def body(total: Any, batch: tuple) -> tuple:
                (_, per), g = grad_fn(params, *batch)
                return jax.tree.map(jnp.add, total, g), per

            grads, per_example = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), xs)
            grads = jax.tree.map(lambda g: g / accum, grads)
            per_example = per_example.reshape(-1)
            loss = jnp.mean(per_example)
        updates, opt_state = exp.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = ema_decay_at(step, float(config.train.ema_decay))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, opt_state, ema, loss, optax.global_norm(grads), per_example

    return update


def expert_train_map(config: ml_collections.ConfigDict) -> str:
    """The resolved `config.experts.train_map` ("auto": unroll on CPU, vmap on accelerators)."""
    mode = str(config.experts.train_map)
    if mode != "auto" and mode not in EXPERT_TRAIN_MAPS:
        raise ValueError(f"config.experts.train_map={mode!r}; use 'auto' or one of {EXPERT_TRAIN_MAPS}.")
    if mode == "auto":
        return "unroll" if jax.default_backend() == "cpu" else "vmap"
    return mode


# How the per-expert update runs over the stacked expert axis, all in one compiled step:
# "vmap": one batched program (convolutions become grouped convolutions, one group per
# expert); "unroll": E copies of the update in one program, each an ordinary single-model
# update on its share of the batch (E times the compile time); "scan": lax.map, one expert
# after the other inside a loop (least memory). On XLA:CPU grouped convolutions run at
# about half speed, so "auto" picks unroll there (BENCHMARKS.md) and vmap on TPU/GPU.
EXPERT_TRAIN_MAPS = ("vmap", "unroll", "scan")


def make_train_step(exp: Experiment, phase: int = 0) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """One EDM training step: encode (frozen), drop encoders, noise, weighted loss, AdamW, EMA.

    For an ensemble, the batch is split into equal shares, one per expert, each with sigmas
    drawn from that expert's interval, and the per-expert update is vmapped over the
    stacked expert axis (or `lax.map`ped, see `config.experts.train_map`): all experts train
    in one compiled step, and independently (each has its own gradient clipping and
    optimizer state, exactly as E separate runs would).
    """
    config, encoders = exp.config, exp.encoders
    p_mean, p_std = float(config.edm.p_mean), float(config.edm.p_std)
    drop_rates = config.text.drop_rates.to_dict()
    intervals = exp.phases[phase] if exp.phases else None
    update = make_update(exp)
    train_map = expert_train_map(config)
    aug_max = float(config.sr.aug_max)
    extra_decays = tuple(float(d) for d in config.train.extra_ema_decays)
    skip_nonfinite = bool(config.train.skip_nonfinite)

    def step_fn(state: TrainState, enc_params: Any, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        images = batch["image"]
        rng = jax.random.fold_in(state.rng, state.step)
        r_sigma, r_noise, r_drop, r_dropout = jax.random.split(rng, 4)
        text = {k: v for k, v in batch.items() if k not in ("image", "lowres")}
        cond = text if "t5" in batch else encoders.encode(enc_params, text)  # "t5": from the text cache
        cond = dropout_conditioning(r_drop, cond, drop_rates)
        if exp.is_sr:  # noise-conditioning augmentation of the low-res input
            lowres, aug_level = sr.augment_lowres(jax.random.fold_in(rng, 7), batch["lowres"], aug_max)
            cond = {**cond, "lowres": lowres, "aug_level": aug_level}
        noise = jax.random.normal(r_noise, images.shape, images.dtype)
        args = (state.params, state.opt_state, state.ema_params)
        if intervals is None:
            sigma = edm.sample_training_sigmas(r_sigma, (images.shape[0],), p_mean, p_std)
            params, opt_state, ema, loss, grad_norm, per_example = update(*args, images, cond, sigma, noise,
                                                                          r_dropout, state.step)
            metrics = {"loss": loss, "grad_norm": grad_norm}
        else:
            e = len(intervals)
            share = lambda x: experts.expert_shares(x, e)
            bounds = jnp.asarray(intervals, jnp.float32)
            sigma = jax.vmap(lambda k, lo, hi: experts.sample_interval_sigmas(
                k, (images.shape[0] // e,), (lo, hi), p_mean, p_std))(jax.random.split(r_sigma, e), bounds[:, 0], bounds[:, 1])
            per_expert = (*args, share(images), jax.tree.map(share, cond), sigma, share(noise),
                          jax.random.split(r_dropout, e))
            if train_map == "vmap":
                out = jax.vmap(update, in_axes=(0,) * 8 + (None,))(*per_expert, state.step)
            elif train_map == "unroll":
                outs = [update(*jax.tree.map(lambda a: a[k], per_expert), state.step) for k in range(e)]
                out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
            else:
                out = jax.lax.map(lambda xs: update(*xs, state.step), per_expert)
            params, opt_state, ema, loss, grad_norm, per_example = out
            metrics = {"loss": jnp.mean(loss), "grad_norm": jnp.sqrt(jnp.sum(grad_norm ** 2)),
                       **{f"loss/expert_{k}": loss[k] for k in range(e)}}
        metrics["lr"] = exp.schedule(state.step)
        metrics["bucket_loss_sum"], metrics["bucket_count"] = bucket_sums(per_example, sigma)
        extra = []
        for tracked, decay in zip(state.extra_emas, extra_decays):
            d = ema_decay_at(state.step, decay)
            extra.append(jax.tree.map(lambda m, p: d * m + (1.0 - d) * p, tracked, params))
        extra = tuple(extra)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                                  extra_emas=extra)
        # Decided per expert (experts are E independent runs): a NaN in one expert's share
        # of the batch must not revert the others' updates. [] for a single model, [E] else.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics["nonfinite"] = jnp.sum(~finite).astype(jnp.int32)  # models (experts) whose update was bad
        if skip_nonfinite:  # keep the old weights, optimizer and EMAs; the step still counts
            def keep_good(new: jax.Array, old: jax.Array) -> jax.Array:
                return jnp.where(finite.reshape(finite.shape + (1,) * (new.ndim - finite.ndim)), new, old)

            new_state = new_state.replace(**{name: jax.tree.map(keep_good, getattr(new_state, name), getattr(state, name))
                                             for name in ("params", "ema_params", "opt_state", "extra_emas")})
        return new_state, metrics

    return step_fn


def compile_train_step(exp: Experiment, state_shardings: Any, phase: int = 0) -> Callable:
    """jit with explicit shardings; the state is donated so it is updated in place."""
    step_fn = make_train_step(exp, phase)
    enc_sharding = jax.tree.map(lambda _: parallel.replicated(exp.mesh), exp.encoders.params)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, enc_sharding, parallel.batch_sharding(exp.mesh)),
        out_shardings=(state_shardings, parallel.replicated(exp.mesh)),
        donate_argnums=(0,),
    )


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


def restore_or_init(exp: Experiment, ckpt: Checkpointer) -> tuple[TrainState, Any, int, dict]:
    """Resumes from the newest readable checkpoint if there is one (after checking it fits).

    Returns the state, its shardings, its expert phase and what changed since the
    checkpoint's run (`resume_policy.compare`). A config that does not fit the checkpoint,
    or changes a setting that resuming depends on, is refused before anything is written;
    an unreadable latest checkpoint is set aside and the previous one used, with a warning.
    """
    if ckpt.latest_step() is None:
        return (*init_train_state(exp), 0, {})
    found: dict[str, Any] = {}

    def abstract_for(saved: dict) -> Any:
        abstract, found["shardings"], found["phase"] = checked_abstract_state(exp, ckpt, saved)
        old = saved_config(saved, ckpt.directory.parent)
        if old is not None:
            new = {**resume_policy.flatten(exp.config.to_dict()), "process_count": jax.process_count()}
            if old["process_count"] is None:  # not recorded: nothing to compare against
                new["process_count"] = None
            found["changes"] = resume_policy.check_resume(old, new, resume_policy.allowed_changes(exp.config),
                                                          str(ckpt.directory.parent))
        return abstract

    step, state, _ = ckpt.restore_latest_good(abstract_for, quarantine=True)
    changes = found.get("changes", {})
    for change in changes.get("warned", []):
        logs.warning(f"Resuming with a changed setting: {change}")
    for key, (a, b) in changes.get("accepted", {}).items():
        logs.warning(f"Resuming with {key} changed from {a!r} to {b!r}, as config.train.allow_resume_change asks.")
    logs.info(f"Resuming from {ckpt.directory} at step {step}")
    return state, found["shardings"], found["phase"], changes


class PreemptionGuard:
    """SIGTERM (a preempted TPU/GPU job) sets a flag; the loop then saves and stops cleanly.

    With several processes the flag is agreed on (any process's signal stops all), so
    every host saves the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def should_stop(self, lost_workdir: bool = False) -> tuple[bool, bool]:
        """(stop and save, stop without saving): SIGTERM on any process, or process 0 having
        lost the workdir lock to another run (which then owns the checkpoints)."""
        if jax.process_count() == 1:
            return self.requested, lost_workdir
        from jax.experimental import multihost_utils

        agreed = np.max(multihost_utils.process_allgather(np.array([self.requested, lost_workdir], np.int32)), axis=0)
        return bool(agreed[0]), bool(agreed[1])

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def summarize(history: list[dict], first_step: int, skip_nonfinite: bool) -> dict[str, float]:
    """Means over the logged steps, per-sigma-bucket losses, and the NaN/Inf check.

    Raises FloatingPointError naming the first step whose loss or gradients were not
    finite, unless those updates were skipped (then they are counted).
    """
    host = [jax.device_get(m) for m in history]
    bad = [first_step + i for i, m in enumerate(host) if int(m["nonfinite"])]
    if bad and not skip_nonfinite:
        raise FloatingPointError(
            f"Loss or gradients became NaN/Inf at step {bad[0]} (loss {float(host[bad[0] - first_step]['loss'])}, "
            f"grad norm {float(host[bad[0] - first_step]['grad_norm'])}). Lower config.train.lr, check the data, "
            "or set config.train.skip_nonfinite=True to skip such updates; the last good checkpoint is untouched."
        )
    good = [m for m in host if not int(m["nonfinite"])] or host
    scalars = {k: float(np.mean([m[k] for m in good])) for k in host[0] if np.ndim(host[0][k]) == 0
               and k != "nonfinite"}
    sums, counts = np.sum([m["bucket_loss_sum"] for m in good], 0), np.sum([m["bucket_count"] for m in good], 0)
    for name, total, count in zip(sigma_bucket_names(), sums, counts):
        if count:
            scalars[name] = float(total / count)
    scalars["skipped_nonfinite"] = float(sum(int(m["nonfinite"]) for m in host))  # skipped model/expert updates
    return scalars


def _flops_and_peak(exp: Experiment, train_step: Callable, args: tuple) -> tuple[float | None, float | None]:
    """Global FLOPs of one step (XLA's cost analysis of the lowered program, nothing compiled)
    and the per-device peak: published for TPU/GPU, a measured matmul rate on CPU."""
    from ediff_jax import flops

    try:
        step_flops = flops.flops_from_cost_analysis(train_step.lower(*args).cost_analysis())
    except Exception as e:  # cost analysis is best effort across backends
        logs.info(f"No FLOP count for MFU ({e}).")
        return None, None
    device = jax.devices()[0]
    peak = flops.device_peak_flops(device)
    if peak is None and device.platform == "cpu":
        peak = flops.measure_matmul_peak(size=1024, repeats=3)
        logs.info(f"CPU matmul peak (measured, float32): {peak / 1e9:.1f} GFLOP/s per device")
    return step_flops, peak


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, stop_after: int | None = None) -> TrainState:
    """The train loop: data -> step -> logs, checkpoints and sample grids -> final grid.

    `stop_after` ends this run early at that step, with a checkpoint (as a preempted job
    would); rerunning resumes exactly where it stopped. SIGTERM does the same at the
    step in flight, and so does `config.train.max_minutes` once that much wall time has
    passed (time-boxed runs, e.g. the 60-minute shapes benchmark). Only process 0 writes
    logs, metrics, config and sample grids, and only while it holds the workdir's lock
    (`ediff_jax.workdir_lock`): a second trainer on a live workdir is refused.
    """
    started = time.perf_counter()
    max_seconds = 60.0 * float(config.train.get("max_minutes", 0.0) or 0.0)
    if max_seconds < 0:
        raise ValueError(f"config.train.max_minutes={config.train.max_minutes} is negative; use 0 for no time budget.")
    workdir = ensure_writable_dir(workdir)
    lock = _lock_workdir(config, workdir)
    try:
        return _train(config, workdir, stop_after, started, max_seconds, lock)
    finally:
        lock.release()


def _lock_workdir(config: ml_collections.ConfigDict, workdir: epath.Path) -> WorkdirLock:
    """Process 0 locks the workdir (one writer per workdir); every process learns whether it
    got it, so that a refused multi-host job stops everywhere instead of hanging."""
    lock = WorkdirLock(workdir, take_over=bool(config.train.take_over_workdir), process_index=jax.process_index())
    if jax.process_count() == 1:
        return lock.acquire()
    from jax.experimental import multihost_utils

    try:
        lock.acquire()
        refused = None
    except WorkdirLockedError as e:
        refused = e
    if np.max(multihost_utils.process_allgather(np.int32(refused is not None))):
        lock.release()
        raise refused or WorkdirLockedError(f"Process 0 could not lock {workdir}; its output says why.")
    return lock


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, stop_after: int | None, started: float,
           max_seconds: float, lock: WorkdirLock) -> TrainState:
    """`train_and_evaluate`'s body, run while this job holds the workdir lock."""
    from ediff_jax.data import pipeline  # deferred: importing TF is slow and notebooks may not need it

    exp = build_experiment(config)
    builder = pipeline.builder_from_config(config.data)
    ckpt = Checkpointer(workdir, keep=int(config.train.keep_ckpts))
    state, shardings, phase, changes = restore_or_init(exp, ckpt)
    main_process = jax.process_index() == 0
    if main_process:
        resume_policy.write_history(workdir, config.to_json_best_effort(indent=2), {
            "start_step": int(state.step), "process_count": jax.process_count(),
            "accepted_changes": changes.get("accepted", {}), "warned_changes": changes.get("warned", [])})

    pipeline.prepare(builder)
    text_cache = load_or_build_cache(builder, exp.encoders, config.text) if config.data.text_cache else None
    start = int(state.step)
    data = train_iterator(config, builder, start)
    train_step = compile_train_step(exp, shardings, phase)
    writer = MetricWriter(workdir) if main_process else None
    meta = model_meta(config)
    num_steps = int(config.train.num_steps)
    last = num_steps if stop_after is None else min(num_steps, int(stop_after))
    log_every = int(config.train.log_every)
    skip_nonfinite = bool(config.train.skip_nonfinite)
    profile = tuple(int(s) for s in config.train.profile_steps)
    step_flops = peak = None

    bar = tqdm(total=num_steps, initial=start, desc="train", disable=not main_process, dynamic_ncols=True)
    history: list[dict] = []
    t_last, step = time.perf_counter(), start
    with PreemptionGuard() as preemption:
        for step in range(start + 1, last + 1):
            if exp.phase_at(step) != phase:  # expert branching: children start as copies of their parents
                phase = exp.phase_at(step)
                state, shardings = branch_state(exp, state, phase)
                train_step = compile_train_step(exp, shardings, phase)
                step_flops = None
                logs.info(f"Step {step}: expert phase {phase}, {exp.num_experts(phase)} experts on "
                          f"quantile intervals {exp.phases[phase]}")
            batch = next(data)
            captions = list(batch["caption"])
            text = text_cache.lookup(captions) if text_cache else exp.encoders.tokenize(captions)
            arrays = {"image": batch["image"], **text}
            if exp.is_sr:
                arrays["lowres"] = batch["lowres"]
            arrays = parallel.shard_batch(arrays, exp.mesh)
            if config.train.log_mfu and step_flops is None:
                step_flops, peak = _flops_and_peak(exp, train_step, (state, exp.encoders.params, arrays))
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(workdir / "profile"))
            state, metrics = train_step(state, exp.encoders.params, arrays)
            if profile and step == profile[-1]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                logs.info(f"Profile of steps {profile[0]}-{profile[-1]} written to {workdir / 'profile'}")
            history.append(metrics)
            bar.update(1)
            out_of_time = bool(max_seconds) and step < last and time.perf_counter() - started >= max_seconds
            preempted, lost = preemption.should_stop(lock.lost)
            if lost:  # another run took the workdir over: it owns the checkpoints now
                logs.warning(f"Step {step}: another run took over {workdir} ({lock.lost_reason}); stopping without "
                             "writing anything more.")
                last = -1
                break
            stop = preempted or out_of_time
            if step % log_every == 0 or step == last or stop:
                try:
                    scalars = summarize(history, step - len(history) + 1, skip_nonfinite)
                except FloatingPointError:
                    ckpt.close()
                    raise
                elapsed = time.perf_counter() - t_last
                scalars["steps_per_sec"] = len(history) / elapsed
                scalars["images_per_sec"] = len(history) * config.train.batch_size / elapsed
                if step_flops and peak:
                    scalars["mfu"] = step_flops * scalars["steps_per_sec"] / (peak * jax.device_count())
                if writer:
                    writer.write(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", sps=f"{scalars['steps_per_sec']:.2f}")
                history, t_last = [], time.perf_counter()
            phase_end = step in exp.phase_ends  # always checkpointed: runs resume across phase boundaries
            if step % int(config.train.ckpt_every) == 0 or step == last or phase_end or stop:
                ckpt.save(step, state, {**meta, "progress": progress_meta(exp, phase)},
                          force=step == last or phase_end or stop)
            if stop:
                why = f"time budget of {config.train.max_minutes:g} min spent" if out_of_time else "SIGTERM"
                logs.info(f"{why}: saved step {step} to {ckpt.directory}; rerun the same command to resume.")
                last = step
                break
            if config.train.sample_every and step % int(config.train.sample_every) == 0 and step != num_steps:
                _write_grid(exp, state, phase, workdir / "samples" / f"step_{step:07d}.png", writer, step)
    bar.close()
    ckpt.wait()
    if last == num_steps and (num_steps > start or not (workdir / "samples" / "final.png").exists()):
        _write_grid(exp, state, phase, workdir / "samples" / "final.png", writer, num_steps)
    ckpt.close()
    return state


def train_iterator(config: ml_collections.ConfigDict, builder: Any, start_step: int, split: str = "train") -> Any:
    """This process's training batches from `start_step` on (its share of each global batch)."""
    from ediff_jax.data import pipeline

    process_count = jax.process_count()
    return pipeline.make_train_iterator(
        builder,
        batch_size=config.train.batch_size // process_count,
        seed=int(config.seed),
        image_size=int(config.data.image_size) if config.data.resize else None,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=process_count,
        shuffle_buffer=int(config.data.shuffle_buffer),
        cache_decoded=bool(config.data.cache_decoded),
        split=split,
        **_sr_data_args(config),
    )


def _sr_data_args(config: ml_collections.ConfigDict) -> dict:
    """Input-pipeline arguments of an SR stage: crops, the low-res size, degradations."""
    if not sr.is_sr(config):
        return {}
    return {"crop_size": int(config.sr.crop_size) or None, "lowres_size": sr.lowres_train_size(config),
            "degradation": sr.degradation_config(config)}


def _sr_grid_inputs(exp: Experiment, count: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Captions, clean low-res inputs and originals of the first `count` validation images."""
    from ediff_jax.data import pipeline

    config = exp.config
    builder = pipeline.builder_from_config(config.data)
    size = int(config.data.image_size)
    batch = next(pipeline.make_eval_iterator(builder, batch_size=count, center_crop=size,
                                             image_size=size if config.data.resize else None,
                                             lowres_size=int(config.sr.lowres_size)))
    return [str(c) for c in batch["caption"]], batch["lowres"], batch["image"]


def _write_grid(exp: Experiment, state: TrainState, phase: int, path: epath.Path, writer: MetricWriter, step: int) -> None:
    """Samples with the EMA weights (the whole ensemble).

    A base model: `config.sample.prompts`, a row per prompt. An SR stage: validation
    images, a row each of [low-res input (upsampled) | samples | original].
    """
    from ediff_jax.images import to_uint8
    from ediff_jax.sampling import Sampler

    config = exp.config
    if jax.process_index() != 0 or not config.sample.prompts:  # no prompts: no grids
        return
    boundaries = progress_meta(exp, phase).get("boundaries")
    sampler = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size), steps=int(config.sample.steps),
                      sampler=config.sample.sampler, sigma_data=float(config.edm.sigma_data), boundaries=boundaries,
                      lowres_factor=sr.scale_factor(config))
    num = int(config.sample.num_per_prompt)
    if exp.is_sr:
        prompts, lowres, originals = _sr_grid_inputs(exp, len(config.sample.prompts))
        images = sampler(state.ema_params, [p for p in prompts for _ in range(num)],
                         guidance=float(config.sample.guidance), seed=int(config.seed),
                         lowres=np.repeat(lowres, num, axis=0), aug_level=float(config.sr.aug_level))
        size = images.shape[1]
        up = to_uint8(jax.image.resize(jnp.asarray(lowres), (len(prompts), size, size, 3), "nearest"))
        rows = np.concatenate([up[:, None], images.reshape(len(prompts), num, *images.shape[1:]),
                               to_uint8(originals)[:, None]], axis=1)
        images, num = rows.reshape(-1, *rows.shape[2:]), num + 2
    else:
        prompts = list(config.sample.prompts)
        images = sampler(state.ema_params, [p for p in prompts for _ in range(num)],
                         guidance=float(config.sample.guidance), seed=int(config.seed))
    grid = make_grid(images, cols=num)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path, upscale=max(1, 128 // images.shape[1]))
    (path.parent / (path.stem + "_prompts.txt")).write_text("\n".join(prompts) + "\n")
    writer.write_image(step, "samples", grid)
    logs.info(f"Wrote sample grid {path}")
