"""eDiff-I's ensemble of expert denoisers.

E experts share one network definition; their parameters are stacked into one pytree with
a leading expert axis. Expert k serves boundaries[k-1] <= sigma < boundaries[k] (expert 0
is the lowest-noise expert), and a sampling step runs exactly one of them, chosen with
`lax.switch` on sigma, so an ensemble costs no more per step than a single model.

Experts are obtained by branching: a shared model is trained on all noise levels; then the
training distribution p(sigma) (log-normal) is split into intervals of equal probability
mass, each child is initialised from its parent and fine-tuned only on sigmas drawn from
its interval (a truncated log-normal); recursively, as a binary tree. Intervals are given
as quantiles of p(sigma), and boundaries in sigma are derived from them, so they are a
function of the training distribution and are stored with the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from ediff_jax.config_utils import p_sigma_cdf, p_sigma_quantile

Interval = tuple[float, float]  # (lo, hi) quantiles of p(sigma), 0 <= lo < hi <= 1


def expert_index(sigma: jax.Array, boundaries: jax.Array) -> jax.Array:
    """Index k with boundaries[k-1] <= sigma < boundaries[k] (ascending boundaries)."""
    return jnp.searchsorted(jnp.asarray(boundaries), sigma, side="right").astype(jnp.int32)


def ensemble_size(boundaries: Any) -> int:
    """Experts a denoiser with these sigma boundaries switches between (None: a single model, 1)."""
    return 1 if boundaries is None else len(np.asarray(boundaries)) + 1


def guidance_by_expert(guidance: Any, boundaries: Any) -> Any:
    """Classifier-free guidance for `edm.guided_denoiser`: a scalar as it is; a vector [E] (one scale per
    expert, highest noise first, as Wan 2.2 gives each expert its own) as sigma -> that expert's scale."""
    if jnp.ndim(guidance) == 0:
        return guidance
    scales = jnp.asarray(guidance)[::-1]  # expert_index counts from the lowest noise
    if boundaries is None or scales.shape[0] != jnp.shape(boundaries)[0] + 1:
        raise ValueError(f"{scales.shape[0]} guidance scales need an ensemble of {scales.shape[0]} experts; this "
                         f"model has {1 if boundaries is None else jnp.shape(boundaries)[0] + 1}.")
    return lambda sigma: scales[expert_index(sigma, boundaries)]


def validate_boundaries(boundaries: Any, num_experts: int) -> np.ndarray:
    """Checks boundaries at the boundary of the API: E-1 values, strictly ascending, positive."""
    b = np.asarray(boundaries, dtype=np.float64).reshape(-1)
    if b.shape[0] != num_experts - 1:
        raise ValueError(
            f"{num_experts} stacked experts need {num_experts - 1} sigma boundaries, found {b.shape[0]}: {b.tolist()}."
        )
    if b.size and (np.any(np.diff(b) <= 0) or b[0] <= 0):
        raise ValueError(f"Expert boundaries must be positive and strictly ascending; found {b.tolist()}.")
    return b


def stack_experts(params_list: Sequence[Any]) -> Any:
    """[params_0, ..., params_{E-1}] -> one pytree with a leading expert axis of size E."""
    if not params_list:
        raise ValueError("stack_experts needs at least one parameter tree.")
    structures = {jax.tree.structure(p) for p in params_list}
    if len(structures) != 1:
        raise ValueError("All experts must share one network definition (their parameter trees differ).")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def num_experts(stacked: Any) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1:
        raise ValueError(f"Stacked expert leaves disagree on the expert axis: sizes {sorted(sizes)}.")
    return sizes.pop()


def unstack_experts(stacked: Any) -> list[Any]:
    return [jax.tree.map(lambda x, k=k: x[k], stacked) for k in range(num_experts(stacked))]


