"""Exponential moving averages of the parameters: several decays at once, and EDM2's post-hoc EMA.

Classic EMA (`ema_update`) keeps one average per decay with the trainer's warm-up
`min(decay, (1+t)/(10+t))`, so a run can compare decays without retraining.

Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 3 and App. C) removes the decay from the hyper-parameters: during
training, two (or more) *power-function* EMAs are tracked and snapshotted periodically;
after training, an EMA of any width can be reconstructed as a linear combination of the
snapshots. A power EMA with exponent gamma averages the parameters theta_1..theta_t with
weights ~ tau^gamma (its "profile"); its width is given as sigma_rel, the profile's
standard deviation relative to t, which does not depend on the training length.

Step convention: `step` is the trainer's 0-based `state.step` of the update that produced
`params` (as in `training.step.ema_decay_at`); after it, the EMA has averaged t = step + 1
parameter vectors, and a snapshot taken then is recorded with `t` (= the new
`state.step`), which is what `solve_posthoc_coefficients` expects.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Largest sigma_rel a power-function EMA can have (at gamma ~ -0.382); beyond it no profile exists.
MAX_SIGMA_REL = 0.30028


def warmup_decay(step: jax.Array | int, decay: float) -> jax.Array:
    """EMA decay with warm-up, (1+t)/(10+t) capped at `decay`: short runs still average.

    The trainer's EMAs use it (`ema_step`; `training.step.ema_decay_at` delegates here).
    """
    t = jnp.asarray(step).astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def _check_decays(decays: Mapping[str, float]) -> None:
    for name, decay in decays.items():
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay {name!r}={decay} must lie in [0, 1); typical values are 0.999 to 0.9999.")


def init_emas(params: Any, decays: Mapping[str, float]) -> dict[str, Any]:
    """One EMA per decay name, each starting at the parameters."""
    _check_decays(decays)
    return {name: params for name in decays}


def ema_step(average: Any, params: Any, step: jax.Array | int, decay: float) -> Any:
    """One update of one EMA: `d * average + (1 - d) * params` with the warm-up decay d.

    The trainer's EMAs (`ema_params` and `extra_emas`) are updated with this, so training and
    `ema_update` compute the same averages.
    """
    d = warmup_decay(step, float(decay))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), average, params)


def ema_update(ema_by_name: Mapping[str, Any], params: Any, step: jax.Array | int,
               decays: Mapping[str, float]) -> dict[str, Any]:
    """Updates every EMA in `ema_by_name` with its own decay from `decays` (same keys).

    Each is `decay * ema + (1 - decay) * params` with the warm-up decay, exactly what a
    single-decay EMA computes, so adding decays does not change the existing one.
    """
    if set(ema_by_name) != set(decays):
        raise ValueError(
            f"EMA trees {sorted(ema_by_name)} and decays {sorted(decays)} must have the same names; "
            "create the trees with init_emas(params, decays)."
        )
    _check_decays(decays)
    return {name: ema_step(ema, params, step, decays[name]) for name, ema in ema_by_name.items()}


# ----------------------------------------------------------------------------- power EMA


def _check_gamma(gamma: Any) -> np.ndarray:
    g = np.asarray(gamma, np.float64)
    if np.any(~np.isfinite(g)) or np.any(g <= -1.0):
        raise ValueError(f"Power EMA exponent gamma={gamma} must be finite and > -1 (profile ~ tau^gamma).")
    return g


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """Relative standard deviation of the profile ~ tau^gamma: sqrt((g+1) / ((g+2)^2 (g+3))) (EDM2 Sec. 3)."""
    g = _check_gamma(gamma)
    out = np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))
    return float(out) if out.ndim == 0 else out


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> float | np.ndarray:
    """The exponent gamma whose profile has width `sigma_rel`: the largest real root of

    (g+2)^2 (g+3) = sigma_rel^-2 (g+1), i.e. g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0.
    The largest root is the branch where a larger gamma means a narrower (shorter) EMA.
    """
    s = np.asarray(sigma_rel, np.float64)
    if np.any(~np.isfinite(s)) or np.any(s <= 0.0) or np.any(s > MAX_SIGMA_REL):
        raise ValueError(
            f"sigma_rel={sigma_rel} must lie in (0, {MAX_SIGMA_REL}]; EDM2 uses about 0.05 to 0.15 "
            "(0.2887 is a uniform average over all of training)."
        )
    out = []
    for value in s.reshape(-1):
        inv = value ** -2
        roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
        real = roots[np.abs(roots.imag) < 1e-7 * np.maximum(1.0, np.abs(roots.real))].real
        out.append(real.max())
    g = np.asarray(out).reshape(s.shape)
    return float(g) if g.ndim == 0 else g


def power_ema_beta(step: jax.Array | int, gamma: float) -> tuple[jax.Array, jax.Array]:
    """(beta, 1 - beta) with beta_t = (1 - 1/t)^(gamma+1), t = step + 1 (EDM2 App. C, t counted from 1).

    Computed through log1p/expm1: late in training 1 - 1/t rounds badly in float32 (at
    t = 1e6 by ~3% of 1/t), which would bias the profile; the logs keep full precision.
    """
    _check_gamma(gamma)
    t = jnp.asarray(step).astype(jnp.float32) + 1.0
    log_beta = (gamma + 1.0) * jnp.log1p(-1.0 / t)  # -inf at t = 1: the first EMA is the parameters
    return jnp.exp(log_beta), -jnp.expm1(log_beta)


def power_ema_update(ema: Any, params: Any, step: jax.Array | int, gamma: float) -> Any:
    """One power-function EMA step: ema <- beta_t ema + (1 - beta_t) params.

    After t updates the EMA is sum_tau w_tau theta_tau with
    w_tau = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1), the discrete profile ~ tau^gamma.
    """
    beta, one_minus_beta = power_ema_beta(step, gamma)
    return jax.tree.map(lambda e, p: (beta * e + one_minus_beta * p).astype(e.dtype), ema, params)


def power_ema_updates(emas: Mapping[str, Any], params: Any, step: jax.Array | int,
                      gammas: Mapping[str, float]) -> dict[str, Any]:
    """`power_ema_update` for several tracked EMAs at once (EDM2 tracks two, sigma_rel 0.05 and 0.10)."""
    if set(emas) != set(gammas):
        raise ValueError(f"Power EMA trees {sorted(emas)} and gammas {sorted(gammas)} must have the same names.")
    return {name: power_ema_update(ema, params, step, float(gammas[name])) for name, ema in emas.items()}


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> for normalised power profiles p(tau) = (g+1) tau^g / t^(g+1) on [0, t] (broadcasting).

    The integral over [0, min(t_a, t_b)] in closed form (EDM2 App. C):
    (g_a+1)(g_b+1) / ((g_a+g_b+1) max(t_a, t_b)) * (t_a/t_b)^(g_b if t_a < t_b else -g_a).
    """
    t_a, t_b = np.asarray(t_a, np.float64), np.asarray(t_b, np.float64)
    gamma_a, gamma_b = np.asarray(gamma_a, np.float64), np.asarray(gamma_b, np.float64)
    ratio_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** ratio_exp
    return num / ((gamma_a + gamma_b + 1.0) * np.maximum(t_a, t_b))


