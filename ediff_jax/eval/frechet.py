"""Fréchet distance and KID between two image sets, for *any* feature extractor.

Why pluggable: no Inception weights can be downloaded here, so FID proper is out of reach;
the maths is the same for any embedding (``features.load_feature_fn`` ships one trained on
ediff_shapes). Everything below the feature extraction runs in float64 NumPy: the covariance
square root is the numerically delicate part of FID, and doing it on an accelerator in float32
is a classic source of negative or NaN scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

FeatureFn = Callable[[jax.Array], jax.Array]


class KIDResult(NamedTuple):
    """Mean and standard deviation of the unbiased MMD^2 over random subsets."""

    mean: float
    std: float


def _as_feature_matrix(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate statistics, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values; check the feature extractor's inputs")
    return array


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of ``features`` [N, D]."""
    x = _as_feature_matrix(features, "features")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; round-off negative eigenvalues are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``tr (S1 S2)^(1/2)`` is computed as ``tr (A S2 A)^(1/2)`` with ``A = S1^(1/2)``: the two
    matrices are similar, but the second is symmetric PSD, so symmetric eigendecompositions
    suffice and there is no complex ``sqrtm`` output to clean up, nor the ``eps * I`` offset
    that ``sqrtm`` needs when the covariances are singular (fewer samples than dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be [{dim}, {dim}] to match the means, got {sigma1.shape} and {sigma2.shape}"
        )
    # Symmetrise: covariances that went through float32 or a file may be asymmetric at 1e-8.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # Exact zero (identical statistics) can come out as -1e-13; a distance is never negative.
    return float(max(distance, 0.0))


def frechet_distance_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``(x . y / d + 1)^3`` (Binkowski et al., 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples: within-set means exclude the diagonal."""
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x)
    k_yy = _polynomial_kernel(y, y)
    k_xy = _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> KIDResult:
    """Kernel Inception Distance: unbiased MMD^2 averaged over random subsets of each set.

    Subsets are drawn without replacement, independently per set and per repetition, as in the
    reference implementation; ``std`` measures that subset noise, not the population spread.
    """
    a = _as_feature_matrix(features_a, "features_a")
    b = _as_feature_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}; use one feature extractor")
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise ValueError(
            f"subset_size={subset_size} must be in [2, {min(len(a), len(b))}] (the smaller set's size); "
            "pass a smaller subset_size or more images"
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _unbiased_mmd2(
                a[rng.choice(len(a), subset_size, replace=False)],
                b[rng.choice(len(b), subset_size, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return KIDResult(mean=float(values.mean()), std=float(values.std()))


def compute_features(feature_fn: FeatureFn, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``feature_fn`` over uint8 ``images`` [N, H, W, 3] in batches -> float64 [N, D].

    The last batch is padded to ``batch_size`` (and the padding dropped) so that a jitted
    ``feature_fn`` compiles once per image shape, not once more for the remainder.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}; "
            "convert [-1, 1] floats with ediff_jax.images.to_uint8"
        )
    if len(images) == 0:
        raise ValueError("no images to compute features of")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = min(batch_size, len(images))
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            pad = np.repeat(batch[-1:], batch_size - real, axis=0)
            batch = np.concatenate([batch, pad])
        out = np.asarray(feature_fn(batch))
        if out.ndim != 2 or out.shape[0] != batch_size:
            raise ValueError(
                f"feature_fn must map [B, H, W, 3] to [B, D]; for B={batch_size} it returned shape {out.shape}"
            )
        chunks.append(out[:real].astype(np.float64))
    return np.concatenate(chunks)
