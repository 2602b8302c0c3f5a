"""Text encoders as shapes only: what a plan needs of T5 and CLIP without their weights.

A pod plan compiles the train step for eDiff-I's T5-XXL and CLIP-L/14, whose weights are not
on this machine (and need not be: compiling reads shapes). The architecture comes from the
encoder directory's config.json when it exists (builtin assets, a local copy), else from the
published configs of the two paper checkpoints below. Tokenizing returns zeros of the
configured lengths: the step's shapes, not its text, are what is compiled.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax.hf_checkpoint import read_config
from ediff_jax.text.clip import CLIPTextEncoder, CLIPTextEncoderConfig
from ediff_jax.text.conditioning import TextEncoders
from ediff_jax.text.loading import checkpoint_dir
from ediff_jax.text.t5 import T5Encoder, T5EncoderConfig

# The HF config.json fields of eDiff-I's encoders (google/t5-v1_1-xxl's encoder, and the text
# tower of openai/clip-vit-large-patch14 with its 768-wide projection), matched by directory name.
PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    "t5-v1_1-xxl": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                    "num_heads": 64, "feed_forward_proj": "gated-gelu"},
    "clip-vit-large-patch14": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                               "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                               "projection_dim": 768},
}


@dataclasses.dataclass
class AbstractTextEncoders(TextEncoders):
    """`TextEncoders` whose params are ShapeDtypeStructs and whose tokenizer emits zeros."""

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        n = len(list(prompts))
        return {"t5_ids": np.zeros((n, self.t5_max_length), np.int32),
                "t5_mask": np.ones((n, self.t5_max_length), np.int32),
                "clip_ids": np.zeros((n, self.clip_max_length), np.int32),
                "clip_mask": np.ones((n, self.clip_max_length), np.int32)}


def _hf_config(path: str) -> dict[str, Any]:
    """config.json of a local or builtin encoder directory, else a paper encoder's published config."""
    expanded = Path(os.path.expanduser(str(path)))
    if str(path).startswith("builtin:") or expanded.is_dir():
        return read_config(checkpoint_dir(path))
    for name, config in PAPER_CONFIGS.items():
        if name in str(path).lower():
            return dict(config)
    raise ValueError(f"Cannot plan for text encoder {path!r}: it is not a local directory and not one of the paper's "
                     f"encoders {sorted(PAPER_CONFIGS)}. Point config.text at a directory holding its config.json "
                     "(the weights are not read).")


def _shapes(module: Any, length: int) -> Any:
    ids = jnp.zeros((1, length), jnp.int32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, jnp.ones_like(ids))["params"]


def abstract_text_encoders(text_config: Mapping[str, Any]) -> AbstractTextEncoders:
    """T5 and CLIP of `text_config` (config.text) as modules with abstract (shape-only) params."""
    t5_config = _hf_config(text_config["t5_path"])
    clip_config = _hf_config(text_config["clip_path"])
    text = (clip_config.get("text_config") or {}) if clip_config.get("model_type") == "clip" else clip_config
    projection = clip_config.get("projection_dim", text.get("projection_dim"))
    t5 = T5Encoder(T5EncoderConfig.from_hf_dict(t5_config))
    clip = CLIPTextEncoder(CLIPTextEncoderConfig.from_hf_dict(text, projection))
    t5_len, clip_len = int(text_config["t5_max_length"]), int(text_config["clip_max_length"])
    return AbstractTextEncoders(t5_module=t5, clip_module=clip,
                                params={"t5": _shapes(t5, t5_len), "clip": _shapes(clip, clip_len)},
                                t5_tokenizer=None, clip_tokenizer=None, t5_max_length=t5_len,
                                clip_max_length=clip_len)
