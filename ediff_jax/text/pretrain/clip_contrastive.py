"""Contrastive pretraining of our CLIP text tower with a small vision tower, on ``ediff_shapes``.

Why: a random text tower gives the UNet token vectors that say which words occur but nothing
the words mean together. CLIP's objective (InfoNCE, learned temperature) on image-caption pairs,
with hard negative captions that differ from the truth only in binding or order (see
``captions``), forces the text tower to encode which colour goes with which shape and which
object is where. The towers are the project's own: ``ediff_jax.text.clip.CLIPTextEncoder`` (what
ships) and ``ediff_jax.eval.clip_vision.CLIPVisionEncoder`` (same encoder layers; used here only
for training). Captions that are true of an image are never used as its negatives, whichever
batch row they come from (``captions.truth_matrix``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ediff_jax.data.shapes import caption_scene
from ediff_jax.eval.clip_vision import CLIPVisionEncoder, CLIPVisionEncoderConfig
from ediff_jax.text.clip import CLIPTextEncoder, CLIPTextEncoderConfig
from ediff_jax.text.pretrain import captions as caps

Params = dict[str, Any]
_MASKED = -1e9


@dataclasses.dataclass(frozen=True)
class ContrastiveSettings:
    """What the training run does; the defaults are the shipped encoder's recipe."""

    steps: int = 3000
    batch_size: int = 128
    negatives_per_caption: int = 4
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.05
    text_length: int = 16  # every caption of the grammar fits; causal attention makes longer padding irrelevant
    image_size: int = 32
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    seed: int = 0
    log_every: int = 100


def vision_config(text_config: CLIPTextEncoderConfig, image_size: int) -> CLIPVisionEncoderConfig:
    """A vision tower as wide and deep as the text tower, 4x4 patches, same projection width."""
    return CLIPVisionEncoderConfig(
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads,
        image_size=image_size,
        patch_size=4,
        hidden_act=text_config.hidden_act,
        projection_dim=text_config.projection_dim,
    )


