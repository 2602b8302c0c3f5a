"""CLIP score of generated images against their prompts, with user-supplied CLIP weights.

``CLIP score = 100 * max(cos(image_embedding, text_embedding), 0)`` per image/prompt pair,
averaged (Hessel et al., 2021, with w = 100 as in torchmetrics). The image side is our Flax
vision tower, the text side our Flax text tower, both read from one Hugging Face ``CLIPModel``
directory (or a vision directory plus ``text_path``), or hub ids of such repos, fetched through
the Hugging Face cache (``ediff_jax.hub``).

Preprocessing is CLIP's own (``CLIPImageProcessor``): Pillow bicubic resize of the shortest
side (on uint8, as transformers does), centre crop, rescale, normalise; reproducing it exactly
matters because CLIP scores move visibly with the resampling filter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ediff_jax.eval.clip_loading import (
    CLIPImagePreprocessing,
    load_clip_preprocessing,
    load_clip_vision_encoder,
)
from ediff_jax.eval.clip_vision import CLIPVisionEncoder
from ediff_jax.eval.frechet import compute_features
from ediff_jax.hf_checkpoint import CheckpointError, checkpoint_dir
from ediff_jax.text.clip import CLIPTextEncoder
from ediff_jax.text.loading import load_clip_text_encoder, load_tokenizer


def clip_preprocess(images: np.ndarray, preprocessing: CLIPImagePreprocessing) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, crop, crop, 3], channels last, CLIP-normalised."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"clip_preprocess expects uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}; "
            "convert [-1, 1] floats with ediff_jax.images.to_uint8"
        )
    p = preprocessing
    out = np.empty((len(images), p.crop_size, p.crop_size, 3), np.float32)
    mean, std = np.asarray(p.mean, np.float32), np.asarray(p.std, np.float32)
    for i, image in enumerate(images):
        height, width = image.shape[:2]
        # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
        short, long = sorted((height, width))
        new_long = int(p.shortest_edge * long / short)
        new_height, new_width = (p.shortest_edge, new_long) if height <= width else (new_long, p.shortest_edge)
        pil_image = Image.fromarray(np.ascontiguousarray(image))
        resized = np.asarray(pil_image.resize((new_width, new_height), Image.Resampling.BICUBIC))
        top, left = (new_height - p.crop_size) // 2, (new_width - p.crop_size) // 2
        crop = resized[top : top + p.crop_size, left : left + p.crop_size].astype(np.float32)
        out[i] = (crop * np.float32(p.rescale_factor) - mean) / std
    return out


def clip_score_from_embeddings(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Per-pair ``100 * max(cos, 0)`` [N] of matching rows of two [N, D] embedding matrices."""
    a = np.asarray(image_embeddings, np.float64)
    b = np.asarray(text_embeddings, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"need image and text embeddings of one shape [N, D], got {a.shape} and {b.shape}; "
            "pass one prompt per image"
        )
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100.0 * np.maximum(cosine, 0.0)


class CLIPScorer:
    """Projected CLIP image and text embeddings, and CLIP scores of image/prompt pairs."""

    def __init__(
        self,
        vision: tuple[CLIPVisionEncoder, Any],
        text: tuple[CLIPTextEncoder, Any],
        tokenizer: Any,
        preprocessing: CLIPImagePreprocessing,
    ):
        vision_module, vision_params = vision
        text_module, text_params = text
        image_dim, text_dim = vision_module.config.projection_dim, text_module.config.projection_dim
        if image_dim is None or text_dim is None or image_dim != text_dim:
            raise CheckpointError(
                "CLIP score needs projected embeddings of one width: got visual_projection "
                f"{image_dim} and text_projection {text_dim}; load a CLIPModel directory (or "
                "CLIPVisionModelWithProjection + CLIPTextModelWithProjection from the same model)"
            )
        self.preprocessing = preprocessing
        self.tokenizer = tokenizer
        self.max_length = text_module.config.max_position_embeddings
        # Params are arguments, not closures: closed-over arrays would be baked into the program.
        self._vision_params, self._text_params = vision_params, text_params
        self._vision_apply = jax.jit(lambda p, x: vision_module.apply({"params": p}, x)[1])
        self._text_apply = jax.jit(lambda p, ids, mask: text_module.apply({"params": p}, ids, mask)[1])

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        text_path: str | os.PathLike[str] | None = None,
        dtype: Any = jnp.float32,
    ) -> CLIPScorer:
        """Both towers from a ``CLIPModel`` directory, or the text tower and tokenizer from
        ``text_path`` when ``path`` holds only a vision model. Either may be a hub id
        ``org/name[@revision]``; each is resolved once, so all parts come from one snapshot."""
        vision_dir = checkpoint_dir(path)
        text_dir = vision_dir if text_path is None else checkpoint_dir(text_path)
        vision_module, vision_params = load_clip_vision_encoder(vision_dir, dtype)
        text = load_clip_text_encoder(text_dir, dtype)
        preprocessing = load_clip_preprocessing(vision_dir, vision_module.config.image_size)
        return cls((vision_module, vision_params), text, load_tokenizer(text_dir), preprocessing)

    def _embed_images(self, images: np.ndarray) -> jax.Array:
        return self._vision_apply(self._vision_params, clip_preprocess(images, self.preprocessing))

    def image_embeddings(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Projected (not normalised) embeddings [N, D] of uint8 images [N, H, W, 3]."""
        return compute_features(self._embed_images, images, batch_size)

    def text_embeddings(self, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Projected (not normalised) embeddings [N, D]; prompts are padded to the position table."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to embed")
        chunks = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            real = len(batch)
            batch = batch + [batch[-1]] * (min(batch_size, len(prompts)) - real)  # one compiled shape
            tokens = self.tokenizer(
                batch, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
            )
            ids, mask = tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
            out = self._text_apply(self._text_params, ids, mask)
            chunks.append(np.asarray(out, np.float64)[:real])
        return np.concatenate(chunks)

    def scores(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """CLIP score [N] of each image against its own prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        return clip_score_from_embeddings(
            self.image_embeddings(images, batch_size), self.text_embeddings(prompts, batch_size)
        )


def clip_score(scorer: CLIPScorer, images: np.ndarray, prompts: Sequence[str], batch_size: int = 64) -> float:
    """Mean CLIP score over image/prompt pairs."""
    return float(np.mean(scorer.scores(images, prompts, batch_size)))
