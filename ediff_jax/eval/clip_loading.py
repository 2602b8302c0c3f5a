"""Load the CLIP vision tower (and image preprocessing settings) from a Hugging Face directory.

A thin layer over ``ediff_jax.hf_checkpoint``: the same safetensors reader, name/shape checks and
per-leaf placement as the text encoders (no PyTorch, no unpickling), with the vision tower's
parameter names. Accepts ``CLIPModel``, ``CLIPVisionModelWithProjection`` and ``CLIPVisionModel``
directories, or hub ids ``org/name[@revision]`` of such repos (resolved by ``ediff_jax.hub``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from ediff_jax.eval.clip_vision import CLIPVisionEncoder, CLIPVisionEncoderConfig
from ediff_jax.hf_checkpoint import (
    CheckpointError,
    ShardingArg,
    assemble,
    checkpoint_dir,
    float_dtype,
    open_checkpoint,
    read_config,
)

VISION_MODEL_TYPES = ("clip", "clip_vision_model")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PREPROCESSOR_FILE = "preprocessor_config.json"

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocessing:
    """CLIP's image pipeline: bicubic resize of the shortest side, centre crop, rescale, normalise."""

    shortest_edge: int = 224
    crop_size: int = 224
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.crop_size > self.shortest_edge:
            raise ValueError(
                f"crop_size={self.crop_size} exceeds the resized shortest edge {self.shortest_edge}; "
                "fix preprocessor_config.json (crop_size <= size.shortest_edge)"
            )


def _square_size(value: Any, key: str, directory: pathlib.Path) -> int:
    """HF writes sizes as an int (old), {"shortest_edge": n} or {"height": h, "width": w}."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise CheckpointError(
        f"unsupported {key}={value!r} in {str(directory / _PREPROCESSOR_FILE)!r}: expected an int, "
        "{'shortest_edge': n} or a square {'height': n, 'width': n}"
    )


def load_clip_preprocessing(path: str | os.PathLike[str], image_size: int) -> CLIPImagePreprocessing:
    """Settings from ``preprocessor_config.json`` when the directory has one, else OpenAI CLIP's
    defaults at the vision tower's ``image_size``."""
    directory = checkpoint_dir(path)
    file = directory / _PREPROCESSOR_FILE
    if not file.is_file():
        return CLIPImagePreprocessing(shortest_edge=image_size, crop_size=image_size)
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(file)!r} is not valid JSON ({err}); re-save the image processor") from err
    shortest = _square_size(values.get("size", image_size), "size", directory)
    crop = _square_size(values.get("crop_size", image_size), "crop_size", directory) if values.get(
        "do_center_crop", True
    ) else shortest
    if crop != image_size:
        raise CheckpointError(
            f"{str(file)!r} crops to {crop} px but the vision tower expects {image_size} px images; "
            "the preprocessor config does not belong to these weights"
        )
    return CLIPImagePreprocessing(
        shortest_edge=shortest,
        crop_size=crop,
        rescale_factor=float(values.get("rescale_factor", 1 / 255)),
        mean=tuple(float(m) for m in values.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(float(s) for s in values.get("image_std", OPENAI_CLIP_STD)),
    )


_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias", "weight": "weight"}


def _vision_hf_name(path: ParamPath, prefix: str) -> str:
    if path[0] == "visual_projection":
        return "visual_projection.weight"
    if path == ("embeddings", "class_embedding"):
        return prefix + "embeddings.class_embedding"
    head = path[0].replace("layers_", "encoder.layers.")
    return prefix + ".".join([head, *path[1:-1], _LEAF[path[-1]]])


def _vision_ignored(name: str) -> bool:
    # Full CLIPModel extras, and the non-persistent position_ids buffer some old checkpoints saved.
    return (
        name.startswith(("text_model.", "text_projection."))
        or name == "logit_scale"
        or name.endswith("embeddings.position_ids")
    )


def _expected_tree(module: CLIPVisionEncoder) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    cfg = module.config
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    return traverse_util.flatten_dict(shapes["params"])


def load_clip_vision_encoder(
    path: str | os.PathLike[str], dtype: Any = jnp.float32, sharding: ShardingArg = None
) -> tuple[CLIPVisionEncoder, dict[str, Any]]:
    """CLIP vision tower from a HF directory (CLIPModel, CLIPVisionModelWithProjection, CLIPVisionModel).

    The projection is used iff the weights contain ``visual_projection.weight``. ``sharding`` as in
    ``ediff_jax.text.load_t5_encoder``.
    """
    target = float_dtype(dtype)
    directory = checkpoint_dir(path)
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type not in VISION_MODEL_TYPES:
        raise CheckpointError(
            f"load_clip_vision_encoder got {str(directory)!r} whose config.json has model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); it expects model_type in {list(VISION_MODEL_TYPES)} "
            "(a CLIPModel or CLIPVisionModel(WithProjection) directory)."
        )
    vision_config = (config.get("vision_config") or {}) if model_type == "clip" else config
    with open_checkpoint(directory) as reader:
        names = set(reader.names())
        projection = "visual_projection.weight"
        projection_dim = reader.shape(projection)[0] if projection in names else None
        try:
            module_config = CLIPVisionEncoderConfig.from_hf_dict(vision_config, projection_dim)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"unsupported CLIP vision config in {str(directory)!r}: {err}") from err
        module = CLIPVisionEncoder(module_config, dtype=target)
        expected = _expected_tree(module)
        # transformers 5 saves CLIPVisionModel without the "vision_model." prefix; older ones and
        # CLIPVisionModelWithProjection / CLIPModel use it.
        prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
        hf_names = {p: _vision_hf_name(p, prefix) for p in expected}
        params = assemble(reader, expected, hf_names, _vision_ignored, target, sharding, directory)
    return module, params
