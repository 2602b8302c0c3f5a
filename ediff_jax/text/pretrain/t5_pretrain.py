"""Span-corruption pretraining of our Flax ``T5Encoder`` with a small T5 decoder used only here.

Only the encoder is shipped. Its parameter tree is exactly ``T5Encoder(cfg).init``'s, so it exports
to HF ``T5EncoderModel`` names unchanged. Design choices (T5 v1.1, which the builtin config follows):

* the decoder reads its input tokens from the encoder's ``shared`` embedding (T5 shares it), so
  the decoder's gradients also train the shipped embedding table;
* the LM head is untied by default (v1.1, ``tie_word_embeddings=False`` as in the builtin config);
  ``tied_lm_head=True`` gives v1.0's tied head with the ``d_model**-0.5`` rescale;
* parameters are (re)initialised with T5's scheme (HF ``T5PreTrainedModel._init_weights``, factor
  1): Flax's defaults would give q the same scale as k, but T5 computes QK without 1/sqrt(d_kv) and
  relies on q's init std ``(d_model * d_kv)**-0.5`` instead; Flax's default embedding std is
  ``d_model**-0.5`` where T5 uses 1. The untied head uses std ``d_model**-0.5`` (HF uses 1, which
  starts the softmax with logits of std sqrt(d_model)) so that initial logits are of unit scale.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ediff_jax.data.shapes import COLORS, SHAPES
from ediff_jax.text.pretrain import span_corruption as sc
from ediff_jax.text.t5 import (
    T5Encoder,
    T5EncoderConfig,
    T5FeedForward,
    T5LayerNorm,
    relative_position_buckets,
)

Params = dict[str, Any]
# Not T5's 0.15 / 3: on 3-10 token captions that hides a single token per caption, which the decoder
# fills from the template alone; hiding half the caption in short spans makes the encoder carry
# which word sits where (what the binding probe reads). Both are within the T5 paper's sweep.
NOISE_DENSITY = 0.5
MEAN_NOISE_SPAN_LENGTH = 2.0


# ----------------------------------------------------------------------------------------------
# Decoder


class T5DecoderAttention(nn.Module):
    """T5 attention of ``x`` over ``kv`` (no QK scaling): causal self-attention with unidirectional
    relative buckets, or cross-attention without position bias."""

    config: T5EncoderConfig
    causal: bool
    has_relative_bias: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, kv: jax.Array, kv_valid: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        batch, q_len, _ = x.shape
        k_len = kv.shape[1]
        inner = cfg.num_heads * cfg.d_kv
        dense = partial(nn.Dense, use_bias=False)
        q = dense(inner, name="q")(x).reshape(batch, q_len, cfg.num_heads, cfg.d_kv)
        k = dense(inner, name="k")(kv).reshape(batch, k_len, cfg.num_heads, cfg.d_kv)
        v = dense(inner, name="v")(kv).reshape(batch, k_len, cfg.num_heads, cfg.d_kv)
        if position_bias is None:
            if self.has_relative_bias:
                buckets = relative_position_buckets(
                    q_len,
                    k_len,
                    cfg.relative_attention_num_buckets,
                    cfg.relative_attention_max_distance,
                    bidirectional=False,
                )
                table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, name="relative_attention_bias")
                position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]
            else:
                position_bias = jnp.zeros((1, cfg.num_heads, q_len, k_len), jnp.float32)
        allowed = kv_valid[:, None, None, :].astype(bool)
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((q_len, k_len), bool))[None, None]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + position_bias
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, q_len, inner)
        return dense(cfg.d_model, name="o")(out), position_bias


class T5DecoderBlock(nn.Module):
    """Pre-norm residual block: causal self-attention, cross-attention, feed-forward."""

    config: T5EncoderConfig
    has_relative_bias: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, enc: jax.Array, enc_valid: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        eps = cfg.layer_norm_epsilon
        h = T5LayerNorm(eps, name="self_attn_norm")(x)
        self_valid = jnp.ones(x.shape[:2], bool)  # right padding: the causal mask already hides it
        h, position_bias = T5DecoderAttention(cfg, True, self.has_relative_bias, name="self_attention")(
            h, h, self_valid, position_bias
        )
        x = x + h
        h = T5LayerNorm(eps, name="cross_attn_norm")(x)
        h, _ = T5DecoderAttention(cfg, False, name="cross_attention")(h, enc, enc_valid, None)
        x = x + h
        h = T5LayerNorm(eps, name="ff_norm")(x)
        return x + T5FeedForward(cfg, name="ff")(h), position_bias


class T5SpanDecoder(nn.Module):
    """``apply(p, decoder_input_ids [B, T], encoder_out [B, L, D], encoder_mask [B, L],
    embedding [V, D]) -> logits [B, T, V]``; ``config.num_layers`` is the decoder depth."""

    config: T5EncoderConfig
    tied_lm_head: bool = False

    @nn.compact
    def __call__(
        self, decoder_input_ids: jax.Array, encoder_out: jax.Array, encoder_mask: jax.Array, embedding: jax.Array
    ) -> jax.Array:
        cfg = self.config
        chex.assert_rank([decoder_input_ids, encoder_out, encoder_mask, embedding], [2, 3, 2, 2])
        chex.assert_shape(embedding, (cfg.vocab_size, cfg.d_model))
        chex.assert_equal_shape_prefix([decoder_input_ids, encoder_out, encoder_mask], 1)
        x = jnp.take(embedding, decoder_input_ids, axis=0)
        position_bias = None
        for i in range(cfg.num_layers):
            x, position_bias = T5DecoderBlock(cfg, i == 0, name=f"block_{i}")(
                x, encoder_out, encoder_mask.astype(bool), position_bias
            )
        x = T5LayerNorm(cfg.layer_norm_epsilon, name="final_layer_norm")(x)
        if self.tied_lm_head:
            logits = (x * cfg.d_model**-0.5) @ embedding.T
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")(x)
        chex.assert_shape(logits, (*decoder_input_ids.shape, cfg.vocab_size))
        return logits


def decoder_config_for(encoder_config: T5EncoderConfig, decoder_layers: int) -> T5EncoderConfig:
    """The decoder's config: the encoder's widths with its own depth."""
    return dataclasses.replace(encoder_config, num_layers=decoder_layers, per_layer_position_bias=False)


def decoder_from_params(encoder_config: T5EncoderConfig, decoder_params: Params) -> T5SpanDecoder:
    """The decoder module that ``decoder_params`` belong to (depth and head read off the tree)."""
    layers = sum(1 for name in decoder_params if name.startswith("block_"))
    return T5SpanDecoder(decoder_config_for(encoder_config, layers), tied_lm_head="lm_head" not in decoder_params)


# ----------------------------------------------------------------------------------------------
# T5 initialisation


def _t5_init_std(path: tuple[str, ...], config: T5EncoderConfig) -> float | None:
    """HF ``_init_weights`` std for a leaf (factor 1); None means ones (norm scales)."""
    d, d_kv, heads = config.d_model, config.d_kv, config.num_heads
    leaf = path[-2:]
    if leaf[-1] == "weight":
        return None
    stds = {
        ("shared", "embedding"): 1.0,
        ("relative_attention_bias", "embedding"): d**-0.5,
        ("q", "kernel"): (d * d_kv) ** -0.5,
        ("k", "kernel"): d**-0.5,
        ("v", "kernel"): d**-0.5,
        ("o", "kernel"): (heads * d_kv) ** -0.5,
        ("wi", "kernel"): d**-0.5,
        ("wi_0", "kernel"): d**-0.5,
        ("wi_1", "kernel"): d**-0.5,
        ("wo", "kernel"): config.d_ff**-0.5,
        ("lm_head", "kernel"): d**-0.5,
    }
    if leaf not in stds:
        raise ValueError(f"no T5 init rule for parameter {'/'.join(path)}")
    return stds[leaf]


def t5_init(params: Params, config: T5EncoderConfig, key: jax.Array) -> Params:
    """``params`` redrawn with T5's init scheme; same tree, shapes and dtypes."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(key, len(flat))
    out = {}
    for k, (path, value) in zip(keys, sorted(flat.items())):
        std = _t5_init_std(path, config)
        if std is None:
            out[path] = jnp.ones_like(value)
        else:
            out[path] = (std * jax.random.normal(k, value.shape, jnp.float32)).astype(value.dtype)
    return traverse_util.unflatten_dict(out)


