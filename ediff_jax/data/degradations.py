"""High-res -> low-res degradation for super-resolution training, as tf.data-ready TF ops.

A super-resolution stage learns ``p(high-res | low-res)``. Trained on clean area
downsamples only, it copies the input too faithfully and falls apart on the slightly
blurry, noisy, compressed 64px images the base model actually produces, so (as in eDiff-I,
following Real-ESRGAN's first-order model) the conditioning image is degraded:

    blur (Gaussian, random sigma) -> downsample (random method) -> noise -> JPEG

each step switched on with its own probability. ``config=None`` is the clean path: one
antialiased area downsample, which is what sampling-time inputs look like.

Every random choice comes from a *stateless* seed, so the same ``(image, seed)`` always
gives the same low-res image; the input pipeline derives the seed from the example's
position in the stream, which keeps resuming exact.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

RESIZE_METHODS: tuple[str, ...] = ("area", "bilinear", "bicubic")

# Sigmas are in units of the [0, 1] intensity range (0.04 ~ 10/255), blur sigma in
# high-res pixels, JPEG quality in libjpeg's 1..100.
DEFAULT_DEGRADATION: dict[str, Any] = dict(
    blur_prob=0.5,
    blur_sigma=(0.2, 1.5),
    resize_methods=RESIZE_METHODS,
    noise_prob=0.5,
    noise_sigma=(0.0, 0.04),
    jpeg_prob=0.5,
    jpeg_quality=(50, 95),
)

_PROB_KEYS = ("blur_prob", "noise_prob", "jpeg_prob")
# key -> (smallest allowed low end, largest allowed high end, low end must be > minimum)
_RANGE_LIMITS: dict[str, tuple[float, float, bool]] = {
    "blur_sigma": (0.0, 10.0, True),  # sigma 0 is no blur: use blur_prob=0 for that
    "noise_sigma": (0.0, 1.0, False),
    "jpeg_quality": (1, 100, False),
}
_BLUR_TRUNCATE = 3.0  # kernel radius in sigmas (scipy.ndimage's default is 4; 3 keeps >99.7%)
_RNG_ALG = "philox"  # explicit, so seeds mean the same thing on every device


def _as_plain_mapping(config: Any) -> dict[str, Any]:
    """Accept dicts and ml_collections ConfigDicts (which are not ``Mapping``s)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(
            f"degradation config must be a mapping such as DEFAULT_DEGRADATION or None, "
            f"got {type(config).__name__}: {config!r}."
        )
    return dict(config)


def _validate_range(key: str, value: Any) -> tuple[float, float] | tuple[int, int]:
    lowest, highest, strict = _RANGE_LIMITS[key]
    integer = key == "jpeg_quality"
    if (
        isinstance(value, (str, bytes))
        or not hasattr(value, "__len__")
        or len(value) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
        or (integer and not all(float(v).is_integer() for v in value))
    ):
        kind = "integers" if integer else "numbers"
        raise ValueError(f"degradation {key!r} must be a (low, high) pair of {kind}, got {value!r}.")
    low, high = (int(v) for v in value) if integer else (float(v) for v in value)
    low_ok = low > lowest if strict else low >= lowest
    if not (low_ok and low <= high <= highest):
        bound = f"{lowest} < low" if strict else f"{lowest} <= low"
        raise ValueError(f"degradation {key!r} = {value!r} must satisfy {bound} <= high <= {highest}.")
    return low, high