def pixels(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] -> [-1, 1] float32 (the diffusion model's own range)."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ContrastiveModel:
    """Both towers and the temperature as one pure-function bundle."""

    text: CLIPTextEncoder
    vision: CLIPVisionEncoder

    def init(self, key: jax.Array, text_length: int, init_temperature: float) -> Params:
        k_text, k_vision = jax.random.split(key)
        ids = jnp.zeros((1, text_length), jnp.int32)
        cfg = self.vision.config
        images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
        return {
            "text": self.text.init(k_text, ids, jnp.ones_like(ids))["params"],
            "vision": self.vision.init(k_vision, images)["params"],
            "logit_scale": jnp.asarray(math.log(1.0 / init_temperature), jnp.float32),
        }

    def embed_text(self, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        _, pooled = self.text.apply({"params": params["text"]}, ids, mask)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

    def embed_images(self, params: Params, images: jax.Array) -> jax.Array:
        _, pooled = self.vision.apply({"params": params["vision"]}, pixels(images))
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def contrastive_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, also_true: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over B images and B captions plus extra negative captions.

    ``text_emb`` [T, D] holds the B captions first (caption i belongs to image i), then the
    negatives. ``also_true`` [B, T] marks captions other than its own that are true of an image;
    they are left out of both softmaxes rather than pushed away.
    """
    batch = image_emb.shape[0]
    chex.assert_rank([image_emb, text_emb], 2)
    chex.assert_shape(also_true, (batch, text_emb.shape[0]))
    logits = jnp.exp(logit_scale) * image_emb @ text_emb.T  # [B, T]
    own = jnp.arange(batch)
    logits = jnp.where(also_true, _MASKED, logits)
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, own)
    caption_logits = logits[:, :batch].T  # [B captions, B images]
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(caption_logits, own)
    loss = 0.5 * (image_to_text.mean() + text_to_image.mean())
    accuracy = (jnp.argmax(logits, axis=-1) == own).mean()
    return loss, {"loss": loss, "image_to_text_accuracy": accuracy, "temperature": jnp.exp(-logit_scale)}


class BatchMaker:
    """Fresh scenes every step (the dataset is procedural, so nothing is seen twice)."""

    def __init__(self, tokenizer: Any, settings: ContrastiveSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.settings.text_length, return_tensors="np"
        )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def __call__(self) -> dict[str, np.ndarray]:
        s = self.settings
        scene_set = caps.make_scene_set(s.batch_size, s.image_size, seed=int(self.rng.integers(2**63)))
        captions = caps.caption_corpus_from_scenes(scene_set.scenes, self.rng)
        negatives = caps.negatives_for_batch(scene_set.scenes, captions, s.negatives_per_caption, self.rng)
        texts = captions + negatives
        truth = caps.truth_matrix(caps.caption_codes(texts), scene_set.codes)
        truth[np.arange(s.batch_size), np.arange(s.batch_size)] = False  # its own caption is the target
        ids, mask = self.tokenize(texts)
        return {"images": scene_set.images, "ids": ids, "mask": mask, "also_true": truth}


def make_optimizer(settings: ContrastiveSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, settings.warmup_steps, max(settings.steps, settings.warmup_steps + 1), settings.lr * 0.05
    )
    # No weight decay on the temperature: it is a scale, not a weight.
    decay_mask = lambda params: {k: jax.tree.map(lambda _: k != "logit_scale", v) for k, v in params.items()}  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=settings.weight_decay, mask=decay_mask))


def train_clip(
    text_config: CLIPTextEncoderConfig, tokenizer: Any, settings: ContrastiveSettings
) -> tuple[ContrastiveModel, Params, list[dict[str, float]]]:
    """Trains both towers from scratch; returns the model, its params and the logged history."""
    model = ContrastiveModel(
        text=CLIPTextEncoder(text_config), vision=CLIPVisionEncoder(vision_config(text_config, settings.image_size))
    )
    params = model.init(jax.random.PRNGKey(settings.seed), settings.text_length, settings.init_temperature)
    optimizer = make_optimizer(settings)
    opt_state = optimizer.init(params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        def loss_fn(p):
            return contrastive_loss(
                model.embed_images(p, batch["images"]),
                model.embed_text(p, batch["ids"], batch["mask"]),
                p["logit_scale"],
                batch["also_true"],
            )

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, math.log(settings.max_logit_scale))
        return params, opt_state, metrics

    make_batch = BatchMaker(tokenizer, settings)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    # The next batch is drawn on a host thread while the device runs this step.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(make_batch)
        for i in range(1, settings.steps + 1):
            batch = upcoming.result()
            if i < settings.steps:
                upcoming = pool.submit(make_batch)
            params, opt_state, metrics = step(params, opt_state, batch)
            if i % settings.log_every == 0 or i == settings.steps:
                row = {"step": i, "seconds": time.perf_counter() - start, **{k: float(v) for k, v in metrics.items()}}
                history.append(row)
                logging.info("clip step %d: loss %.4f, in-batch accuracy %.3f, temperature %.4f",
                             i, row["loss"], row["image_to_text_accuracy"], row["temperature"])
    return model, params, history


def retrieval_accuracy(
    model: ContrastiveModel, params: Params, tokenizer: Any, settings: ContrastiveSettings,
    num_scenes: int = 1000, seed: int = 12345,
) -> dict[str, float]:
    """Zero-shot retrieval on held-out scenes: the dataset's caption must beat each of its hard negatives.

    ``accuracy`` counts an image right only if its caption scores above *every* negative;
    ``vs_<kind>`` is the pairwise rate against negatives of one kind.
    """
    rng = np.random.default_rng(seed)
    scene_set = caps.make_scene_set(num_scenes, settings.image_size, seed=seed)
    captions = [caption_scene(s, rng) for s in scene_set.scenes]
    negatives = [caps.hard_negatives(s, c, rng) for s, c in zip(scene_set.scenes, captions)]
    tokenize = BatchMaker(tokenizer, settings).tokenize
    flat = [n for per in negatives for n in per.values()]
    embed_text = jax.jit(model.embed_text)
    embed_images = jax.jit(model.embed_images)

    def embed_all(texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 512):
            chunk = texts[start : start + 512]
            ids, mask = tokenize(chunk + [chunk[-1]] * (512 - len(chunk)))
            out.append(np.asarray(embed_text(params, ids, mask))[: len(chunk)])
        return np.concatenate(out)

    caption_emb = embed_all(captions)
    negative_emb = embed_all(flat)
    image_emb = np.concatenate([np.asarray(embed_images(params, scene_set.images[i : i + 256]))
                                for i in range(0, num_scenes, 256)])
    true_score = np.sum(image_emb * caption_emb, axis=-1)
    wins: dict[str, list[bool]] = {kind: [] for kind in caps.NEGATIVE_KINDS}
    correct = []
    offset = 0
    for i, per in enumerate(negatives):
        scores = negative_emb[offset : offset + len(per)] @ image_emb[i]
        offset += len(per)
        for kind, score in zip(per, scores):
            wins[kind].append(bool(true_score[i] > score))
        correct.append(bool(np.all(true_score[i] > scores)))
    result = {"accuracy": float(np.mean(correct)), "num_scenes": float(num_scenes)}
    for kind, flags in wins.items():
        if flags:
            result[f"vs_{kind}"] = float(np.mean(flags))
            result[f"num_{kind}"] = float(len(flags))
    two = [c for c, s in zip(correct, scene_set.scenes) if len(s.objects) == 2]
    result["two_object_accuracy"] = float(np.mean(two)) if two else math.nan
    return result
