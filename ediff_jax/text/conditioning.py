"""Conditioning assembly: prompts -> the UNet's `cond` dict.

The cond dict holds `t5` [B, Lt, Dt], `t5_mask` [B, Lt], `clip` [B, Lc, Dc],
`clip_mask` [B, Lc] and `clip_pooled` [B, Dp]. Dropping an encoder (training dropout for
classifier-free guidance, or "use / drop" at sampling to compare T5-only, CLIP-only and
both, as eDiff-I does) zeroes its embeddings *and* its mask, so only the UNet's learned
null token stays attendable: a dropped prompt then carries no information at all, not
even its length.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax.text.loading import (
    CheckpointError,
    checkpoint_dir,
    load_clip_text_encoder,
    load_t5_encoder,
    load_tokenizer,
    weights_fingerprint,
)

Cond = dict[str, jax.Array]
ENCODERS = ("t5", "clip")


@dataclasses.dataclass
class TextEncoders:
    """Frozen T5 and CLIP encoders with their tokenizers; `params` is a jit-able pytree."""

    t5_module: Any
    clip_module: Any
    params: dict[str, Any]
    t5_tokenizer: Any
    clip_tokenizer: Any
    t5_max_length: int
    clip_max_length: int
    # sha256 of each encoder's weights: recorded with checkpoints so that a workdir is sampled with
    # the very encoders it was trained with, whatever its config's paths point at today.
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    # (encoder, prompt) pairs already reported as truncated: a training loop tokenizes the
    # same long caption every epoch, and one warning per caption is enough.
    _warned: set = dataclasses.field(default_factory=set, repr=False, compare=False)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizes for both encoders; prompts over the limit are truncated with a warning."""
        prompts = [str(p) for p in prompts]
        out = {}
        for name, tok, max_len in (
            ("t5", self.t5_tokenizer, self.t5_max_length),
            ("clip", self.clip_tokenizer, self.clip_max_length),
        ):
            full = tok(prompts, padding=False, truncation=False)["input_ids"]
            for prompt, ids in zip(prompts, full):
                if len(ids) > max_len and (name, prompt) not in self._warned:
                    self._warned.add((name, prompt))
                    logging.warning(
                        "Prompt %r is %d %s tokens, over the limit of %d: it is truncated (reported once).",
                        prompt, len(ids), name.upper(), max_len,
                    )
            enc = tok(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
            out[f"{name}_ids"] = enc["input_ids"].astype(np.int32)
            out[f"{name}_mask"] = enc["attention_mask"].astype(np.int32)
        return out

    def encode(self, params: Mapping[str, Any], tokens: Mapping[str, jax.Array]) -> Cond:
        """Runs both encoders (pure; jit it with `params` as an argument)."""
        params = jax.lax.stop_gradient(params)
        t5 = self.t5_module.apply({"params": params["t5"]}, tokens["t5_ids"], tokens["t5_mask"])
        clip, pooled = self.clip_module.apply({"params": params["clip"]}, tokens["clip_ids"], tokens["clip_mask"])
        return {
            "t5": t5.astype(jnp.float32),
            "t5_mask": tokens["t5_mask"].astype(jnp.float32),
            "clip": clip.astype(jnp.float32),
            "clip_mask": tokens["clip_mask"].astype(jnp.float32),
            "clip_pooled": pooled.astype(jnp.float32),
        }


def load_text_encoders(text_config: Mapping[str, Any], dtype: Any = jnp.float32, sharding: Any = None) -> TextEncoders:
    """Loads encoders and tokenizers from `text_config.t5_path` / `clip_path`.

    Paths are Hugging Face model directories or `builtin:NAME` for the shipped defaults.
    `sharding`: where each weight goes as it is read (None: the default device; a Sharding; or
    `(param_path, shape) -> Sharding`, e.g. `ediff_jax.sharding.encoder_leaf_sharding(mesh)`).
    """
    # Resolved once (builtin name, local directory or hub snapshot); everything below reads the directory.
    t5_dir = checkpoint_dir(text_config["t5_path"])
    clip_dir = checkpoint_dir(text_config["clip_path"])
    t5_module, t5_params = load_t5_encoder(t5_dir, dtype=dtype, sharding=sharding)
    clip_module, clip_params = load_clip_text_encoder(clip_dir, dtype=dtype, sharding=sharding)
    t5_tokenizer, clip_tokenizer = load_tokenizer(t5_dir), load_tokenizer(clip_dir)
    for name, path, tokenizer, module in (
        ("t5", text_config["t5_path"], t5_tokenizer, t5_module),
        ("clip", text_config["clip_path"], clip_tokenizer, clip_module),
    ):
        check_tokenizer_fits(name, path, tokenizer, module.config.vocab_size)
    return TextEncoders(
        t5_module=t5_module,
        clip_module=clip_module,
        params={"t5": t5_params, "clip": clip_params},
        t5_tokenizer=t5_tokenizer,
        clip_tokenizer=clip_tokenizer,
        t5_max_length=int(text_config["t5_max_length"]),
        clip_max_length=int(text_config["clip_max_length"]),
        fingerprints={
            "t5": weights_fingerprint(t5_dir),
            "clip": weights_fingerprint(clip_dir),
        },
    )


def check_tokenizer_fits(name: str, path: Any, tokenizer: Any, vocab_size: int) -> None:
    """A tokenizer that can emit ids past the embedding table would index out of range silently
    (XLA clamps gathers), so a mismatched pair is refused before anything runs."""
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the {name} encoder at {str(path)!r} has a tokenizer of {len(tokenizer)} tokens but an embedding "
            f"table of vocab_size={vocab_size}: they belong to different models. Put the tokenizer saved "
            "with these weights in the directory."
        )


