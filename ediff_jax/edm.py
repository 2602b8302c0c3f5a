"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models") as pure, jit-friendly functions.

Everything here is a plain function of arrays so it can be used from notebooks, training
steps and samplers alike:

* preconditioning (`precondition`, `denoiser_from_network`) — Table 1 of the paper, which
  keeps the network's input and training target at unit variance for every noise level;
* training (`sample_training_sigmas`, `loss_weight`, `edm_loss`) — log-normal noise levels
  and the weighting lambda(sigma) = 1 / c_out(sigma)^2 that makes the loss an unweighted
  MSE on the network output;
* sampling (`karras_sigmas`, `heun_sample`, `euler_sample`, `dpmpp_2m_sample`) — Algorithm 2 of the paper,
  run as a single `lax.fori_loop` so one sampling run is one compiled program;
* classifier-free guidance (`guided_denoiser`) — both branches in one batched call.

Conventions: `x` is a batch with the batch axis first; a "denoiser" is D(x; sigma), the
model's estimate of the clean data, never the noise.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]

__all__ = [
    "precondition",
    "sample_training_sigmas",
    "loss_weight",
    "denoiser_from_network",
    "edm_loss",
    "karras_sigmas",
    "heun_sample",
    "euler_sample",
    "dpmpp_2m_sample",
    "SAMPLERS",
    "check_sampler",
    "guided_denoiser",
]


# --------------------------------------------------------------------------------------
# Preconditioning and training
# --------------------------------------------------------------------------------------


def _float_dtype(*xs: Any) -> jnp.dtype:
    """At least float32 for the EDM coefficients: sigma spans 0.002..80, too wide for bf16."""
    return jnp.result_type(jnp.float32, *[jnp.asarray(x).dtype for x in xs])


def precondition(sigma: Any, sigma_data: float = 0.5) -> Tuple[Array, Array, Array, Array]:
    """EDM preconditioning coefficients (c_skip, c_out, c_in, c_noise) of Table 1.

    c_in scales the noisy input x = x0 + sigma*n to unit variance, and c_skip/c_out are
    chosen so the network's training target (x0 - c_skip x) / c_out has unit variance
    with c_out as small as possible, which is why D = c_skip x + c_out F works across the
    whole sigma range. c_noise = log(sigma)/4 is the noise label fed to the network
    (-inf at sigma = 0, which samplers never ask for). Works element-wise on any shape.
    """
    sigma = jnp.asarray(sigma, dtype=_float_dtype(sigma))
    sd2 = jnp.square(sigma_data)
    total = jnp.square(sigma) + sd2
    c_skip = sd2 / total
    c_out = sigma * sigma_data * jax.lax.rsqrt(total)
    c_in = jax.lax.rsqrt(total)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def sample_training_sigmas(
    rng: Array, shape: Any, p_mean: float = -1.2, p_std: float = 1.2
) -> Array:
    """Training noise levels, log-normal: ln(sigma) ~ N(p_mean, p_std^2) (EDM Sec. 5).

    The default concentrates training on the intermediate sigmas where the loss can still
    be reduced; very small and very large sigmas are either trivial or hopeless.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape, dtype=jnp.float32))


def loss_weight(sigma: Any, sigma_data: float = 0.5) -> Array:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma*sd)^2 = 1 / c_out^2.

    With this weight lambda*|D - x0|^2 equals |F - F_target|^2, i.e. every noise level
    contributes a unit-scale loss on the raw network output.
    """
    sigma = jnp.asarray(sigma, dtype=_float_dtype(sigma))
    return (jnp.square(sigma) + jnp.square(sigma_data)) / jnp.square(sigma * sigma_data)


def _per_example(sigma: Any, x: Array, what: str = "sigma") -> Array:
    """Reshape a scalar or per-example [B] sigma so it broadcasts against x [B, ...]."""
    sigma = jnp.asarray(sigma, dtype=_float_dtype(sigma, x))
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1:
        chex.assert_axis_dimension(x, 0, sigma.shape[0])
        return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
    raise ValueError(
        f"{what} must be a scalar or have shape [B] (one per example); got shape {sigma.shape}"
        f" for x of shape {x.shape}"
    )


