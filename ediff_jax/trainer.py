"""Training library: train state, the jit-compiled EDM step, and the train loop.

`python -m ediff_jax.train` is a thin wrapper over `train_and_evaluate`; everything here
is importable from a notebook.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ediff_jax import edm, experts, logs, parallel
from ediff_jax.checkpoints import CheckpointMismatchError, Checkpointer, abstract_with_shardings
from ediff_jax.config_utils import validate_config
from ediff_jax.images import ensure_writable_dir, make_grid, save_png
from ediff_jax.metrics import MetricWriter
from ediff_jax.models import build_model, check_image_size
from ediff_jax.text.cache import load_or_build_cache
from ediff_jax.text.conditioning import TextEncoders, dropout_conditioning, load_text_encoders


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. `rng` is a raw uint32 key so it checkpoints as data."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


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


def model_meta(config: ml_collections.ConfigDict) -> dict:
    """What a checkpoint belongs to; compared on resume and when sampling."""
    return {
        "stage": "base",
        "model": config.model.to_dict(),
        "image_size": int(config.data.image_size),
        "experts": {"phases": [[list(iv) for iv in phase] for phase in config.experts.phases]},
    }


def progress_meta(exp: "Experiment", phase: int) -> dict:
    """The part of a checkpoint's metadata that changes during a run (not compared on resume)."""
    out: dict[str, Any] = {"phase": phase}
    if exp.phases:
        out["boundaries"] = experts.boundaries_from_intervals(
            exp.phases[phase], exp.config.edm.p_mean, exp.config.edm.p_std).tolist()
    return out


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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = int(self.config.data.image_size)
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
        tokens = self.encoders.tokenize([""] * batch)
        return jax.eval_shape(self.encoders.encode, self.encoders.params, tokens)


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
        if config.train.batch_size % len(phase):
            raise ValueError(f"config.train.batch_size={config.train.batch_size} must be divisible by the "
                             f"{len(phase)} experts of phase {i}, which each take an equal share.")
    return phases, list(np.cumsum(steps))


def build_experiment(config: ml_collections.ConfigDict, devices: list | None = None) -> Experiment:
    """Validates the config and builds everything that does not depend on the workdir."""
    validate_config(config)
    model = build_model(config.model)
    check_image_size(model, int(config.data.image_size))
    phases, phase_ends = _expert_phases(config)
    mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
    dp = parallel.data_parallel_size(mesh)
    if config.train.batch_size % dp:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by the {dp} data-parallel "
            "devices; pick a multiple."
        )
    encoders = load_text_encoders(config.text)
    tx, schedule = make_optimizer(config.train)
    return Experiment(config, model, encoders, mesh, tx, schedule, phases, phase_ends)


def _state_initializer(exp: Experiment, phase: int) -> tuple[Callable[[jax.Array], TrainState], jax.Array]:
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), exp.example_cond(1))
    x = jnp.zeros((1, *exp.image_shape), jnp.float32)
    e = exp.num_experts(phase)

    def init(rng: jax.Array) -> TrainState:
        params = exp.model.init(jax.random.fold_in(rng, 0), x, jnp.zeros((1,)), cond)["params"]
        if e is None:
            opt_state = exp.tx.init(params)
        else:  # identical experts: branching from a shared model is a copy
            params = experts.stack_experts([params] * e)
            opt_state = jax.vmap(exp.tx.init)(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=opt_state, rng=rng)

    return init, jax.random.PRNGKey(int(exp.config.seed))


def _shardings_for(exp: Experiment, abstract: TrainState, stacked: bool) -> Any:
    """Replicated, except that a stacked expert axis is split over an `expert` mesh axis if any."""
    mesh = exp.mesh
    rep = parallel.replicated(mesh)
    n = mesh.shape.get("expert", 1)

    def leaf(x: Any) -> Any:
        if stacked and n > 1 and x.ndim >= 1 and x.shape[0] % n == 0:
            return NamedSharding(mesh, PartitionSpec("expert"))
        return rep

    per_expert = jax.tree.map(leaf, (abstract.params, abstract.ema_params, abstract.opt_state))
    return TrainState(step=rep, params=per_expert[0], ema_params=per_expert[1], opt_state=per_expert[2], rng=rep)


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
                                           opt_state=take(st.opt_state)), out_shardings=shardings)
    return branch(state), shardings