def _drop(cond: Cond, name: str, keep: jax.Array) -> Cond:
    """Zeroes encoder `name` where keep == 0 (keep is [B] of 0/1).

    Paint-with-words masks (`pww_mask` [B, H, W, Lt + Lc + 1], context order
    [T5 ; CLIP ; null]) lose that encoder's token slots too: a dropped encoder's tokens
    are not attendable, so nothing may be painted on them.
    """
    cond = dict(cond)
    k = keep.astype(jnp.float32)
    cond[name] = cond[name] * k[:, None, None]
    cond[f"{name}_mask"] = cond[f"{name}_mask"] * k[:, None]
    if name == "clip":
        cond["clip_pooled"] = cond["clip_pooled"] * k[:, None]
    if "pww_mask" in cond:
        lt = cond["t5"].shape[1] if "t5" in cond else 0
        start, stop = (0, lt) if name == "t5" else (lt, lt + cond["clip"].shape[1])
        slots = jnp.zeros(cond["pww_mask"].shape[-1], jnp.float32).at[start:stop].set(1.0)
        drop = slots[None, :] * (1.0 - k[:, None])  # [B, L]: 1 where a dropped slot is
        cond["pww_mask"] = cond["pww_mask"] * (1.0 - drop[:, None, None, :])
    return cond


def dropout_conditioning(rng: jax.Array, cond: Cond, drop_rates: Mapping[str, float]) -> Cond:
    """Per-example, per-encoder dropout for training (eDiff-I: 0.25 for T5, 0.2 for CLIP).

    Encoders are dropped independently, so the model also sees T5-only, CLIP-only and
    fully unconditional examples.
    """
    batch = cond["t5"].shape[0]
    for name, key in zip(ENCODERS, jax.random.split(rng, len(ENCODERS))):
        rate = float(drop_rates.get(name, 0.0))
        if rate > 0:
            cond = _drop(cond, name, jax.random.bernoulli(key, 1.0 - rate, (batch,)))
    return cond


def select_encoders(cond: Cond, use_t5: bool = True, use_clip: bool = True) -> Cond:
    """Sampling-time "use / drop" per encoder (for T5-only vs CLIP-only vs both)."""
    batch = cond["t5"].shape[0]
    for name, use in (("t5", use_t5), ("clip", use_clip)):
        if not use:
            cond = _drop(cond, name, jnp.zeros((batch,)))
    return cond


def unconditional(cond: Cond) -> Cond:
    """The classifier-free-guidance unconditional branch: both encoders dropped.

    Paint-with-words is off there (`pww_weight` 0 and no painted text slot): eDiff-I
    biases the conditional branch only. The keys stay, with the same shapes, because
    guidance runs both branches as one batch.
    """
    cond = select_encoders(cond, use_t5=False, use_clip=False)
    if "pww_weight" in cond:
        cond["pww_weight"] = jnp.zeros_like(cond["pww_weight"])
    if "pww_mask" in cond:
        cond["pww_mask"] = jnp.zeros_like(cond["pww_mask"])
    return cond
