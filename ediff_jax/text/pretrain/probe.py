"""Linear probe of attribute binding for any text encoder.

On two-object captions ("a cA sA <relation> a cB sB" and "a cA sA and a cB sB") a multinomial
logistic regression on one pooled vector per caption predicts A's colour and shape, B's colour and
shape, and the relation ("none" for "and"). A bag of words knows which two colours occur but not
which belongs to A, so accuracy well above the bag-of-words level on the colour/shape targets
means the encoder represents word order / binding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax.eval.prompts import parse_prompt

TARGETS = ("a_color", "a_shape", "b_color", "b_shape", "relation")
NO_RELATION = "none"


def binding_labels(captions: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The two-object captions among ``captions`` and their per-target string labels."""
    kept: list[str] = []
    labels: dict[str, list[str]] = {t: [] for t in TARGETS}
    for caption in captions:
        parsed = parse_prompt(caption)
        if len(parsed.objects) != 2:
            continue
        a, b = parsed.objects
        kept.append(caption)
        for target, value in zip(TARGETS, (a.color, a.shape, b.color, b.shape, parsed.relation or NO_RELATION)):
            labels[target].append(value)
    return kept, labels


def split_by_caption(
    captions: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, val) with no caption string in both: the grammar has only ~1.5k distinct captions, so a
    plain random split would mostly validate on captions seen in training."""
    distinct = sorted(set(captions))
    rng = np.random.default_rng(seed)
    val_strings = set(rng.choice(distinct, size=round(len(distinct) * val_fraction), replace=False).tolist())
    train = [c for c in captions if c not in val_strings]
    val = [c for c in captions if c in val_strings]
    return train, val


def probe_binding(
    features_fn: Callable[[list[str]], np.ndarray],
    train_captions: Sequence[str],
    val_captions: Sequence[str],
    l2_c: float = 1.0,
) -> dict[str, float]:
    """Validation accuracy per target (``TARGETS``), their ``mean``, and ``chance_<target>`` /
    ``chance_mean``: the accuracy of always answering the training set's most frequent class.

    Features are standardised with the training statistics; scikit-learn's ``LogisticRegression``
    (multinomial, L-BFGS, L2 with inverse strength ``l2_c``) is fitted full batch. One-object
    captions are skipped.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    train, train_labels = binding_labels(train_captions)
    val, val_labels = binding_labels(val_captions)
    if not train or not val:
        raise ValueError(f"need two-object captions in both sets, got {len(train)} train and {len(val)} val")
    x_train = np.asarray(features_fn(train), np.float64)
    x_val = np.asarray(features_fn(val), np.float64)
    chex.assert_rank([x_train, x_val], 2)
    chex.assert_shape(x_train, (len(train), None))
    chex.assert_shape(x_val, (len(val), x_train.shape[1]))
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1e-6
    x_train = (x_train - mean) / std
    x_val = (x_val - mean) / std

    results: dict[str, float] = {}
    for target in TARGETS:
        y_train = np.asarray(train_labels[target])
        y_val = np.asarray(val_labels[target])
        classes, counts = np.unique(y_train, return_counts=True)
        results[f"chance_{target}"] = float(np.mean(y_val == classes[np.argmax(counts)]))
        if classes.size == 1:
            results[target] = results[f"chance_{target}"]
            continue
        model = LogisticRegression(C=l2_c, max_iter=2000)
        # One BLAS thread: these tiny solves are ~100x slower when OpenBLAS threads contend for cores.
        with threadpool_limits(limits=1, user_api="blas"):
            model.fit(x_train, y_train)
        results[target] = float(np.mean(model.predict(x_val) == y_val))
    results["mean"] = float(np.mean([results[t] for t in TARGETS]))
    results["chance_mean"] = float(np.mean([results[f"chance_{t}"] for t in TARGETS]))
    results["num_train"] = float(len(train))
    results["num_val"] = float(len(val))
    return results


def t5_features_fn(
    encoder: Any, params: Any, tokenizer, max_length: int = 32, batch_size: int = 512
) -> Callable[[list[str]], np.ndarray]:
    """features_fn of a ``T5Encoder`` (or any module ``apply(p, ids, mask) -> [B, L, D]``): the mean of
    its last hidden states over real tokens (EOS included), captions padded to ``max_length``."""

    @jax.jit
    def pooled(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = encoder.apply({"params": params}, ids, mask)
        chex.assert_rank(hidden, 3)
        m = mask[..., None].astype(hidden.dtype)
        return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)

    def features(captions: list[str]) -> np.ndarray:
        out = []
        for lo in range(0, len(captions), batch_size):
            enc = tokenizer(
                list(captions[lo : lo + batch_size]),
                max_length=max_length,
                padding="max_length",
                truncation=True,
                return_tensors="np",
            )
            out.append(np.asarray(pooled(params, enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32))))
        return np.concatenate(out)

    return features


def bag_of_words_features(captions: list[str]) -> np.ndarray:
    """Word counts over the caption grammar's vocabulary: the order-blind reference for the probe."""
    from ediff_jax.data.shapes import COLORS, REGIONS, RELATIONS, SHAPES

    vocab = sorted({w for phrase in (*COLORS, *SHAPES, *REGIONS, *RELATIONS, "a in the and") for w in phrase.split()})
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(captions), len(vocab)), np.float32)
    for row, caption in enumerate(captions):
        for word in caption.lower().split():
            if word in index:
                out[row, index[word]] += 1
    return out