def _init_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    enc_key, dec_key, enc_init, dec_init = jax.random.split(key, 4)
    return enc_key, dec_key, enc_init, dec_init


def initial_encoder_params(encoder_config: T5EncoderConfig, seed: int) -> Params:
    """The T5-initialised encoder that ``pretrain_t5_encoder(..., seed=seed)`` starts from: the
    fair random-init baseline (Flax's default init is not T5's)."""
    enc_key, _, enc_init, _ = _init_keys(jax.random.key(seed))
    ids = jnp.zeros((1, 8), jnp.int32)
    params = T5Encoder(encoder_config).init(enc_key, ids, jnp.ones_like(ids))["params"]
    return t5_init(params, encoder_config, enc_init)


def init_span_model(
    encoder_config: T5EncoderConfig, decoder: T5SpanDecoder, key: jax.Array, input_length: int, target_length: int
) -> Params:
    """``{"encoder": T5Encoder params, "decoder": T5SpanDecoder params}``, T5-initialised."""
    enc_key, dec_key, enc_init, dec_init = _init_keys(key)
    ids = jnp.zeros((1, input_length), jnp.int32)
    encoder_params = T5Encoder(encoder_config).init(enc_key, ids, jnp.ones_like(ids))["params"]
    embedding = encoder_params["shared"]["embedding"]
    enc_out = jnp.zeros((1, input_length, encoder_config.d_model))
    decoder_params = decoder.init(
        dec_key, jnp.zeros((1, target_length), jnp.int32), enc_out, jnp.ones_like(ids), embedding
    )["params"]
    return {
        "encoder": t5_init(encoder_params, encoder_config, enc_init),
        "decoder": t5_init(decoder_params, decoder.config, dec_init),
    }


