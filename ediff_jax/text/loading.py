"""Load Hugging Face T5 / CLIP text checkpoints (``config.json`` + safetensors) into our Flax modules.

The T5 and CLIP parts: model types, tokenizers, and the map from our Flax param paths to HF
tensor names. Reading the directory (safetensors, sharded indexes, builtin assets, per-leaf
placement) is `ediff_jax.hf_checkpoint`'s, shared with the CLIP vision tower in `eval/`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

# Re-exported: the text encoders' loading API names them (ediff_jax.text, build_default_assets, tests).
from ediff_jax.hf_checkpoint import (  # noqa: F401
    PRETRAINING_REPORT,
    REBUILD_COMMAND,
    CheckpointError,
    ParamPath,
    ShardingArg,
    assemble,
    checkpoint_dir,
    damaged,
    float_dtype,
    is_builtin_dir,
    open_checkpoint,
    read_config,
    resolve_text_path,
    weights_fingerprint,
)
from ediff_jax.text.clip import CLIPTextEncoder, CLIPTextEncoderConfig
from ediff_jax.text.t5 import T5Encoder, T5EncoderConfig

T5_MODEL_TYPES = ("t5", "mt5", "umt5")
CLIP_MODEL_TYPES = ("clip_text_model", "clip")




def _check_model_type(
    config: Mapping[str, Any], allowed: tuple[str, ...], loader: str, directory: pathlib.Path
) -> str:
    model_type = config.get("model_type")
    if model_type not in allowed:
        other = "load_clip_text_encoder" if loader == "load_t5_encoder" else "load_t5_encoder"
        raise CheckpointError(
            f"{loader} got {str(directory)!r} whose config.json has model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); it expects model_type in {list(allowed)}. "
            f"Point it at a matching checkpoint directory (or use {other} for the other encoder family)."
        )
    return model_type


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The transformers tokenizer saved in ``path`` (T5TokenizerFast / CLIPTokenizerFast), offline only."""
    directory = checkpoint_dir(path)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
    if not any((directory / f).is_file() for f in tokenizer_files):
        raise CheckpointError(
            f"{str(directory)!r} holds no tokenizer files (tokenizer.json / tokenizer_config.json); "
            "save one with `tokenizer.save_pretrained(dir)`."
        )
    from transformers import AutoTokenizer  # heavy import, only needed here

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # tokenizers/transformers raise many types for a damaged file
        if is_builtin_dir(directory):
            raise damaged(directory, directory / "tokenizer.json", f"could not be loaded ({err})") from err
        raise CheckpointError(f"could not load the tokenizer in {str(directory)!r}: {err}") from err


def _expected_tree(module: Any, length: int) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    ids = jnp.zeros((1, length), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, jnp.ones_like(ids))
    return traverse_util.flatten_dict(shapes["params"])



# ----------------------------------------------------------------------------------------------
# T5


_T5_EMBED_ALIAS = "encoder.embed_tokens.weight"
_T5_RENAMES = {
    "attention": "layer.0.SelfAttention",
    "attn_norm": "layer.0.layer_norm",
    "ff": "layer.1.DenseReluDense",
    "ff_norm": "layer.1.layer_norm",
    "kernel": "weight",
    "embedding": "weight",
}


def t5_hf_name(path: ParamPath, embedding_name: str) -> str:
    if path == ("shared", "embedding"):
        return embedding_name
    parts = [_T5_RENAMES.get(p, p.replace("block_", "block.")) for p in path]
    return "encoder." + ".".join(parts)


def _t5_ignored(name: str) -> bool:
    # T5Model / T5ForConditionalGeneration extras, and the tied alias of the token embedding.
    return name.startswith(("decoder.", "lm_head.")) or name in ("shared.weight", _T5_EMBED_ALIAS)