def make_update(exp: Experiment) -> Callable[..., tuple]:
    """The update of one model (or one expert) on its examples: loss, AdamW, EMA.

    `update(params, opt_state, ema, images, cond, sigma, noise, dropout_rng, step)` ->
    (params, opt_state, ema, loss, grad_norm). An ensemble vmaps it over the expert axis.
    """
    config, model = exp.config, exp.model
    sigma_data = float(config.edm.sigma_data)

    def update(params: Any, opt_state: Any, ema: Any, images: jax.Array, cond: Any, sigma: jax.Array,
               noise: jax.Array, r_dropout: jax.Array, step: jax.Array) -> tuple:
        def loss_fn(p: Any) -> jax.Array:
            net = lambda xs, c_noise: model.apply({"params": p}, xs, c_noise, cond, train=True,
                                                  rngs={"dropout": r_dropout})
            return jnp.mean(edm.edm_loss(edm.denoiser_from_network(net, sigma_data), images, sigma, noise, sigma_data))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = exp.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = ema_decay_at(step, float(config.train.ema_decay))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, opt_state, ema, loss, optax.global_norm(grads)

    return update


def expert_train_map(config: ml_collections.ConfigDict) -> str:
    mode = str(config.experts.train_map)
    if mode not in ("vmap", "scan"):
        raise ValueError(f"config.experts.train_map={mode!r}; use 'vmap' or 'scan'.")
    return mode


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

    def step_fn(state: TrainState, enc_params: Any, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        images = batch["image"]
        rng = jax.random.fold_in(state.rng, state.step)
        r_sigma, r_noise, r_drop, r_dropout = jax.random.split(rng, 4)
        text = {k: v for k, v in batch.items() if k != "image"}
        cond = text if "t5" in batch else encoders.encode(enc_params, text)  # "t5": from the text cache
        cond = dropout_conditioning(r_drop, cond, drop_rates)
        noise = jax.random.normal(r_noise, images.shape, images.dtype)
        args = (state.params, state.opt_state, state.ema_params)
        if intervals is None:
            sigma = edm.sample_training_sigmas(r_sigma, (images.shape[0],), p_mean, p_std)
            params, opt_state, ema, loss, grad_norm = update(*args, images, cond, sigma, noise, r_dropout, state.step)
            metrics = {"loss": loss, "grad_norm": grad_norm}
        else:
            e = len(intervals)
            share = lambda x: x.reshape(e, x.shape[0] // e, *x.shape[1:])
            bounds = jnp.asarray(intervals, jnp.float32)
            sigma = jax.vmap(lambda k, lo, hi: experts.sample_interval_sigmas(
                k, (images.shape[0] // e,), (lo, hi), p_mean, p_std))(jax.random.split(r_sigma, e), bounds[:, 0], bounds[:, 1])
            per_expert = (*args, share(images), jax.tree.map(share, cond), sigma, share(noise),
                          jax.random.split(r_dropout, e))
            if train_map == "vmap":
                out = jax.vmap(update, in_axes=(0,) * 8 + (None,))(*per_expert, state.step)
            else:
                out = jax.lax.map(lambda xs: update(*xs, state.step), per_expert)
            params, opt_state, ema, loss, grad_norm = out
            metrics = {"loss": jnp.mean(loss), "grad_norm": jnp.sqrt(jnp.sum(grad_norm ** 2)),
                       **{f"loss/expert_{k}": loss[k] for k in range(e)}}
        metrics["lr"] = exp.schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
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


def restore_or_init(exp: Experiment, ckpt: Checkpointer) -> tuple[TrainState, Any, int]:
    """Resumes from the latest checkpoint if there is one (after checking it fits).

    Returns the state, its shardings and its expert phase.
    """
    saved = ckpt.read_meta()
    check_checkpoint_kind(saved, exp)
    ckpt.check_compatible(model_meta(exp.config))
    if ckpt.latest_step() is None:
        return (*init_train_state(exp), 0)
    phase = int(saved.get("progress", {}).get("phase", 0))
    logs.info(f"Resuming from {ckpt.directory} at step {ckpt.latest_step()}")
    abstract, shardings = state_shardings(exp, phase)
    return ckpt.restore(abstract_with_shardings(abstract, shardings)), shardings, phase


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, stop_after: int | None = None) -> TrainState:
    """The train loop: data -> step -> logs, checkpoints and sample grids -> final grid.

    `stop_after` ends this run early at that step, with a checkpoint (as a preempted job
    would); rerunning resumes exactly where it stopped.
    """
    from ediff_jax.data import pipeline  # deferred: importing TF is slow and notebooks may not need it

    workdir = ensure_writable_dir(workdir)
    exp = build_experiment(config)
    builder = pipeline.get_dataset_builder(config.data.name, config.data.data_dir)
    ckpt = Checkpointer(workdir, keep=int(config.train.keep_ckpts))
    state, shardings, phase = restore_or_init(exp, ckpt)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    pipeline.prepare(builder)
    text_cache = load_or_build_cache(builder, exp.encoders, config.text) if config.data.text_cache else None
    start = int(state.step)
    process_count = jax.process_count()
    data = pipeline.make_train_iterator(
        builder,
        batch_size=config.train.batch_size // process_count,
        seed=int(config.seed),
        image_size=int(config.data.image_size),
        start_step=start,
        process_index=jax.process_index(),
        process_count=process_count,
        shuffle_buffer=int(config.data.shuffle_buffer),
    )
    train_step = compile_train_step(exp, shardings, phase)
    writer = MetricWriter(workdir)
    meta = model_meta(config)
    num_steps = int(config.train.num_steps)
    last = num_steps if stop_after is None else min(num_steps, int(stop_after))
    log_every = int(config.train.log_every)

    bar = tqdm(total=num_steps, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    history: list[dict] = []
    t_last, step = time.perf_counter(), start
    for step in range(start + 1, last + 1):
        if exp.phase_at(step) != phase:  # expert branching: children start as copies of their parents
            phase = exp.phase_at(step)
            state, shardings = branch_state(exp, state, phase)
            train_step = compile_train_step(exp, shardings, phase)
            logs.info(f"Step {step}: expert phase {phase}, {exp.num_experts(phase)} experts on "
                      f"quantile intervals {exp.phases[phase]}")
        batch = next(data)
        captions = list(batch["caption"])
        text = text_cache.lookup(captions) if text_cache else exp.encoders.tokenize(captions)
        arrays = parallel.shard_batch({"image": batch["image"], **text}, exp.mesh)
        state, metrics = train_step(state, exp.encoders.params, arrays)
        history.append(metrics)
        bar.update(1)
        if step % log_every == 0 or step == last:
            scalars = {k: float(np.mean([jax.device_get(m[k]) for m in history])) for k in history[0]}
            if not np.isfinite(scalars["loss"]):
                ckpt.close()
                raise FloatingPointError(
                    f"Loss became {scalars['loss']} by step {step} (mean over the last {len(history)} steps). "
                    "Lower config.train.lr or check the data; the last good checkpoint is untouched."
                )
            elapsed = time.perf_counter() - t_last
            scalars["steps_per_sec"] = len(history) / elapsed
            scalars["images_per_sec"] = len(history) * config.train.batch_size / elapsed
            writer.write(step, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", sps=f"{scalars['steps_per_sec']:.2f}")
            history, t_last = [], time.perf_counter()
        phase_end = step in exp.phase_ends  # always checkpointed: runs resume across phase boundaries
        if step % int(config.train.ckpt_every) == 0 or step == last or phase_end:
            ckpt.save(step, state, {**meta, "progress": progress_meta(exp, phase)}, force=step == last or phase_end)
        if config.train.sample_every and step % int(config.train.sample_every) == 0 and step != num_steps:
            _write_grid(exp, state, phase, workdir / "samples" / f"step_{step:07d}.png", writer, step)
    bar.close()
    ckpt.wait()
    if last == num_steps and (num_steps > start or not (workdir / "samples" / "final.png").exists()):
        _write_grid(exp, state, phase, workdir / "samples" / "final.png", writer, num_steps)
    ckpt.close()
    return state


def _write_grid(exp: Experiment, state: TrainState, phase: int, path: Path, writer: MetricWriter, step: int) -> None:
    """Samples `config.sample.prompts` with the EMA weights (the whole ensemble); a row per prompt."""
    from ediff_jax.sampling import Sampler

    if jax.process_index() != 0:
        return
    config = exp.config
    boundaries = progress_meta(exp, phase).get("boundaries")
    sampler = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size), steps=int(config.sample.steps),
                      sampler=config.sample.sampler, sigma_data=float(config.edm.sigma_data), boundaries=boundaries)
    prompts = list(config.sample.prompts)
    num = int(config.sample.num_per_prompt)
    images = sampler(state.ema_params, [p for p in prompts for _ in range(num)], guidance=float(config.sample.guidance),
                     seed=int(config.seed))
    grid = make_grid(images, cols=num)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path, upscale=max(1, 128 // images.shape[1]))
    (path.parent / (path.stem + "_prompts.txt")).write_text("\n".join(prompts) + "\n")
    writer.write_image(step, "samples", grid)
    logs.info(f"Wrote sample grid {path}")