def denoiser_from_network(net_fn: Callable[..., Array], sigma_data: float = 0.5) -> Callable[..., Array]:
    """Wrap a raw network F into the preconditioned denoiser D of EDM eq. (7).

    `net_fn(x_scaled, c_noise, *args, **kwargs)` gets the unit-variance input c_in*x (in
    x's dtype) and the noise labels c_noise, always of shape [B] so the network need not
    special-case a scalar sigma. The returned `D(x, sigma, *args, **kwargs)` accepts sigma
    as a scalar shared by the batch or per example [B]; extra arguments (conditioning,
    `train=...`, rngs) are passed through unchanged.
    """

    def denoise(x: Array, sigma: Any, *args: Any, **kwargs: Any) -> Array:
        x = jnp.asarray(x)
        sigma_b = _per_example(sigma, x)
        c_skip, c_out, c_in, c_noise = precondition(sigma_b, sigma_data)
        c_noise = jnp.broadcast_to(c_noise.reshape(-1), (x.shape[0],))
        f = net_fn((c_in * x).astype(x.dtype), c_noise, *args, **kwargs)
        chex.assert_shape(f, x.shape)
        return c_skip * x + c_out * f

    return denoise


def edm_loss(
    denoise: Callable[[Array, Array], Array],
    x0: Array,
    sigma: Any,
    noise: Array,
    sigma_data: float = 0.5,
) -> Array:
    """Per-example EDM loss [B]: mean over non-batch dims of lambda(sigma)*(D(x0+sigma n) - x0)^2.

    `denoise(x, sigma)` is called with the per-example sigma as given (scalar or [B]);
    bind conditioning with a closure. `noise` is standard normal (not pre-scaled by
    sigma) so callers control the rng. Returned per example so callers can mask or
    reweight before averaging.
    """
    x0 = jnp.asarray(x0)
    chex.assert_equal_shape([x0, noise])
    sigma_b = _per_example(sigma, x0)
    d = denoise(x0 + (sigma_b * noise).astype(x0.dtype), jnp.asarray(sigma))
    chex.assert_shape(d, x0.shape)
    err = jnp.square(d.astype(sigma_b.dtype) - x0.astype(sigma_b.dtype))
    per_example = jnp.mean(loss_weight(sigma_b, sigma_data) * err, axis=tuple(range(1, x0.ndim)))
    return jnp.broadcast_to(per_example, (x0.shape[0],))


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Array:
    """EDM time steps (eq. 5): num_steps + 1 descending float32 values, the last exactly 0.

    Interpolating linearly in sigma^(1/rho) with rho = 7 spends most steps at small sigma,
    where the ODE's curvature (and so the truncation error) is largest. num_steps is
    static; sigma_min/sigma_max/rho may be traced.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
    if all(isinstance(v, (int, float)) for v in (sigma_min, sigma_max, rho)):
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        if rho <= 0:
            raise ValueError(f"rho must be positive; got {rho}")
    inv_rho = 1.0 / jnp.asarray(rho, jnp.float32)
    if num_steps == 1:
        ramp = jnp.zeros((1,), jnp.float32)
    else:
        ramp = jnp.arange(num_steps, dtype=jnp.float32) / (num_steps - 1)
    lo = jnp.asarray(sigma_min, jnp.float32) ** inv_rho
    hi = jnp.asarray(sigma_max, jnp.float32) ** inv_rho
    sigmas = (hi + ramp * (lo - hi)) ** jnp.asarray(rho, jnp.float32)
    # Pin the endpoints so they are exact rather than pow(pow(.)) round-trips.
    sigmas = sigmas.at[0].set(jnp.asarray(sigma_max, jnp.float32))
    if num_steps > 1:
        sigmas = sigmas.at[-1].set(jnp.asarray(sigma_min, jnp.float32))
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def _concrete_value(x: Any) -> Optional[np.ndarray]:
    """The value of x as numpy if it is known at trace time, else None (x is a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _validate_sigmas(sigmas: Any) -> Array:
    sigmas = jnp.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            "sigmas must be a 1-D schedule with at least 2 entries (sigma_max ... 0); "
            f"got shape {sigmas.shape}"
        )
    if not jnp.issubdtype(sigmas.dtype, jnp.floating):
        sigmas = sigmas.astype(jnp.float32)
    value = _concrete_value(sigmas)
    if value is not None:
        if not np.all(np.isfinite(value)):
            raise ValueError(f"sigmas must be finite; got {value}")
        if not np.all(np.diff(value) < 0):
            raise ValueError(f"sigmas must be strictly descending; got {value}")
        if value[-1] != 0:
            raise ValueError(
                f"sigmas must end with exactly 0 (the final Euler step lands on data); "
                f"got last value {value[-1]!r}. Use karras_sigmas(...) or append 0."
            )
    return sigmas