# ----------------------------------------------------------------------------------------------
# Loss and training


def span_logits(
    encoder: T5Encoder,
    decoder: T5SpanDecoder,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    decoder_input_ids: jax.Array,
) -> jax.Array:
    """Teacher-forced logits [B, T, V] of the targets."""
    encoded = encoder.apply({"params": params["encoder"]}, input_ids, attention_mask)
    embedding = params["encoder"]["shared"]["embedding"]
    return decoder.apply({"params": params["decoder"]}, decoder_input_ids, encoded, attention_mask, embedding)


def span_loss(
    encoder: T5Encoder, decoder: T5SpanDecoder, params: Params, batch: Mapping[str, jax.Array]
) -> jax.Array:
    """Mean cross-entropy over real target tokens (EOS included, padding excluded)."""
    logits = span_logits(
        encoder, decoder, params, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["target_ids"])
    mask = batch["target_mask"].astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _as_arrays(batch: sc.SpanBatch) -> dict[str, np.ndarray]:
    return dataclasses.asdict(batch)


def make_optimizer(lr: float, steps: int, warmup_steps: int, weight_decay: float) -> optax.GradientTransformation:
    """AdamW, linear warmup then cosine decay to lr/10, global-norm clipping at 1; no decay on
    norm scales (1-D)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1), lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay, mask=decay_mask),
    )


class PretrainResult(NamedTuple):
    encoder_params: Params  # exactly T5Encoder(encoder_config).init(...)["params"]'s tree
    decoder_params: Params  # T5SpanDecoder; use decoder_from_params to rebuild the module
    history: list[dict[str, float]]  # {"step", "loss" (mean over the last log_every steps), "seconds"}


def pretrain_t5_encoder(
    encoder_config: T5EncoderConfig,
    tokenizer,
    train_captions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float = 3e-3,
    decoder_layers: int = 1,
    tied_lm_head: bool = False,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    log_every: int = 100,
) -> PretrainResult:
    """Pretrains a T5 encoder by span corruption of ``train_captions``; deterministic given ``seed``.

    ``tokenizer`` is a T5 tokenizer with sentinels ``<extra_id_0>``, ... (as many as a caption can
    have spans, see ``span_corruption.sentinels_needed``); ``encoder_config.vocab_size`` must cover
    it. Every step draws a fresh batch of captions and fresh corruptions from
    ``np.random.default_rng(seed)``. The encoder starts from ``initial_encoder_params(cfg, seed)``.
    ``warmup_steps`` defaults to 5% of ``steps``.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if len(tokenizer) > encoder_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {encoder_config.vocab_size}")
    token_ids = sc.tokenize_captions(tokenizer, train_captions)
    sentinels = sc.sentinel_ids_of(tokenizer, sc.sentinels_needed(token_ids, noise_density, mean_noise_span_length))
    input_length, target_length = sc.span_lengths_for(token_ids, noise_density, mean_noise_span_length)
    encoder = T5Encoder(encoder_config)
    decoder = T5SpanDecoder(decoder_config_for(encoder_config, decoder_layers), tied_lm_head)
    params = init_span_model(encoder_config, decoder, jax.random.key(seed), input_length, target_length)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    optimizer = make_optimizer(lr, steps, warmup, weight_decay)
    opt_state = optimizer.init(params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params: Params, opt_state: Any, batch: dict[str, jax.Array]) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(partial(span_loss, encoder, decoder))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)

    def next_batch() -> dict[str, np.ndarray]:
        rows = rng.integers(0, len(token_ids), batch_size)
        return _as_arrays(
            sc.make_span_batch(
                [token_ids[i] for i in rows],
                sentinels,
                tokenizer.eos_token_id,
                rng,
                input_length,
                target_length,
                noise_density,
                mean_noise_span_length,
                pad_id=tokenizer.pad_token_id,
            )
        )

    history: list[dict[str, float]] = []
    pending: list[jax.Array] = []
    start = time.perf_counter()
    batch = next_batch()
    for step in range(1, steps + 1):
        params, opt_state, loss = train_step(params, opt_state, batch)
        pending.append(loss)
        if step < steps:
            batch = next_batch()  # built on the host while the device runs the step
        if step % log_every == 0 or step == steps:
            mean_loss = float(jnp.mean(jnp.stack(pending)))
            pending = []
            seconds = time.perf_counter() - start
            history.append({"step": step, "loss": mean_loss, "seconds": seconds})
            logging.info("t5 span pretraining step %d/%d: loss %.4f (%.1f s)", step, steps, mean_loss, seconds)
    return PretrainResult(params["encoder"], params["decoder"], history)


