"""SyncDiffusion's coherence guidance (Lee et al., NeurIPS 2023) on any canvas strategy.

MultiDiffusion fuses crops that each follow their own prompt, so distant parts of one
panorama drift apart in style. SyncDiffusion pulls every window's predicted clean image
towards one anchor window's, by a gradient step on a perceptual distance, during the first
steps (when the layout is decided). Here the perceptual distance is the Euclidean distance
between features of the project's shipped ediff_shapes network (LPIPS weights cannot be
downloaded), and the gradient enters in EDM's D-space as classifier guidance does. The score
is (D - x) / sigma^2, so adding -weight * grad L to the score adds -weight * sigma^2 * grad L to D:

    D'(x_i) = D(x_i) - weight * sigma^2 * grad_{x_i} || f(D(x_i)) - stop_grad(f(D(x_anchor))) ||

for every crop x_i, then the usual fusion. The sigma^2 keeps the pull comparable across noise
levels (the gradient itself grows as sigma falls). SyncDiffusion moves x_t instead; in D-space the
same gradient works with every sampler of `edm.SAMPLERS` (Heun, Euler, DPM-Solver++), and the
fused canvas stays the sampler's only state. Rows are matched one to one: crop row r (a prompt
and image of the batch, or a region prompt's row) is pulled towards the anchor's row r.

Cost per guided evaluation: one extra crop (the anchor, the first window of the call) and a
backward pass through the denoiser per crop. `active_above` limits it to the first steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# images [B, h, w, 3] in [-1, 1] (float, differentiable) -> features [B, D]
FeatureFn = Callable[[Array], Array]
SMOOTHING = 1e-4  # squared feature distance below which the pull fades (features are O(1-10) apart)


@dataclasses.dataclass(frozen=True)
class Coherence:
    """Coherence guidance settings: `feature_fn`, its `weight`, and the sigmas it acts at (> `active_above`)."""

    feature_fn: FeatureFn
    weight: float
    active_above: float

    def __post_init__(self) -> None:
        if not callable(self.feature_fn):
            raise ValueError("Coherence guidance needs a feature network: feature_fn must map [-1, 1] images to "
                             "features (ediff_jax.eval.features.load_differentiable_feature_fn()).")
        if not (np.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"Coherence weight {self.weight!r} must be a positive number (0 turns it off: pass "
                             "coherence=None).")


def coherence_sigma(sigmas: Sequence[float] | Array, steps: int) -> float:
    """The `active_above` that guides the first `steps` steps of a sampler on `sigmas` (descending, ending at 0).

    Step k evaluates at sigmas[k] (and Heun's correction at sigmas[k + 1]); guiding while
    sigma > sigmas[steps] covers steps 0 .. steps - 1.
    """
    s = np.asarray(sigmas, np.float64)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= len(s) - 1:
        raise ValueError(f"coherence steps={steps!r} must be a whole number from 1 to the sampler's {len(s) - 1} "
                         "steps.")
    return float(s[steps])


def anchor_target(coherence: Coherence, anchor_d: Array) -> Array:
    """The features every crop is pulled towards: the anchor crop's, held fixed (no gradient)."""
    return jax.lax.stop_gradient(coherence.feature_fn(anchor_d))


def guided_view_fn(view_fn: Callable[[Array, Array, Array], Array], coherence: Coherence,
                   target: Array) -> Callable[[Array, Array, Array], Array]:
    """`view_fn(crops, sigma, view)` with the coherence gradient applied while sigma > active_above."""

    def distance(xc: Array, sigma: Array, view: Array) -> tuple[Array, Array]:
        d = view_fn(xc, sigma, view)
        f = coherence.feature_fn(d)
        chex.assert_equal_shape([f, target])
        # Per row, summed: each image's gradient does not depend on the batch size. The smoothing
        # term keeps the anchor (distance 0 up to rounding) from being pushed by rounding noise.
        return jnp.sum(jnp.sqrt(jnp.sum(jnp.square(f - target), axis=-1) + SMOOTHING)), d

    def guided(xc: Array, sigma: Array, view: Array) -> Array:
        grad, d = jax.grad(distance, has_aux=True)(xc, sigma, view)
        return (d - coherence.weight * jnp.square(sigma) * grad).astype(d.dtype)

    def fn(xc: Array, sigma: Array, view: Array) -> Array:
        return jax.lax.cond(sigma > coherence.active_above, guided, view_fn, xc, sigma, view)

    return fn


def with_coherence(view_fn: Callable[[Array, Array, Array], Array], coherence: Coherence | None,
                   anchor: Callable[[], Array], sigma: Array) -> Callable[[Array, Array, Array], Any]:
    """The crop denoiser of one evaluation: `view_fn` itself, or guided towards `anchor()`'s features.

    `anchor()` evaluates the anchor crop (D of the call's first window); it runs only while guided.
    """
    if coherence is None:
        return view_fn
    probe = jax.eval_shape(anchor)
    zeros = jnp.zeros(jax.eval_shape(coherence.feature_fn, probe).shape, jnp.float32)
    target = jax.lax.cond(sigma > coherence.active_above, lambda: anchor_target(coherence, anchor()).astype(jnp.float32),
                          lambda: zeros)
    return guided_view_fn(view_fn, coherence, target)