class _Progress:
    """Host-side tqdm bar fed by `jax.debug.callback` from inside the sampling loop.

    Unordered callbacks are used (ordered effects are not allowed under vmap or with
    sharded computations), so the bar trusts a call counter rather than the step index:
    it opens on the first callback of a run and closes after `total` callbacks. The
    object is created at trace time and is therefore reused by every call of a jitted
    sampler, which is why it resets itself after each complete run.
    """

    def __init__(self, total: int, desc: str):
        self.total, self.desc = total, desc
        self.bar = None
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, *_: Any) -> None:
        from tqdm.auto import tqdm

        with self.lock:
            if self.bar is None:
                self.bar = tqdm(total=self.total, desc=self.desc, leave=True)
                self.count = 0
            self.bar.update(1)
            self.count += 1
            if self.count >= self.total:
                self.bar.close()
                self.bar = None


def _sample(
    order: int,
    denoise_fn: DenoiseFn,
    x_init: Array,
    sigmas: Any,
    rng: Optional[Array],
    s_churn: Any,
    s_tmin: Any,
    s_tmax: Any,
    s_noise: Any,
    progress: bool,
) -> Array:
    """Algorithm 2 of Karras et al. (order 2) or its Euler variant (order 1) in one loop."""
    x_init = jnp.asarray(x_init)
    if not jnp.issubdtype(x_init.dtype, jnp.floating):
        raise ValueError(f"x_init must be a floating array; got dtype {x_init.dtype}")
    sigmas = _validate_sigmas(sigmas)
    num_steps = sigmas.shape[0] - 1
    out_dtype = x_init.dtype
    work_dtype = _float_dtype(x_init, sigmas)
    sigmas = sigmas.astype(work_dtype)

    churn_value = _concrete_value(s_churn)
    if churn_value is not None:
        if churn_value.ndim != 0 or not churn_value >= 0:
            raise ValueError(f"s_churn must be a non-negative scalar; got {s_churn!r}")
        use_churn = bool(churn_value > 0)
    else:  # traced: cannot know whether it is 0, so the noise path must be built
        use_churn = True
    if use_churn and rng is None:
        raise ValueError(
            "rng is required when s_churn > 0 (or when s_churn is traced): the churn step "
            "adds fresh noise. Pass rng=jax.random.key(...) or set s_churn=0."
        )
    if use_churn:
        gamma_max = jnp.minimum(jnp.asarray(s_churn, work_dtype) / num_steps, math.sqrt(2.0) - 1.0)

    tick = _Progress(num_steps, "heun" if order == 2 else "euler") if progress else None

    def step(i: Array, x: Array) -> Array:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = x.astype(work_dtype)
        if use_churn:
            # Temporarily raise the noise level to sigma_hat by adding fresh noise; this
            # lets the sampler correct errors made by earlier steps (EDM Sec. 4).
            in_range = (sigma >= s_tmin) & (sigma <= s_tmax)
            gamma = jnp.where(in_range, gamma_max, 0.0).astype(work_dtype)
            sigma_hat = sigma * (1.0 + gamma)
            eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, work_dtype)
            # sqrt(sigma_hat^2 - sigma^2) written as sigma*sqrt(gamma*(2+gamma)): the
            # difference form can round to a tiny negative (NaN) when gamma = 0.
            noise_std = sigma * jnp.sqrt(gamma * (2.0 + gamma))
            x_hat = x + noise_std * s_noise * eps
        else:
            sigma_hat, x_hat = sigma, x
        d = (x_hat - denoise_fn(x_hat.astype(out_dtype), sigma_hat)) / sigma_hat
        dt = sigma_next - sigma_hat
        x_next = x_hat + dt * d
        if order == 2:
            # Heun correction, skipped (Euler) when stepping to sigma = 0 where the slope
            # (x - D)/sigma is undefined. lax.cond so the last step costs one evaluation.
            def correct(x_euler: Array) -> Array:
                d_next = (x_euler - denoise_fn(x_euler.astype(out_dtype), sigma_next)) / sigma_next
                return x_hat + dt * 0.5 * (d + d_next)

            x_next = jax.lax.cond(sigma_next > 0, correct, lambda x_euler: x_euler, x_next)
        x_next = x_next.astype(out_dtype)
        if tick is not None:
            # Only the step index crosses to the host: no extra device work, and nothing
            # that would need slicing a sharded x. The tick may fire up to one step early.
            jax.debug.callback(tick, i)
        return x_next

    return jax.lax.fori_loop(0, num_steps, step, x_init)


