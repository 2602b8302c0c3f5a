"""The EDM training step: one model's update (loss, AdamW, EMA) and the step that runs it
for a single model or for every expert of an ensemble in one compiled program.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ediff_jax import edm, experts, parallel, sharding, sr
from ediff_jax import ema as ema_lib
from ediff_jax.metrics import BUCKET_PREFIX
from ediff_jax.text.conditioning import dropout_conditioning
from ediff_jax.training.experiment import Experiment, TrainState

# Loss is also reported per sigma bucket (edges in sigma): where in the noise range a
# change helps or hurts, which is what expert ablations are about.
SIGMA_BUCKETS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def sigma_bucket_names() -> list[str]:
    edges = ["0", *[f"{e:g}" for e in SIGMA_BUCKETS], "inf"]
    return [f"{BUCKET_PREFIX}{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]


def bucket_sums(loss: jax.Array, sigma: jax.Array, weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-bucket sums of per-example losses, and counts (aggregated over steps by the loop).

    `weight` (0 or 1 per example) leaves out the padding of uneven expert shares."""
    index = jnp.searchsorted(jnp.asarray(SIGMA_BUCKETS, jnp.float32), sigma.reshape(-1), side="right")
    one_hot = jax.nn.one_hot(index, len(SIGMA_BUCKETS) + 1, dtype=jnp.float32)
    if weight is not None:
        one_hot = one_hot * weight.reshape(-1, 1)
    return one_hot.T @ loss.reshape(-1).astype(jnp.float32), one_hot.sum(0)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with warm-up, (1+t)/(10+t) capped at `decay`: short runs still average (`ema.warmup_decay`)."""
    return ema_lib.warmup_decay(step, decay)


def make_update(exp: Experiment) -> Callable[..., tuple]:
    """The update of one model (or one expert) on its examples: loss, AdamW, EMA.

    `update(params, opt_state, ema, images, cond, sigma, noise, dropout_rng, step, weight=None)` ->
    (params, opt_state, ema, loss, grad_norm, per_example_loss). An ensemble vmaps it over
    the expert axis. With `config.train.grad_accum` = A > 1 the examples are split into A
    micro-batches whose gradients are averaged (a scan: activation memory of one micro-batch).
    `weight` (one 0 or 1 per example) makes the loss the mean over the examples of weight 1:
    an uneven expert share is padded to the others' size with examples of weight 0.
    """
    config, model = exp.config, exp.model
    sigma_data = float(config.edm.sigma_data)
    accum = int(config.train.grad_accum)

    def losses(p: Any, images: jax.Array, cond: Any, sigma: jax.Array, noise: jax.Array, r_dropout: jax.Array,
               weight: jax.Array | None = None, norm: jax.Array | None = None):
        net = lambda xs, c_noise: model.apply({"params": p}, xs, c_noise, cond, train=True, rngs={"dropout": r_dropout})
        denoise = edm.denoiser_from_network(net, sigma_data)
        if model.lowres_residual:
            denoise = sr.residual_denoiser(denoise, cond["lowres"])
        per_example = edm.edm_loss(denoise, images, sigma, noise, sigma_data)
        if weight is None:
            return jnp.mean(per_example), per_example
        return jnp.sum(per_example * weight) / norm, per_example  # norm: the real examples per micro-batch

    grad_fn = jax.value_and_grad(losses, has_aux=True)

    def update(params: Any, opt_state: Any, ema: Any, images: jax.Array, cond: Any, sigma: jax.Array,
               noise: jax.Array, r_dropout: jax.Array, step: jax.Array, weight: jax.Array | None = None) -> tuple:
        # Each micro-batch's loss is sum(w l) / (W / A), W the share's real examples: the average of the
        # A micro-batch gradients is then the gradient of the share's mean over its real examples.
        norm = None if weight is None else jnp.sum(weight) / accum
        if accum == 1:
            (loss, per_example), grads = grad_fn(params, images, cond, sigma, noise, r_dropout, weight, norm)
        else:
            micro = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
            xs = (micro(images), jax.tree.map(micro, cond), micro(sigma), micro(noise),
                  jax.random.split(r_dropout, accum), None if weight is None else micro(weight))

            def body(total: Any, batch: tuple) -> tuple:
                (_, per), g = grad_fn(params, *batch, norm)
                return jax.tree.map(jnp.add, total, g), per

            grads, per_example = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), xs)
            grads = jax.tree.map(lambda g: g / accum, grads)
            per_example = per_example.reshape(-1)
            loss = jnp.mean(per_example) if weight is None else jnp.sum(per_example * weight) / jnp.sum(weight)
        updates, opt_state = exp.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = ema_lib.ema_step(ema, params, step, float(config.train.ema_decay))
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
    drawn from that expert's interval (when E does not divide the batch, the shares are padded
    with examples of weight 0 and the shorter ones rotate over the experts,
    `experts.expert_shares`), and the per-expert update is vmapped over the
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
    power_gammas = tuple(float(g) for g in config.train.posthoc_ema.gammas)
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
            weight = None  # every example counts
            sigma = edm.sample_training_sigmas(r_sigma, (images.shape[0],), p_mean, p_std)
            params, opt_state, ema, loss, grad_norm, per_example = update(*args, images, cond, sigma, noise,
                                                                          r_dropout, state.step)
            metrics = {"loss": loss, "grad_norm": grad_norm}
        else:
            e, rows = len(intervals), images.shape[0]
            offset = state.step % e  # which experts get an uneven split's shorter shares rotates every step
            share = lambda x: experts.expert_shares(x, e, offset)
            weight = experts.expert_share_weights(rows, e, offset)  # None: an even split
            bounds = jnp.asarray(intervals, jnp.float32)
            sigma = jax.vmap(lambda k, lo, hi: experts.sample_interval_sigmas(
                k, (-(-rows // e),), (lo, hi), p_mean, p_std))(jax.random.split(r_sigma, e), bounds[:, 0], bounds[:, 1])
            per_expert = (*args, share(images), jax.tree.map(share, cond), sigma, share(noise),
                          jax.random.split(r_dropout, e))
            call = lambda xs: update(*xs[:8], state.step, *xs[8:])
            per_expert = per_expert if weight is None else (*per_expert, weight)
            if train_map == "vmap":
                out = jax.vmap(call)(per_expert)
            elif train_map == "unroll":
                outs = [call(jax.tree.map(lambda a: a[k], per_expert)) for k in range(e)]
                out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
            else:
                out = jax.lax.map(call, per_expert)
            params, opt_state, ema, loss, grad_norm, per_example = out
            metrics = {"loss": jnp.mean(loss), "grad_norm": jnp.sqrt(jnp.sum(grad_norm ** 2)),
                       **{f"loss/expert_{k}": loss[k] for k in range(e)}}
        metrics["lr"] = exp.schedule(state.step)
        metrics["bucket_loss_sum"], metrics["bucket_count"] = bucket_sums(per_example, sigma, weight)
        extra = tuple(ema_lib.ema_step(tracked, params, state.step, decay)
                      for tracked, decay in zip(state.extra_emas, extra_decays))
        power = tuple(ema_lib.power_ema_update(tracked, params, state.step, gamma)
                      for tracked, gamma in zip(state.power_emas, power_gammas))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                                  extra_emas=extra, power_emas=power)
        # Decided per expert (experts are E independent runs): a NaN in one expert's share
        # of the batch must not revert the others' updates. [] for a single model, [E] else.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics["nonfinite"] = jnp.sum(~finite).astype(jnp.int32)  # models (experts) whose update was bad
        if skip_nonfinite:  # keep the old weights, optimizer and EMAs; the step still counts
            def keep_good(new: jax.Array, old: jax.Array) -> jax.Array:
                return jnp.where(finite.reshape(finite.shape + (1,) * (new.ndim - finite.ndim)), new, old)

            new_state = new_state.replace(**{name: jax.tree.map(keep_good, getattr(new_state, name), getattr(state, name))
                                             for name in ("params", "ema_params", "opt_state", "extra_emas",
                                                          "power_emas")})
        return new_state, metrics

    return step_fn


def compile_train_step(exp: Experiment, state_shardings: Any, phase: int = 0) -> Callable:
    """jit with explicit shardings; the state is donated so it is updated in place."""
    step_fn = make_train_step(exp, phase)
    enc_sharding = sharding.encoder_shardings(exp.encoders.params, exp.mesh, int(exp.config.sharding.fsdp_min_size))
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, enc_sharding, parallel.batch_sharding(exp.mesh)),
        out_shardings=(state_shardings, parallel.replicated(exp.mesh)),
        donate_argnums=(0,),
    )