# ----------------------------------------------------------------------------------------------
# Evaluation

CATEGORIES = ("sentinel", "eos", "color", "shape", "spatial", "template")
_SPATIAL_WORDS = frozenset({"top", "bottom", "left", "right", "center", "above", "below"})


def _word_category(word: str) -> int:
    if word in COLORS:
        return CATEGORIES.index("color")
    if word in SHAPES:
        return CATEGORIES.index("shape")
    if word in _SPATIAL_WORDS:
        return CATEGORIES.index("spatial")
    return CATEGORIES.index("template")


def token_categories(tokenizer, captions: Sequence[str]) -> list[np.ndarray]:
    """Per token (no EOS) of each caption: the ``CATEGORIES`` index of the word it belongs to."""
    encoded = tokenizer(list(captions), add_special_tokens=False)
    out = []
    for i, caption in enumerate(captions):
        words = caption.lower().split()
        word_ids = encoded.word_ids(i)
        out.append(np.asarray([_word_category(words[w]) for w in word_ids], np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class _EvalExamples:
    batch: sc.SpanBatch
    categories: np.ndarray  # int32 [N, target_length]; CATEGORIES index, -1 on padding


def _eval_examples(
    tokenizer,
    captions: Sequence[str],
    rng: np.random.Generator,
    noise_density: float,
    mean_noise_span_length: float,
) -> _EvalExamples:
    token_ids = sc.tokenize_captions(tokenizer, captions)
    cats = token_categories(tokenizer, captions)
    sentinels = sc.sentinel_ids_of(tokenizer, sc.sentinels_needed(token_ids, noise_density, mean_noise_span_length))
    input_length, target_length = sc.span_lengths_for(token_ids, noise_density, mean_noise_span_length)
    pairs, cat_rows = [], []
    sentinel_cat = [CATEGORIES.index("sentinel")] * len(sentinels)
    for ids, cat in zip(token_ids, cats):
        mask = sc.random_spans_noise_mask(ids.size, noise_density, mean_noise_span_length, rng, random_roll=True)
        pairs.append(sc.apply_noise_mask(ids, mask, sentinels))
        cat_rows.append(np.append(sc.apply_noise_mask(cat, mask, sentinel_cat)[1], CATEGORIES.index("eos")))
    batch = sc.pad_span_batch(pairs, tokenizer.eos_token_id, input_length, target_length, tokenizer.pad_token_id)
    categories = np.full(batch.target_ids.shape, -1, np.int32)
    for row, c in enumerate(cat_rows):
        categories[row, : c.size] = c
    return _EvalExamples(batch, categories)


def _greedy_decode(
    encoder: T5Encoder, decoder: T5SpanDecoder, params: Params, input_ids: jax.Array, attention_mask: jax.Array, length: int
) -> jax.Array:
    """Greedy targets [B, length], recomputing the (tiny) decoder on the whole prefix each step."""
    encoded = encoder.apply({"params": params["encoder"]}, input_ids, attention_mask)
    embedding = params["encoder"]["shared"]["embedding"]

    def body(t: int, out: jax.Array) -> jax.Array:
        dec_in = jnp.pad(out[:, :-1], ((0, 0), (1, 0)))  # shift right, start token 0
        logits = decoder.apply({"params": params["decoder"]}, dec_in, encoded, attention_mask, embedding)
        return out.at[:, t].set(jnp.argmax(logits[:, t], axis=-1).astype(out.dtype))

    return jax.lax.fori_loop(0, length, body, jnp.zeros((input_ids.shape[0], length), jnp.int32))


def span_reconstruction_accuracy(
    encoder_config: T5EncoderConfig,
    encoder_params: Params,
    decoder_params: Params,
    tokenizer,
    captions: Sequence[str],
    *,
    seed: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    batch_size: int = 1024,
    reference_captions: Sequence[str] | None = None,
) -> dict[str, float]:
    """Held-out span reconstruction: one corruption per caption (``seed``), teacher-forced.

    Primary: ``content_accuracy``, the teacher-forced accuracy of the replaced tokens. Also
    ``accuracy_<category>`` for sentinel, eos, color, shape, spatial (region/relation words) and
    template words, ``token_accuracy`` over all target tokens, ``loss``, and ``exact_match`` of
    greedy decoding (the whole target through EOS). Colours and shapes are sampled uniformly, so a
    hidden colour is mostly unpredictable. With ``reference_captions`` the same numbers are also
    given (``bayes_*``) for the Bayes-optimal predictor of the next target token given the inputs and
    target prefix, for captions drawn from the reference captions' empirical distribution and T5's
    mask law (enumerated exactly). With a large sample of the caption distribution as reference
    (covering the evaluated strings) no model can do better on average; contexts absent from the
    reference count as wrong.
    """
    rng = np.random.default_rng(seed)
    ex = _eval_examples(tokenizer, captions, rng, noise_density, mean_noise_span_length)
    encoder = T5Encoder(encoder_config)
    decoder = decoder_from_params(encoder_config, decoder_params)
    params = {"encoder": encoder_params, "decoder": decoder_params}
    b = ex.batch
    chex.assert_equal_shape([b.target_ids, ex.categories])

    @jax.jit
    def evaluate(params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits = span_logits(
            encoder, decoder, params, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])
        greedy = _greedy_decode(
            encoder, decoder, params, batch["input_ids"], batch["attention_mask"], batch["target_ids"].shape[1]
        )
        return jnp.argmax(logits, axis=-1), ce, greedy

    arrays = _as_arrays(b)
    preds, ces, greedys = [], [], []
    for lo in range(0, len(captions), batch_size):
        chunk = {k: v[lo : lo + batch_size] for k, v in arrays.items()}
        pred, ce, greedy = evaluate(params, chunk)
        preds.append(np.asarray(pred))
        ces.append(np.asarray(ce))
        greedys.append(np.asarray(greedy))
    pred, ce, greedy = (np.concatenate(x) for x in (preds, ces, greedys))
    valid = b.target_mask.astype(bool)
    results = _accuracy_breakdown(pred == b.target_ids, ex.categories, valid)
    results["loss"] = float(ce[valid].mean())
    results["exact_match"] = float(_exact_match(greedy, b.target_ids, valid).mean())
    results["num_captions"] = float(len(captions))
    if reference_captions is not None:
        table = _next_token_table(tokenizer, reference_captions, noise_density, mean_noise_span_length)
        bayes = _table_predictions(table, b)
        for key, value in _accuracy_breakdown(bayes == b.target_ids, ex.categories, valid).items():
            results[f"bayes_{key}"] = value
    return results


def _accuracy_breakdown(correct: np.ndarray, categories: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    content = valid & (categories >= CATEGORIES.index("color"))
    out = {
        "token_accuracy": float(correct[valid].mean()),
        "content_accuracy": float(correct[content].mean()) if content.any() else float("nan"),
    }
    for i, name in enumerate(CATEGORIES):
        sel = valid & (categories == i)
        out[f"accuracy_{name}"] = float(correct[sel].mean()) if sel.any() else float("nan")
        out[f"count_{name}"] = float(sel.sum())
    return out


def _exact_match(predicted: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """bool[B]: the prediction equals the target on every real target position (through EOS)."""
    return np.all((predicted == targets) | ~valid, axis=1)


def _next_token_table(
    tokenizer, captions: Sequence[str], noise_density: float, mean_noise_span_length: float
) -> dict[tuple[tuple[int, ...], tuple[int, ...]], int]:
    """(inputs, target prefix) -> the most probable next target token, exactly, when captions are
    drawn from the empirical distribution of ``captions`` and masks from T5's (rolled) law."""
    frequency: dict[str, int] = {}
    for caption in captions:
        frequency[caption] = frequency.get(caption, 0) + 1
    distinct = sorted(frequency)
    counts: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[int, float]] = {}
    token_ids = sc.tokenize_captions(tokenizer, distinct)
    sentinels = sc.sentinel_ids_of(tokenizer, sc.sentinels_needed(token_ids, noise_density, mean_noise_span_length))
    eos = tokenizer.eos_token_id
    laws: dict[int, dict[tuple[bool, ...], float]] = {}
    for caption, ids in zip(distinct, token_ids):
        if ids.size not in laws:
            laws[ids.size] = sc.noise_mask_distribution(ids.size, noise_density, mean_noise_span_length, True)
        for mask, probability in laws[ids.size].items():
            inputs, targets = sc.apply_noise_mask(ids, np.asarray(mask), sentinels)
            key_in = (*inputs.tolist(), eos)
            full = [*targets.tolist(), eos]
            weight = frequency[caption] * probability
            for t, token in enumerate(full):
                slot = counts.setdefault((key_in, tuple(full[:t])), {})
                slot[token] = slot.get(token, 0.0) + weight
    return {key: max(sorted(slot), key=slot.__getitem__) for key, slot in counts.items()}


def _table_predictions(table: Mapping[tuple[tuple[int, ...], tuple[int, ...]], int], batch: sc.SpanBatch) -> np.ndarray:
    """Teacher-forced predictions of the lookup table (-1 where it never saw the context)."""
    pred = np.full(batch.target_ids.shape, -1, np.int32)
    for row in range(batch.target_ids.shape[0]):
        inputs = tuple(batch.input_ids[row, batch.attention_mask[row].astype(bool)].tolist())
        targets = batch.target_ids[row, batch.target_mask[row].astype(bool)].tolist()
        for t in range(len(targets)):
            pred[row, t] = table.get((inputs, tuple(targets[:t])), -1)
    return pred

