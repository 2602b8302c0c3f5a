"""T5's span-corruption objective in NumPy (Raffel et al. 2020, ``t5.data.preprocessors``).

``random_spans_noise_mask`` follows T5's ``random_spans_noise_mask`` step by step (same counts,
same uniform random partition, same optional ``random_roll``); ``corrupt_spans`` is
``noise_span_to_unique_sentinel`` (inputs) and ``nonnoise_span_to_unique_sentinel`` (targets),
with the sentinels passed in explicitly instead of counting down from the top of the vocabulary
(see ``corrupt_spans`` for the one difference, on rolled masks).
EOS is not part of the noised sequence (T5 appends it after ``denoise``): ``make_span_batch``
appends it to inputs and targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def _num_noise_tokens_and_spans(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    length = max(length, 2)  # T5: "increase length to avoid degeneracy"
    # np.round rounds half to even, as tf.round does.
    num_noise = int(np.round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_noise_span_length)), 1)
    # T5 would fail on a partition into more non-noise segments than non-noise tokens (only possible
    # for noise_density > 0.5); cap instead.
    num_spans = min(num_spans, length - num_noise)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random partition of ``num_items`` into ``num_segments`` non-empty runs."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_noise_span_length: float,
    rng: np.random.Generator,
    random_roll: bool = False,
) -> np.ndarray:
    """bool[length]: ``round(length * density)`` noise tokens (in [1, length-1]) in
    ``max(1, round(num_noise / mean_span))`` spans, alternating non-noise/noise from a non-noise start.

    Without ``random_roll`` (T5's default) the mask always ends in a noise span; with it the mask is
    rolled by a uniform offset in [0, length), as T5's ``random_roll=True``.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    orig_length = length
    length = max(length, 2)
    num_noise, num_spans = _num_noise_tokens_and_spans(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, np.int64)
    np.add.at(span_start_indicator, span_starts, 1)
    is_noise = np.cumsum(span_start_indicator) % 2 == 1
    mask = is_noise[:orig_length]
    if random_roll:
        mask = np.roll(mask, int(rng.integers(0, length)))
    return mask


def noise_mask_distribution(
    length: int, noise_density: float, mean_noise_span_length: float, random_roll: bool = False
) -> dict[tuple[bool, ...], float]:
    """Exact distribution of ``random_spans_noise_mask``: mask -> probability.

    T5 shuffles the segment-start indicators, so every choice of cut points is equally likely, and
    the roll offset is uniform; enumerating both gives the law exactly (small for short captions).
    """
    import itertools

    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    padded = max(length, 2)
    num_noise, num_spans = _num_noise_tokens_and_spans(padded, noise_density, mean_noise_span_length)

    def compositions(total: int) -> list[np.ndarray]:
        return [np.diff([0, *cuts, total]) for cuts in itertools.combinations(range(1, total), num_spans - 1)]

    out: dict[tuple[bool, ...], float] = {}
    noise_parts, nonnoise_parts = compositions(num_noise), compositions(padded - num_noise)
    offsets = range(padded) if random_roll else range(1)
    weight = 1.0 / (len(noise_parts) * len(nonnoise_parts) * len(offsets))
    for noise, nonnoise in itertools.product(noise_parts, nonnoise_parts):
        full = np.repeat(np.tile([False, True], num_spans), np.stack([nonnoise, noise], axis=1).reshape(-1))
        for offset in offsets:
            key = tuple(np.roll(full[:length], offset).tolist())
            out[key] = out.get(key, 0.0) + weight
    return out


def span_starts(mask: np.ndarray) -> np.ndarray:
    """bool[length]: True where a run of True in ``mask`` begins."""
    previous = np.concatenate([[False], mask[:-1]])
    return mask & ~previous


def corrupt_spans(
    ids: np.ndarray,
    sentinel_ids: Sequence[int],
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    random_roll: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` of one sequence of token ids (no EOS, no padding).

    inputs: ``ids`` with the i-th noise span replaced by ``sentinel_ids[i]``; targets: for every
    noise span in order, its sentinel followed by the tokens it replaced. This is exactly T5's
    ``noise_span_to_unique_sentinel`` / ``nonnoise_span_to_unique_sentinel`` pair when the mask
    starts with non-noise and ends with noise (always so without roll). A rolled mask may start with
    noise, where T5's pair would misalign sentinels, or end with non-noise, where T5 adds a trailing
    sentinel that stands for nothing; targets defined per noise span avoid both. ``random_roll``
    defaults to True here because our captions are 3-10 tokens and an unrolled mask always ends in
    noise, so the last word would always be hidden.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}")
    mask = random_spans_noise_mask(ids.size, noise_density, mean_noise_span_length, rng, random_roll)
    return apply_noise_mask(ids, mask, sentinel_ids)


def apply_noise_mask(ids: np.ndarray, mask: np.ndarray, sentinel_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``corrupt_spans`` for a given mask."""
    ids = np.asarray(ids)
    mask = np.asarray(mask, bool)
    if mask.shape != ids.shape:
        raise ValueError(f"mask shape {mask.shape} != ids shape {ids.shape}")
    starts = span_starts(mask)
    num_spans = int(starts.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(f"{num_spans} noise spans but only {len(sentinel_ids)} sentinel ids")
    sentinels = np.asarray(sentinel_ids, ids.dtype)[:num_spans]
    inputs = ids.copy()
    inputs[starts] = sentinels
    inputs = inputs[~(mask & ~starts)]  # keep non-noise tokens and the sentinel of each span
    pieces = []
    ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]])) + 1
    for sentinel, start, end in zip(sentinels, np.flatnonzero(starts), ends):
        pieces += [sentinel[None], ids[start:end]]
    targets = np.concatenate(pieces) if pieces else np.zeros(0, ids.dtype)
    return inputs, targets.astype(ids.dtype)


def uncorrupt(inputs: np.ndarray, targets: np.ndarray, sentinel_ids: Sequence[int]) -> np.ndarray:
    """The original ids from ``(inputs, targets)`` (no EOS): every sentinel in ``inputs`` replaced by
    the tokens that follow the same sentinel in ``targets``."""
    sentinel_set = {int(s) for s in sentinel_ids}
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for token in np.asarray(targets).tolist():
        if token in sentinel_set:
            if token in spans:
                raise ValueError(f"sentinel {token} occurs twice in targets")
            current = token
            spans[current] = []
        elif current is None:
            raise ValueError("targets must start with a sentinel")
        else:
            spans[current].append(token)
    out: list[int] = []
    for token in np.asarray(inputs).tolist():
        if token in sentinel_set:
            out.extend(spans.pop(token))
        else:
            out.append(token)
    if spans:
        raise ValueError(f"sentinels {sorted(spans)} are in targets but not in inputs")
    return np.asarray(out, np.asarray(inputs).dtype)


def max_corrupted_lengths(
    length: int, noise_density: float, mean_noise_span_length: float, random_roll: bool = True
) -> tuple[int, int]:
    """Upper bounds of ``(len(inputs), len(targets))`` for ``length`` ids, each plus one EOS.

    A roll can split one span in two (wrapping around the end), hence one extra sentinel.
    """
    num_noise, num_spans = _num_noise_tokens_and_spans(length, noise_density, mean_noise_span_length)
    num_noise = min(num_noise, length)
    spans = num_spans + int(random_roll)
    return length - num_noise + spans + 1, num_noise + spans + 1


def sentinels_needed(
    token_ids: Sequence[np.ndarray], noise_density: float, mean_noise_span_length: float, random_roll: bool = True
) -> int:
    """The most noise spans any corruption of these sequences can have (a roll may split one)."""
    lengths = {max(len(ids), 2) for ids in token_ids}
    return max(_num_noise_tokens_and_spans(n, noise_density, mean_noise_span_length)[1] for n in lengths) + int(
        random_roll
    )


def sentinel_ids_of(tokenizer, count: int) -> list[int]:
    """Ids of ``<extra_id_0>`` .. ``<extra_id_{count-1}>``; raises if the tokenizer lacks them."""
    tokens = [f"<extra_id_{i}>" for i in range(count)]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = tokenizer.unk_token_id
    missing = [t for t, i in zip(tokens, ids) if i is None or i == unk]
    if missing:
        raise ValueError(
            f"the tokenizer has no sentinel tokens {missing}; span corruption needs a T5 tokenizer "
            "built with extra_ids"
        )
    return list(ids)


@dataclasses.dataclass(frozen=True)
class SpanBatch:
    """One padded span-corruption batch (pad id 0; masks are 1 on real tokens, EOS included).

    ``decoder_input_ids`` is ``target_ids`` shifted right with T5's start token (pad, 0).
    """

    input_ids: np.ndarray  # int32 [B, input_length]
    attention_mask: np.ndarray  # int32 [B, input_length]
    decoder_input_ids: np.ndarray  # int32 [B, target_length]
    target_ids: np.ndarray  # int32 [B, target_length]
    target_mask: np.ndarray  # int32 [B, target_length]


def tokenize_captions(tokenizer, captions: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each caption without EOS (T5 noises the text, then appends EOS)."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    out = [np.asarray(ids, np.int32) for ids in encoded]
    empty = [c for c, ids in zip(captions, out) if ids.size == 0]
    if empty:
        raise ValueError(f"captions tokenize to nothing: {empty[:3]}")
    return out


def span_lengths_for(
    token_ids: Sequence[np.ndarray], noise_density: float, mean_noise_span_length: float, random_roll: bool = True
) -> tuple[int, int]:
    """Fixed ``(input_length, target_length)`` that fit every corruption of these sequences."""
    bounds = [max_corrupted_lengths(len(ids), noise_density, mean_noise_span_length, random_roll) for ids in token_ids]
    return max(b[0] for b in bounds), max(b[1] for b in bounds)


def make_span_batch(
    token_ids: Sequence[np.ndarray],
    sentinel_ids: Sequence[int],
    eos_id: int,
    rng: np.random.Generator,
    input_length: int,
    target_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    random_roll: bool = True,
    pad_id: int = 0,
) -> SpanBatch:
    """Corrupts every sequence (fresh draw from ``rng``), appends EOS, pads to the fixed lengths."""
    pairs = [
        corrupt_spans(ids, sentinel_ids, rng, noise_density, mean_noise_span_length, random_roll) for ids in token_ids
    ]
    return pad_span_batch(pairs, eos_id, input_length, target_length, pad_id)


def pad_span_batch(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], eos_id: int, input_length: int, target_length: int, pad_id: int = 0
) -> SpanBatch:
    """Appends EOS to each ``(inputs, targets)``, pads, and shifts the targets right for the decoder."""
    batch = len(pairs)
    input_ids = np.full((batch, input_length), pad_id, np.int32)
    target_ids = np.full((batch, target_length), pad_id, np.int32)
    attention_mask = np.zeros((batch, input_length), np.int32)
    target_mask = np.zeros((batch, target_length), np.int32)
    for row, (inputs, targets) in enumerate(pairs):
        inputs = np.append(inputs, eos_id)
        targets = np.append(targets, eos_id)
        if inputs.size > input_length or targets.size > target_length:
            raise ValueError(
                f"corrupted lengths ({inputs.size}, {targets.size}) exceed ({input_length}, {target_length})"
            )
        input_ids[row, : inputs.size] = inputs
        attention_mask[row, : inputs.size] = 1
        target_ids[row, : targets.size] = targets
        target_mask[row, : targets.size] = 1
    decoder_input_ids = np.full_like(target_ids, pad_id)  # T5's decoder start token is the pad id
    decoder_input_ids[:, 1:] = target_ids[:, :-1]
    return SpanBatch(input_ids, attention_mask, decoder_input_ids, target_ids, target_mask)

def caption_span_batch(
    tokenizer,
    captions: Sequence[str],
    rng: np.random.Generator,
    input_length: int,
    target_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    random_roll: bool = True,
    num_sentinels: int = 8,
) -> SpanBatch:
    """``make_span_batch`` straight from caption strings with a T5 tokenizer that has sentinels."""
    return make_span_batch(
        tokenize_captions(tokenizer, captions),
        sentinel_ids_of(tokenizer, num_sentinels),
        tokenizer.eos_token_id,
        rng,
        input_length,
        target_length,
        noise_density,
        mean_noise_span_length,
        random_roll,
        tokenizer.pad_token_id,
    )