def load_t5_encoder(
    path: str | os.PathLike[str], dtype: Any = jnp.float32, sharding: ShardingArg = None
) -> tuple[T5Encoder, dict[str, Any]]:
    """T5 / mT5 / UMT5 encoder from a HF directory (T5EncoderModel, T5Model or T5ForConditionalGeneration).

    ``path``: that directory, ``builtin:NAME``, or a hub id ``org/name[@revision]`` (``ediff_jax.hub``).
    ``sharding``: None (default device), one Sharding for every leaf, or ``(param_path, shape) -> Sharding``.
    """
    target = float_dtype(dtype)
    directory = checkpoint_dir(path)
    config = read_config(directory)
    _check_model_type(config, T5_MODEL_TYPES, "load_t5_encoder", directory)
    try:
        module_config = T5EncoderConfig.from_hf_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"unsupported T5 config in {str(directory)!r}: {err}") from err
    module = T5Encoder(module_config, dtype=target)
    expected = _expected_tree(module, length=4)
    with open_checkpoint(directory) as reader:
        names = set(reader.names())
        # The token embedding is saved as shared.weight, encoder.embed_tokens.weight, or both (tied).
        only_alias = _T5_EMBED_ALIAS in names and "shared.weight" not in names
        embedding_name = _T5_EMBED_ALIAS if only_alias else "shared.weight"
        hf_names = {p: t5_hf_name(p, embedding_name) for p in expected}
        params = assemble(reader, expected, hf_names, _t5_ignored, target, sharding, directory)
    return module, params


# ----------------------------------------------------------------------------------------------
# CLIP


def clip_hf_name(path: ParamPath, prefix: str) -> str:
    if path[0] == "text_projection":
        return "text_projection.weight"
    head = {
        "token_embedding": "embeddings.token_embedding",
        "position_embedding": "embeddings.position_embedding",
    }
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    parts = [head.get(path[0], path[0].replace("layers_", "encoder.layers.")), *path[1:-1], leaf[path[-1]]]
    return prefix + ".".join(parts)


def _clip_ignored(name: str) -> bool:
    # Full CLIPModel extras, and the non-persistent position_ids buffer some old checkpoints saved.
    return (
        name.startswith(("vision_model.", "visual_projection."))
        or name == "logit_scale"
        or name.endswith("embeddings.position_ids")
    )


def load_clip_text_encoder(
    path: str | os.PathLike[str], dtype: Any = jnp.float32, sharding: ShardingArg = None
) -> tuple[CLIPTextEncoder, dict[str, Any]]:
    """CLIP text tower from a HF directory (CLIPTextModel, CLIPTextModelWithProjection or CLIPModel).

    The projection is used iff the weights contain ``text_projection.weight``. ``path`` and
    ``sharding`` as in ``load_t5_encoder``.
    """
    target = float_dtype(dtype)
    directory = checkpoint_dir(path)
    config = read_config(directory)
    model_type = _check_model_type(config, CLIP_MODEL_TYPES, "load_clip_text_encoder", directory)
    text_config = (config.get("text_config") or {}) if model_type == "clip" else config
    with open_checkpoint(directory) as reader:
        names = set(reader.names())
        projection = "text_projection.weight"
        projection_dim = reader.shape(projection)[0] if projection in names else None
        try:
            module_config = CLIPTextEncoderConfig.from_hf_dict(text_config, projection_dim)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"unsupported CLIP text config in {str(directory)!r}: {err}") from err
        module = CLIPTextEncoder(module_config, dtype=target)
        expected = _expected_tree(module, length=4)
        # transformers 5 saves CLIPTextModel without the "text_model." prefix; older ones and
        # CLIPTextModelWithProjection / CLIPModel use it.
        prefix = "text_model." if any(n.startswith("text_model.") for n in names) else ""
        hf_names = {p: clip_hf_name(p, prefix) for p in expected}
        params = assemble(reader, expected, hf_names, _clip_ignored, target, sharding, directory)
    return module, params
