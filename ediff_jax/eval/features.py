"""A small convolutional feature extractor for ``ediff_shapes`` images, and its shipped weights.

Why our own: FID needs an embedding and Inception weights cannot be downloaded here. A network
trained to name the shape and the 3x3 region of each palette colour, and to tell rendered images
from blurred or noisy copies (``degradations``), responds to exactly what a shapes generator can
get wrong (colours, shapes, positions, softness, grain), so Fréchet distances and KID in its
feature space are meaningful for this dataset. Scores are only comparable between runs that use
the same weights file.

The network sees uint8 images of any square size, resized inside to ``input_size``; its
penultimate layer (after ReLU) is the feature, the heads exist for training.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from ediff_jax.data.shapes import COLORS, REGIONS, SHAPES

ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "eval"
DEFAULT_FEATURE_WEIGHTS = ASSET_DIR / "shapes_features.msgpack"

# Targets per palette colour (a scene never repeats a colour): the shape of the object of that
# colour or "absent", and the 3x3 region of its centre or "absent". Softmax heads per colour
# train much faster than 72 sparse presence bits.
SHAPE_CLASSES: tuple[str, ...] = ("absent", *SHAPES)
REGION_CLASSES: tuple[str, ...] = ("absent", *REGIONS)
LOGITS_PER_COLOR = len(SHAPE_CLASSES) + len(REGION_CLASSES)


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture; saved inside the weights file, so a file always rebuilds its own network."""

    input_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128

    def __post_init__(self) -> None:
        if self.input_size % (2 ** len(self.widths)):
            raise ValueError(
                f"input_size={self.input_size} must be divisible by 2**{len(self.widths)} "
                "(one 2x pooling per width)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureNetConfig:
        return cls(**{**values, "widths": tuple(int(w) for w in values["widths"])})


def to_network_input(images: jax.Array, input_size: int) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 [B, S, S, 3] in [-1, 1]; antialiased resize when H != S."""
    chex.assert_rank(images, 4)
    if images.dtype != jnp.uint8 or images.shape[-1] != 3:
        raise ValueError(
            f"feature network expects uint8 [B, H, W, 3] images, got {images.dtype} {images.shape}; "
            "convert [-1, 1] floats with ediff_jax.images.to_uint8"
        )
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if images.shape[1:3] != (input_size, input_size):
        x = jax.image.resize(x, (x.shape[0], input_size, input_size, 3), method="linear", antialias=True)
    return x


class ShapesFeatureNet(nn.Module):
    """``apply(params, uint8 images) -> (features [B, D], logits [B, colours, 4 + 10], clean_logit [B])``.

    Per colour, ``logits[..., :4]`` score ``SHAPE_CLASSES`` and ``logits[..., 4:]`` ``REGION_CLASSES``;
    ``clean_logit`` says "rendered, not blurred or noised".
    """

    config: FeatureNetConfig
    # True: images are float [B, H, W, 3] in [-1, 1], and the features are differentiable in them
    # (guidance: `multidiffusion/coherence.py`); the same weights either way.
    float_input: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        if self.float_input:
            chex.assert_rank(images, 4)
            x = images.astype(jnp.float32)
            if images.shape[1:3] != (cfg.input_size, cfg.input_size):
                x = jax.image.resize(x, (x.shape[0], cfg.input_size, cfg.input_size, 3), method="linear",
                                     antialias=True)
        else:
            x = to_network_input(images, cfg.input_size)
        for stage, width in enumerate(cfg.widths):
            for i in range(2):
                x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{stage}_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(nn.Dense(cfg.feature_dim, name="feature")(x))
        logits = nn.Dense(len(COLORS) * LOGITS_PER_COLOR, name="head")(features)
        clean_logit = nn.Dense(1, name="clean_head")(features)[:, 0]
        chex.assert_shape(features, (images.shape[0], cfg.feature_dim))
        return features, logits.reshape(-1, len(COLORS), LOGITS_PER_COLOR), clean_logit


def save_feature_weights(
    path: str | os.PathLike[str], config: FeatureNetConfig, params: Any, metadata: dict[str, Any]
) -> None:
    """One msgpack file: the config (so loading needs no code change), params and metadata."""
    payload = {
        "config": config.to_dict(),
        "params": jax.tree_util.tree_map(np.asarray, params),
        "metadata": metadata,
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.msgpack_serialize(payload))


def load_feature_weights(
    path: str | os.PathLike[str] | None = None,
) -> tuple[ShapesFeatureNet, Any, dict[str, Any]]:
    """``(module, params, metadata)`` from a file written by ``save_feature_weights``."""
    path = pathlib.Path(path) if path is not None else DEFAULT_FEATURE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"feature weights {str(path)!r} not found; train them with "
            "`python -m ediff_jax.eval.train_features --out PATH` or pass path=None for the shipped ones"
        )
    payload = serialization.msgpack_restore(path.read_bytes())
    if not isinstance(payload, dict) or not {"config", "params"} <= set(payload):
        raise ValueError(f"{str(path)!r} is not a feature-weights file written by save_feature_weights")
    module = ShapesFeatureNet(FeatureNetConfig.from_dict(payload["config"]))
    params = jax.tree_util.tree_map(jnp.asarray, payload["params"])
    return module, params, dict(payload.get("metadata", {}))


def load_feature_fn(path: str | os.PathLike[str] | None = None) -> Callable[[jax.Array], jax.Array]:
    """Jitted ``uint8 [B, H, W, 3] -> float32 [B, D]`` features; the shipped weights by default.

    Pass the result to ``frechet.compute_features``.
    """
    module, params, _ = load_feature_weights(path)
    # Params are an argument, not a closure: closed-over arrays become constants in the program.
    apply = jax.jit(lambda p, images: module.apply({"params": p}, images)[0])

    def feature_fn(images: jax.Array) -> jax.Array:
        return apply(params, images)

    return feature_fn


def load_differentiable_feature_fn(path: str | os.PathLike[str] | None = None) -> Callable[[jax.Array], jax.Array]:
    """``float [B, H, W, 3] in [-1, 1] -> float32 [B, D]``, differentiable: the same features as
    `load_feature_fn` gives the uint8 image (up to its rounding), for guidance inside a sampler."""
    module, params, _ = load_feature_weights(path)
    net = ShapesFeatureNet(module.config, float_input=True)
    return lambda images: net.apply({"params": params}, images)[0]
