"""Frozen text encoders (T5, CLIP) in Flax, loaded from Hugging Face checkpoint directories."""

from ediff_jax.text.clip import CLIPTextEncoder, CLIPTextEncoderConfig
from ediff_jax.text.loading import (
    CheckpointError,
    load_clip_text_encoder,
    load_t5_encoder,
    load_tokenizer,
    resolve_text_path,
)
from ediff_jax.text.t5 import T5Encoder, T5EncoderConfig

__all__ = [
    "CLIPTextEncoder",
    "CLIPTextEncoderConfig",
    "CheckpointError",
    "T5Encoder",
    "T5EncoderConfig",
    "load_clip_text_encoder",
    "load_t5_encoder",
    "load_tokenizer",
    "resolve_text_path",
]
