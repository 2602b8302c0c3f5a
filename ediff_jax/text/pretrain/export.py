"""Write trained Flax encoder params as Hugging Face model directories (config.json + safetensors).

Why: the shipped encoders must be real Hugging Face checkpoints, loadable by transformers'
PyTorch ``T5EncoderModel`` / ``CLIPTextModelWithProjection`` and by our own loader alike. The
tensor names are the exact inverse of ``ediff_jax.text.loading`` (one mapping, used both ways),
and the configs are written by transformers' own config classes. No PyTorch is needed to write.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from ediff_jax.text.clip import CLIPTextEncoderConfig
from ediff_jax.text.loading import clip_hf_name, t5_hf_name
from ediff_jax.text.t5 import T5EncoderConfig

WEIGHTS = "model.safetensors"


def _hf_tensors(params: Any, hf_name) -> dict[str, np.ndarray]:
    tensors = {}
    for path, leaf in traverse_util.flatten_dict(jax.device_get(params)).items():
        array = np.asarray(leaf, np.float32)
        if path[-1] == "kernel":
            array = array.T  # Flax Dense [in, out] -> torch Linear [out, in]
        tensors[hf_name(path)] = np.ascontiguousarray(array)
    return tensors


def export_t5_encoder(
    out_dir: pathlib.Path, config: T5EncoderConfig, params: Any, pad_token_id: int, eos_token_id: int
) -> None:
    """``T5EncoderModel`` layout: ``shared.weight`` plus ``encoder.*`` tensors."""
    from transformers import T5Config

    if config.per_layer_position_bias:
        raise ValueError("export_t5_encoder writes T5 (not UMT5) checkpoints; per_layer_position_bias must be False")
    hf_config = T5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj=config.feed_forward_proj,
        dropout_rate=0.0,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        decoder_start_token_id=pad_token_id,
        architectures=["T5EncoderModel"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    save_file(_hf_tensors(params, lambda p: t5_hf_name(p, "shared.weight")), out_dir / WEIGHTS, metadata={"format": "pt"})


def export_clip_text_encoder(
    out_dir: pathlib.Path, config: CLIPTextEncoderConfig, params: Any, bos_token_id: int, pad_token_id: int
) -> None:
    """``CLIPTextModelWithProjection`` layout (``text_model.*`` plus ``text_projection.weight``)."""
    from transformers import CLIPTextConfig

    if config.projection_dim is None:
        raise ValueError("export_clip_text_encoder writes CLIPTextModelWithProjection; the config needs projection_dim")
    hf_config = CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        projection_dim=config.projection_dim,
        bos_token_id=bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=pad_token_id,
        architectures=["CLIPTextModelWithProjection"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    save_file(_hf_tensors(params, lambda p: clip_hf_name(p, "text_model.")), out_dir / WEIGHTS, metadata={"format": "pt"})