def validate_degradation(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Check a degradation config and fill in defaults; ``None`` (clean downsample) passes.

    Runs once when the pipeline is built, so a typo in a config file fails at start-up
    with the list of valid keys instead of deep inside a tf.data map function.
    """
    if config is None:
        return None
    given = _as_plain_mapping(config)
    unknown = sorted(set(given) - set(DEFAULT_DEGRADATION))
    if unknown:
        raise ValueError(
            f"Unknown degradation key(s) {unknown}; valid keys: {sorted(DEFAULT_DEGRADATION)}."
        )
    merged = {**DEFAULT_DEGRADATION, **given}
    for key in _PROB_KEYS:
        p = merged[key]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
            raise ValueError(f"degradation {key!r} must be a probability in [0, 1], got {p!r}.")
        merged[key] = float(p)
    for key in _RANGE_LIMITS:
        merged[key] = _validate_range(key, merged[key])
    methods = merged["resize_methods"]
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    bad = [m for m in methods if m not in RESIZE_METHODS]
    if not methods or bad:
        raise ValueError(
            f"degradation 'resize_methods' must be a non-empty subset of {RESIZE_METHODS}, "
            f"got {merged['resize_methods']!r}."
        )
    merged["resize_methods"] = methods
    return merged


def area_downsample(image: tf.Tensor, size: int) -> tf.Tensor:
    """Plain box-filter downsample to ``size`` x ``size``: the clean low-res input."""
    return tf.image.resize(image, (size, size), method="area", antialias=True)


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high, alg=_RNG_ALG)


def _happens(seed: tf.Tensor, probability: float) -> tf.Tensor:
    """Bernoulli(probability) as a bool scalar; p=0 never, p=1 always."""
    return _uniform(seed, 0.0, 1.0) < probability


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur of an [H, W, C] image with mirrored edges.

    ``radius`` is static (from the largest sigma in the config) so the kernel shape is
    fixed; a smaller sigma just puts ~zero weight on the outer taps.
    """
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(taps / sigma))
    weights = weights / tf.reduce_sum(weights)
    channels = 3
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    vertical = tf.tile(tf.reshape(weights, [-1, 1, 1, 1]), [1, 1, channels, 1])
    horizontal = tf.tile(tf.reshape(weights, [1, -1, 1, 1]), [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(padded, vertical, strides=[1, 1, 1, 1], padding="VALID")
    out = tf.nn.depthwise_conv2d(out, horizontal, strides=[1, 1, 1, 1], padding="VALID")
    return out[0]


def _check_blur_fits(image: tf.Tensor, radius: int, max_sigma: float) -> None:
    """Mirrored padding needs the image to be larger than the kernel radius."""
    known = [d for d in image.shape[:2] if d is not None]  # dynamic sizes are checked by TF
    if known and min(known) <= radius:
        raise ValueError(
            f"blur_sigma up to {max_sigma} needs images larger than {radius} px, got "
            f"{image.shape[0]}x{image.shape[1]}; lower the blur_sigma range or use larger crops."
        )


def _random_resize(image: tf.Tensor, size: int, methods: tuple[str, ...], seed: tf.Tensor) -> tf.Tensor:
    """Downsample with a method drawn uniformly from ``methods``.

    Bilinear and bicubic run without antialiasing, like Real-ESRGAN's interpolations:
    the aliasing they leave is one of the artefacts the SR model should learn to undo.
    """
    def resize_with(method: str):
        antialias = method == "area"
        return lambda: tf.image.resize(image, (size, size), method=method, antialias=antialias)

    if len(methods) == 1:
        return resize_with(methods[0])()
    index = tf.random.stateless_uniform(
        [], seed, minval=0, maxval=len(methods), dtype=tf.int32, alg=_RNG_ALG
    )
    return tf.switch_case(index, [resize_with(m) for m in methods])


def _jpeg(image: tf.Tensor, quality: tf.Tensor) -> tf.Tensor:
    """JPEG round trip of a [-1, 1] float image at ``quality`` (via uint8, as a file would)."""
    pixels = tf.cast(tf.round(tf.clip_by_value((image + 1.0) * 127.5, 0.0, 255.0)), tf.uint8)
    compressed = tf.image.adjust_jpeg_quality(pixels, quality)
    return tf.cast(compressed, tf.float32) / 127.5 - 1.0


def degrade(
    image: tf.Tensor,
    lowres_size: int,
    config: Mapping[str, Any] | None,
    seed: tf.Tensor,
) -> tf.Tensor:
    """Low-res conditioning image from a high-res one.

    Args:
      image: float [H, W, 3] in [-1, 1] (H, W may be dynamic).
      lowres_size: side of the square output.
      config: a degradation mapping (see ``DEFAULT_DEGRADATION``; missing keys take the
        defaults) or ``None`` for a clean area downsample (the seed is then unused).
      seed: int32/int64 [2] stateless seed; equal seeds give equal outputs.

    Returns float32 [lowres_size, lowres_size, 3] in [-1, 1].
    """
    if lowres_size <= 0:
        raise ValueError(f"lowres_size must be positive, got {lowres_size}.")
    image = tf.convert_to_tensor(image, tf.float32)
    cfg = validate_degradation(config)
    if cfg is None:
        out = area_downsample(image, lowres_size)
    else:
        # int64 so that a seed means the same stream whether it arrives as int32 or int64.
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
        seeds = tf.random.experimental.stateless_split(seed, num=8, alg=_RNG_ALG)
        blur_on, blur_sigma, resize_pick, noise_on, noise_sigma, noise, jpeg_on, quality = tf.unstack(seeds)

        radius = max(1, math.ceil(_BLUR_TRUNCATE * cfg["blur_sigma"][1]))
        _check_blur_fits(image, radius, cfg["blur_sigma"][1])
        sigma = _uniform(blur_sigma, *cfg["blur_sigma"])
        out = tf.cond(
            _happens(blur_on, cfg["blur_prob"]),
            lambda: gaussian_blur(image, sigma, radius),
            lambda: image,
        )

        out = _random_resize(out, lowres_size, cfg["resize_methods"], resize_pick)

        # Noise std is given on the [0, 1] scale; the image spans 2 units.
        std = 2.0 * _uniform(noise_sigma, *cfg["noise_sigma"])
        gaussian = tf.random.stateless_normal(tf.shape(out), noise, alg=_RNG_ALG)
        out = tf.where(_happens(noise_on, cfg["noise_prob"]), out + std * gaussian, out)

        low_q, high_q = cfg["jpeg_quality"]
        q = tf.random.stateless_uniform(
            [], quality, minval=low_q, maxval=high_q + 1, dtype=tf.int32, alg=_RNG_ALG
        )
        out = tf.cond(_happens(jpeg_on, cfg["jpeg_prob"]), lambda: _jpeg(out, q), lambda: out)
    out = tf.clip_by_value(out, -1.0, 1.0)
    out.set_shape([lowres_size, lowres_size, 3])
    return out
