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
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ediff_jax import edm, logs, parallel
from ediff_jax.checkpoints import Checkpointer, abstract_with_shardings
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
    return {"stage": "base", "model": config.model.to_dict(), "image_size": int(config.data.image_size)}


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with warm-up, (1+t)/(10+t) capped at `decay`: short runs still average."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


@dataclasses.dataclass
class Experiment:
    """The pieces built from a config: model, text encoders, mesh and optimizer."""

    config: ml_collections.ConfigDict
    model: nn.Module
    encoders: TextEncoders
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = int(self.config.data.image_size)
        return (size, size, 3)

    def example_cond(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        tokens = self.encoders.tokenize([""] * batch)
        return jax.eval_shape(self.encoders.encode, self.encoders.params, tokens)


def build_experiment(config: ml_collections.ConfigDict, devices: list | None = None) -> Experiment:
    """Validates the config and builds everything that does not depend on the workdir."""
    validate_config(config)
    model = build_model(config.model)
    check_image_size(model, int(config.data.image_size))
    mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
    dp = parallel.data_parallel_size(mesh)
    if config.train.batch_size % dp:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by the {dp} data-parallel "
            "devices; pick a multiple."
        )
    encoders = load_text_encoders(config.text)
    tx, schedule = make_optimizer(config.train)
    return Experiment(config, model, encoders, mesh, tx, schedule)


def _state_initializer(exp: Experiment) -> tuple[Callable[[jax.Array], TrainState], jax.Array]:
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), exp.example_cond(1))
    x = jnp.zeros((1, *exp.image_shape), jnp.float32)

    def init(rng: jax.Array) -> TrainState:
        params = exp.model.init(jax.random.fold_in(rng, 0), x, jnp.zeros((1,)), cond)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=exp.tx.init(params),
            rng=rng,
        )

    return init, jax.random.PRNGKey(int(exp.config.seed))


def state_shardings(exp: Experiment) -> tuple[TrainState, Any]:
    """The abstract train state (shapes only, nothing allocated) and its shardings."""
    init, rng = _state_initializer(exp)
    abstract = jax.eval_shape(init, rng)
    return abstract, jax.tree.map(lambda _: parallel.replicated(exp.mesh), abstract)


def init_train_state(exp: Experiment) -> tuple[TrainState, Any]:
    """Creates the train state already sharded (jit of init with out_shardings)."""
    init, rng = _state_initializer(exp)
    _, shardings = state_shardings(exp)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def make_train_step(exp: Experiment) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """One EDM training step: encode (frozen), drop encoders, noise, weighted loss, AdamW, EMA."""
    config, model, encoders = exp.config, exp.model, exp.encoders
    sigma_data = float(config.edm.sigma_data)
    drop_rates = config.text.drop_rates.to_dict()

    def step_fn(state: TrainState, enc_params: Any, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        images = batch["image"]
        rng = jax.random.fold_in(state.rng, state.step)
        r_sigma, r_noise, r_drop, r_dropout = jax.random.split(rng, 4)
        if "t5" in batch:  # precomputed embeddings from the text cache
            cond = {k: v for k, v in batch.items() if k != "image"}
        else:
            cond = encoders.encode(enc_params, {k: v for k, v in batch.items() if k != "image"})
        cond = dropout_conditioning(r_drop, cond, drop_rates)
        sigma = edm.sample_training_sigmas(r_sigma, (images.shape[0],), config.edm.p_mean, config.edm.p_std)
        noise = jax.random.normal(r_noise, images.shape, images.dtype)

        def loss_fn(params: Any) -> jax.Array:
            net = lambda xs, c_noise: model.apply(
                {"params": params}, xs, c_noise, cond, train=True, rngs={"dropout": r_dropout}
            )
            return jnp.mean(edm.edm_loss(edm.denoiser_from_network(net, sigma_data), images, sigma, noise, sigma_data))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = exp.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, float(config.train.ema_decay))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": exp.schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, metrics

    return step_fn


def compile_train_step(exp: Experiment, state_shardings: Any) -> Callable:
    """jit with explicit shardings; the state is donated so it is updated in place."""
    step_fn = make_train_step(exp)
    enc_sharding = jax.tree.map(lambda _: parallel.replicated(exp.mesh), exp.encoders.params)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, enc_sharding, parallel.batch_sharding(exp.mesh)),
        out_shardings=(state_shardings, parallel.replicated(exp.mesh)),
        donate_argnums=(0,),
    )


def restore_or_init(exp: Experiment, ckpt: Checkpointer) -> tuple[TrainState, Any]:
    """Resumes from the latest checkpoint if there is one (after checking it fits)."""
    ckpt.check_compatible(model_meta(exp.config))
    if ckpt.latest_step() is None:
        return init_train_state(exp)
    logs.info(f"Resuming from {ckpt.directory} at step {ckpt.latest_step()}")
    abstract, shardings = state_shardings(exp)
    return ckpt.restore(abstract_with_shardings(abstract, shardings)), shardings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """The train loop: data -> step -> logs, checkpoints and sample grids -> final grid."""
    from ediff_jax.data import pipeline  # deferred: importing TF is slow and notebooks may not need it
    from ediff_jax.sampling import Sampler

    workdir = ensure_writable_dir(workdir)
    exp = build_experiment(config)
    builder = pipeline.get_dataset_builder(config.data.name, config.data.data_dir)
    ckpt = Checkpointer(workdir, keep=int(config.train.keep_ckpts))
    state, shardings = restore_or_init(exp, ckpt)
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
    train_step = compile_train_step(exp, shardings)
    writer = MetricWriter(workdir)
    sampler = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size), steps=int(config.sample.steps),
                      sampler=config.sample.sampler, sigma_data=float(config.edm.sigma_data))
    meta = model_meta(config)
    num_steps = int(config.train.num_steps)
    log_every = int(config.train.log_every)

    bar = tqdm(total=num_steps, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    history: list[dict] = []
    t_last, step = time.perf_counter(), start
    for step in range(start + 1, num_steps + 1):
        batch = next(data)
        captions = list(batch["caption"])
        text = text_cache.lookup(captions) if text_cache else exp.encoders.tokenize(captions)
        arrays = parallel.shard_batch({"image": batch["image"], **text}, exp.mesh)
        state, metrics = train_step(state, exp.encoders.params, arrays)
        history.append(metrics)
        bar.update(1)
        if step % log_every == 0 or step == num_steps:
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
        if step % int(config.train.ckpt_every) == 0 or step == num_steps:
            ckpt.save(step, state, meta, force=step == num_steps)
        if config.train.sample_every and step % int(config.train.sample_every) == 0 and step != num_steps:
            _write_grid(sampler, state, config, workdir / "samples" / f"step_{step:07d}.png", writer, step)
    bar.close()
    ckpt.wait()
    if num_steps > start or not (workdir / "samples" / "final.png").exists():
        _write_grid(sampler, state, config, workdir / "samples" / "final.png", writer, num_steps)
    ckpt.close()
    return state


def _write_grid(sampler: Any, state: TrainState, config: ml_collections.ConfigDict, path: Path,
                writer: MetricWriter, step: int) -> None:
    """Samples `config.sample.prompts` with the EMA weights; one row per prompt."""
    if jax.process_index() != 0:
        return
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