def heun_sample(
    denoise_fn: DenoiseFn,
    x_init: Array,
    sigmas: Any,
    *,
    rng: Optional[Array] = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    progress: bool = False,
) -> Array:
    """EDM Algorithm 2: second-order Heun sampler with optional stochastic churn.

    `denoise_fn(x, sigma)` returns D(x; sigma) for a scalar sigma shared by the batch;
    `x_init` is already noise at sigmas[0] (e.g. sigmas[0] * N(0, I)); `sigmas` is a
    descending schedule ending at 0 such as `karras_sigmas(n)` (n steps, 2n-1 network
    evaluations). Steps with sigma_i in [s_tmin, s_tmax] first raise the noise by
    gamma = min(s_churn/n, sqrt(2)-1), which needs `rng`. The whole run is one
    `lax.fori_loop`, so it jits into a single program and `sigmas` may be traced (a
    concrete schedule is also checked for being descending and ending at 0). With
    `progress=True` a tqdm bar advances from inside the compiled loop.
    """
    return _sample(2, denoise_fn, x_init, sigmas, rng, s_churn, s_tmin, s_tmax, s_noise, progress)


def euler_sample(
    denoise_fn: DenoiseFn,
    x_init: Array,
    sigmas: Any,
    *,
    rng: Optional[Array] = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    progress: bool = False,
) -> Array:
    """First-order (Euler) counterpart of `heun_sample`, same arguments and churn.

    One network evaluation per step; mainly a baseline (its error halves, rather than
    quarters, when the step count doubles).
    """
    return _sample(1, denoise_fn, x_init, sigmas, rng, s_churn, s_tmin, s_tmax, s_noise, progress)