def expert_shares(batch: jax.Array, num: int, offset: Any = 0) -> jax.Array:
    """[B, ...] -> [num, ceil(B / num), ...]: expert k trains on rows k, k + num, k + 2 num, ...

    Strided, not contiguous: the global batch is laid out host by host (each process's
    rows form one block), so contiguous shares would give each expert a fixed subset of
    hosts, and with them a fixed part of the dataset. A stride takes an equal number of
    rows from every host's block whenever each block is a multiple of `num` rows.

    When `num` does not divide B (eDiff-I's 3 experts at batch 16), the batch is padded to
    num * ceil(B / num) rows with copies of its first rows, which `expert_share_weights`
    gives weight 0, and rolled by `offset` (the step) first, so which experts get the
    shorter shares rotates: over `num` steps every expert trains on the same number of
    examples, and the ensemble still sees each example once. An even split ignores `offset`.
    """
    rows = batch.shape[0]
    if rows % num == 0:
        return jnp.swapaxes(batch.reshape(rows // num, num, *batch.shape[1:]), 0, 1)
    padded = jnp.concatenate([batch, batch[:-rows % num]])
    return padded[_padded_share_rows(rows, num, offset)]


def expert_share_weights(rows: int, num: int, offset: Any = 0) -> jax.Array | None:
    """[num, ceil(rows / num)] float32: 1 for a real example of each share, 0 for `expert_shares`'
    padding; None when `num` divides `rows` (every row is real)."""
    if rows % num == 0:
        return None
    return (_padded_share_rows(rows, num, offset) < rows).astype(jnp.float32)


def _padded_share_rows(rows: int, num: int, offset: Any) -> jax.Array:
    """[num, ceil(rows / num)] indices into the batch padded to a multiple of `num` (indices >= rows are
    padding): the padded batch rolled by `offset`, then split strided."""
    if rows < num:
        raise ValueError(f"A batch of {rows} rows cannot give each of {num} experts a row; use at least {num}.")
    total = rows + -rows % num
    rolled = jnp.roll(jnp.arange(total), offset)
    return jnp.swapaxes(rolled.reshape(total // num, num), 0, 1)


def ensemble_denoiser(
    apply_expert: Callable[..., jax.Array], stacked_params: Any, boundaries: Any
) -> Callable[..., jax.Array]:
    """A denoiser `fn(x, sigma, *args)` that runs exactly one expert per call.

    `apply_expert(params, x, sigma, *args)` evaluates one expert (e.g. a preconditioned
    UNet); sigma must be a scalar shared by the batch (as in the EDM samplers), which is
    what makes a single `lax.switch` branch per step possible.
    """
    e = num_experts(stacked_params)
    b = jnp.asarray(validate_boundaries(boundaries, e), jnp.float32)

    def branch(k: int) -> Callable[..., jax.Array]:
        def run(operands: tuple) -> jax.Array:
            x, sigma, args = operands
            return apply_expert(jax.tree.map(lambda p: p[k], stacked_params), x, sigma, *args)

        return run

    branches = [branch(k) for k in range(e)]

    def denoise(x: jax.Array, sigma: jax.Array, *args: Any) -> jax.Array:
        sigma = jnp.asarray(sigma)
        chex.assert_rank(sigma, 0)
        if e == 1:
            return branches[0]((x, sigma, args))
        return jax.lax.switch(expert_index(sigma, b), branches, (x, sigma, args))

    return denoise


# --- Intervals of the training distribution -------------------------------------------------


def sigma_at_quantile(q: Any, p_mean: float, p_std: float) -> jax.Array:
    """Inverse CDF of the log-normal training distribution p(sigma)."""
    return jnp.exp(p_mean + p_std * ndtri(jnp.asarray(q, jnp.float32)))


def boundaries_from_intervals(intervals: Sequence[Interval], p_mean: float, p_std: float) -> np.ndarray:
    """Sigma boundaries between consecutive expert intervals (which must tile [0, 1])."""
    validate_intervals(intervals)
    return np.asarray(sigma_at_quantile(np.array([hi for _, hi in intervals[:-1]]), p_mean, p_std), np.float32)


def validate_intervals(intervals: Sequence[Interval]) -> None:
    if not intervals or intervals[0][0] != 0.0 or intervals[-1][1] != 1.0:
        raise ValueError(f"Expert intervals must tile the quantile range [0, 1] in order; got {list(intervals)}.")
    for (lo, hi), (lo2, _) in zip(intervals, list(intervals[1:]) + [(1.0, 1.0)]):
        if not lo < hi or hi != lo2:
            raise ValueError(f"Expert intervals must be ascending and contiguous; got {list(intervals)}.")


def equal_mass_split(interval: Interval) -> list[Interval]:
    """A branching step: one interval into two of equal probability mass."""
    lo, hi = interval
    mid = (lo + hi) / 2
    return [(lo, mid), (mid, hi)]


def parents_of(children: Sequence[Interval], parents: Sequence[Interval]) -> list[int]:
    """For each child interval, the index of the parent interval that contains it."""
    out = []
    for lo, hi in children:
        found = [i for i, (plo, phi) in enumerate(parents) if plo <= lo and hi <= phi]
        if len(found) != 1:
            raise ValueError(f"Child interval {(lo, hi)} is not inside exactly one parent of {list(parents)}.")
        out.append(found[0])
    return out


def sample_interval_sigmas(rng: jax.Array, shape: Sequence[int], interval: Interval,
                           p_mean: float, p_std: float) -> jax.Array:
    """Log-normal sigmas truncated to a quantile interval (inverse-CDF sampling)."""
    lo, hi = interval
    u = jax.random.uniform(rng, shape, minval=lo, maxval=hi)
    # Keep u strictly inside (0, 1): ndtri(0) = -inf.
    u = jnp.clip(u, 1e-7, 1 - 1e-7)
    return sigma_at_quantile(u, p_mean, p_std)


def loss_mass_boundaries(edges: Sequence[float], losses: Sequence[float], num_experts: int,
                         p_mean: float, p_std: float) -> np.ndarray:
    """Sigmas that split p(sigma) into `num_experts` intervals of equal *loss mass*, the integral of
    p(sigma) L(sigma), with L the shared model's measured loss, constant on each bucket
    [edges[i], edges[i+1]) (edges from 0 to inf, as the trainer logs them).

    Equal-mass quantiles give each expert the same share of the noise levels; this gives each the
    same share of what is left to learn, so experts crowd where the loss is. Within a bucket the
    loss mass grows with the p(sigma) mass, so the boundary is a closed-form quantile there.
    """
    edges, losses = [float(e) for e in edges], [float(v) for v in losses]
    if len(edges) != len(losses) + 1 or edges[0] != 0.0 or edges[-1] != math.inf or sorted(edges) != edges:
        raise ValueError(f"Loss buckets need edges 0 < ... < inf, one more than the losses; got {edges} for "
                         f"{len(losses)} losses.")
    if num_experts < 2:
        raise ValueError(f"num_experts={num_experts}: loss-mass boundaries split p(sigma) for 2 or more experts.")
    cdf = [0.0, *(p_sigma_cdf(e, p_mean, p_std) for e in edges[1:-1]), 1.0]
    mass = [hi - lo for lo, hi in zip(cdf, cdf[1:])]
    bad = [f"{lo:g}-{hi:g}" for lo, hi, m, v in zip(edges, edges[1:], mass, losses)
           if m > 1e-6 and not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"The measured loss is missing or invalid in the sigma buckets {bad}, which p(sigma) "
                         "samples; train the shared model longer so every bucket is logged.")
    weighted = [m * v if m > 1e-6 else 0.0 for m, v in zip(mass, losses)]
    total = sum(weighted)
    if not total > 0:
        raise ValueError("The measured loss is 0 everywhere: no loss mass to split.")
    sigmas, below = [], 0.0
    targets = [total * k / num_experts for k in range(1, num_experts)]
    for i, w in enumerate(weighted):
        while targets and below + w >= targets[0] and w > 0:
            q = cdf[i] + (targets.pop(0) - below) / w * mass[i]
            q = min(max(q, 1e-7), 1 - 1e-7)
            sigmas.append(p_sigma_quantile(q, p_mean, p_std))
        below += w
    return np.asarray(sigmas, np.float64)


def quantile_of_sigma(sigma: Any, p_mean: float, p_std: float) -> jax.Array:
    return ndtr((jnp.log(sigma) - p_mean) / p_std)