def solve_posthoc_coefficients(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float] | float,
                               target_step: int, target_sigma_rel: float) -> np.ndarray:
    """Coefficients c (one per snapshot) with sum_i c_i profile_i closest to the target profile in L2.

    Least squares on the profiles (EDM2 Algorithm 3): solve A c = b with A the snapshots'
    profile inner products and b their inner products with the target's; c is then
    normalised to sum to 1, so the reconstruction is an average. `snapshot_steps` are the
    t of each snapshot (the trainer's `state.step` when it was taken).
    """
    steps = np.asarray(snapshot_steps, np.float64).reshape(-1)
    gammas = np.broadcast_to(_check_gamma(snapshot_gammas), steps.shape).astype(np.float64)
    if steps.size == 0:
        raise ValueError("solve_posthoc_coefficients needs at least one snapshot.")
    if np.any(steps < 1):
        raise ValueError(f"Snapshot steps must be >= 1 (EMA updates averaged); got {steps.tolist()}.")
    if not 1 <= target_step <= steps.max():
        raise ValueError(
            f"target_step={target_step} must lie in [1, {int(steps.max())}] (the last snapshot): the snapshots hold "
            "no information about later parameters."
        )
    target_gamma = sigma_rel_to_gamma(target_sigma_rel)
    a = profile_inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = profile_inner_products(steps, gammas, float(target_step), target_gamma)
    try:
        coeffs = np.linalg.solve(a, b)
    except np.linalg.LinAlgError as e:
        raise ValueError(
            "The snapshots' profiles are linearly dependent (a repeated (step, gamma) pair?); drop duplicates."
        ) from e
    total = coeffs.sum()
    if not np.isfinite(total) or abs(total) < 1e-12:
        raise ValueError("Post-hoc EMA coefficients are degenerate (they sum to ~0); check the snapshot steps.")
    return coeffs / total


def reconstruct_ema(snapshots: Sequence[Any], coefficients: Sequence[float] | np.ndarray) -> Any:
    """sum_i c_i snapshot_i, leaf by leaf (snapshots are parameter trees of one structure)."""
    c = np.asarray(coefficients, np.float64).reshape(-1)
    if len(snapshots) != c.size or not snapshots:
        raise ValueError(f"{len(snapshots)} snapshots but {c.size} coefficients; give one coefficient per snapshot.")

    def combine(*leaves: jax.Array) -> jax.Array:
        acc = sum(float(ci) * jnp.asarray(x, jnp.float32) for ci, x in zip(c, leaves))
        return acc.astype(jnp.result_type(leaves[0]))

    return jax.tree.map(combine, *snapshots)


class PowerEMASnapshot(NamedTuple):
    """A tracked power EMA saved at `step` (= t, the trainer's state.step after the update)."""

    step: int
    gamma: float
    params: Any


def posthoc_ema(snapshots: Sequence[PowerEMASnapshot], target_step: int, target_sigma_rel: float) -> Any:
    """The EMA of width `target_sigma_rel` at `target_step`, reconstructed from `snapshots`."""
    coeffs = solve_posthoc_coefficients([s.step for s in snapshots], [s.gamma for s in snapshots],
                                        target_step, target_sigma_rel)
    return reconstruct_ema([s.params for s in snapshots], coeffs)


def snapshot_due(step: int, every: int) -> bool:
    """Whether to save the tracked power EMAs after training step `step` (1-based t)."""
    if every < 1:
        raise ValueError(f"Snapshot interval {every} must be >= 1 steps.")
    return step % every == 0


__all__ = [
    "MAX_SIGMA_REL", "PowerEMASnapshot", "ema_update", "gamma_to_sigma_rel", "init_emas", "posthoc_ema",
    "power_ema_beta", "power_ema_update", "power_ema_updates", "profile_inner_products", "reconstruct_ema",
    "sigma_rel_to_gamma", "snapshot_due", "solve_posthoc_coefficients", "warmup_decay",
]