def dpmpp_2m_sample(
    denoise_fn: DenoiseFn,
    x_init: Array,
    sigmas: Any,
    *,
    progress: bool = False,
) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) on an EDM schedule.

    One network evaluation per step, like Euler, but second order: each step extrapolates
    D linearly in log sigma from this step's and the previous step's outputs. With
    lambda = -log(sigma), h = lambda_next - lambda and r = h_prev / h,
      D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},   x_next = (sigma_next/sigma) x + (1 - sigma_next/sigma) D'
    (D' = D_i on the first step, which has no history, and on the last, to sigma = 0,
    where x_next = D_i). The history is the carry of one `lax.fori_loop`, so a denoiser that
    fuses views (MultiDiffusion) keeps a single history on the fused canvas, not one per
    view. Deterministic only: fresh noise (churn) would invalidate the history.
    """
    x_init = jnp.asarray(x_init)
    if not jnp.issubdtype(x_init.dtype, jnp.floating):
        raise ValueError(f"x_init must be a floating array; got dtype {x_init.dtype}")
    sigmas = _validate_sigmas(sigmas)
    num_steps = sigmas.shape[0] - 1
    if num_steps < SAMPLER_MIN_STEPS["dpmpp_2m"]:
        raise ValueError(f"dpmpp_2m needs at least {SAMPLER_MIN_STEPS['dpmpp_2m']} steps to be second order (its "
                         f"first step has no history and its last lands on D); got {num_steps}. Use more steps, "
                         "or the euler sampler.")
    out_dtype = x_init.dtype
    work_dtype = _float_dtype(x_init, sigmas)
    sigmas = sigmas.astype(work_dtype)
    tick = _Progress(num_steps, "dpmpp_2m") if progress else None

    def step(i: Array, carry: Tuple[Array, Array]) -> Tuple[Array, Array]:
        x, prev_denoised = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x.astype(out_dtype), sigma).astype(work_dtype)
        last = sigma_next == 0
        ratio = jnp.where(last, 0.0, sigma_next / sigma)
        # Step sizes in lambda; the last step (h infinite) and the first (no history) stay first order.
        h = jnp.log(sigma / jnp.where(last, sigma, sigma_next))
        h_prev = jnp.log(sigmas[jnp.maximum(i - 1, 0)] / sigma)
        second_order = (i > 0) & ~last
        w = jnp.where(second_order, 0.5 * h / jnp.where(second_order, h_prev, 1.0), 0.0)
        extrapolated = (1.0 + w) * denoised - w * prev_denoised
        x_next = ratio * x.astype(work_dtype) + (1.0 - ratio) * extrapolated
        if tick is not None:
            jax.debug.callback(tick, i)
        return x_next.astype(out_dtype), denoised

    x, _ = jax.lax.fori_loop(0, num_steps, step, (x_init, jnp.zeros_like(x_init, dtype=work_dtype)))
    return x


SAMPLERS: dict[str, Callable[..., Array]] = {"heun": heun_sample, "euler": euler_sample,
                                              "dpmpp_2m": dpmpp_2m_sample}
# A multistep solver needs history to reach its order: DPM-Solver++(2M)'s first step has none
# and its last lands on D, so second order needs at least one step between them.
SAMPLER_MIN_STEPS = {"dpmpp_2m": 3}


def check_sampler(sampler: str, steps: int | None) -> None:
    """A sampler name and step count (None: the config's, checked when known) that sampling accepts."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
    if steps is None:
        return
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if steps < SAMPLER_MIN_STEPS.get(sampler, 1):
        raise ValueError(f"The {sampler} sampler needs at least {SAMPLER_MIN_STEPS[sampler]} steps to be second "
                         f"order (its first step has no history and its last lands on D); got {steps}. Raise the "
                         "steps or use euler.")


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------


def guided_denoiser(
    model_fn: Callable[[Array, Array, Any], Array], cond: Any, uncond: Any, guidance: Any
) -> DenoiseFn:
    """Classifier-free guidance: D = D_uncond + g * (D_cond - D_uncond).

    `model_fn(x, sigma, cond)` is a (preconditioned) denoiser taking a batch x [B, ...]
    and a conditioning pytree whose leaves have leading batch axis B. Both branches run
    in ONE call on a batch of 2B (x twice; cond and uncond concatenated leaf-wise),
    which is cheaper than two calls on accelerators. `uncond` leaves may have a leading
    axis of 1 (a single null embedding), broadcast to the batch. g = 0 is the purely
    unconditional model, g = 1 the plain conditional model, g > 1 extrapolates away from
    the unconditional prediction. When g is a Python number equal to 1 the unconditional
    branch is skipped (same result, half the cost); a traced g always runs both. `guidance`
    may also be a function of sigma (e.g. one scale per expert, `experts.guidance_by_expert`).
    """
    g_value = guidance if isinstance(guidance, (int, float)) else None

    def denoise_fn(x: Array, sigma: Any) -> Array:
        batch = x.shape[0]

        def check(leaf: Array) -> None:
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
                raise ValueError(
                    f"cond leaves need leading batch axis {batch}; got shape {jnp.shape(leaf)}"
                )

        jax.tree.map(check, cond)
        if g_value == 1:
            return model_fn(x, sigma, cond)
        both = jax.tree.map(
            lambda c, u: jnp.concatenate(
                [c, jnp.broadcast_to(u, jnp.shape(c)).astype(jnp.result_type(c))], axis=0
            ),
            cond,
            uncond,
        )
        sigma = jnp.asarray(sigma)
        sigma2 = jnp.concatenate([sigma, sigma], axis=0) if sigma.ndim == 1 else sigma
        out = model_fn(jnp.concatenate([x, x], axis=0), sigma2, both)
        chex.assert_axis_dimension(out, 0, 2 * batch)
        d_cond, d_uncond = out[:batch], out[batch:]
        g = jnp.asarray(guidance(sigma) if callable(guidance) else guidance)
        g = jnp.reshape(g, g.shape + (1,) * (x.ndim - g.ndim)) if g.ndim else g  # per-sample sigma: [B, 1, 1, 1]
        return d_uncond + g * (d_cond - d_uncond)

    return denoise_fn
