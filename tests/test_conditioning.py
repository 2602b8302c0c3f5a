"""Conditioning assembly and the text-embedding cache."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax.config_utils import base_config
from ediff_jax.data import pipeline
from ediff_jax.text import cache as text_cache
from ediff_jax.text.conditioning import dropout_conditioning, load_text_encoders, select_encoders, unconditional

REPO = Path(__file__).resolve().parents[1]

PROMPTS = ["a red circle", "a blue square to the left of a green triangle", "a yellow circle in the top left"]


@pytest.fixture(scope="module")
def encoders():
    return load_text_encoders(base_config().text)


@pytest.fixture(scope="module")
def cond(encoders):
    return jax.device_get(encoders.encode(encoders.params, encoders.tokenize(PROMPTS)))


def test_shapes_and_masks(encoders, cond):
    """Both encoders' tokens, masks matching the tokenizers, pooled CLIP at [B, D']."""
    tokens = encoders.tokenize(PROMPTS)
    assert cond["t5"].shape[:2] == (3, encoders.t5_max_length)
    assert cond["clip"].shape[:2] == (3, encoders.clip_max_length)
    assert cond["clip_pooled"].shape[0] == 3 and cond["clip_pooled"].ndim == 2
    np.testing.assert_array_equal(cond["t5_mask"], tokens["t5_mask"])
    # Longer prompts have more valid tokens.
    assert cond["t5_mask"][1].sum() > cond["t5_mask"][0].sum()


def test_select_encoders_drops_exactly_one(cond):
    t5_only = select_encoders(cond, use_t5=True, use_clip=False)
    np.testing.assert_array_equal(t5_only["t5"], cond["t5"])
    np.testing.assert_array_equal(t5_only["t5_mask"], cond["t5_mask"])
    assert not np.any(t5_only["clip"]) and not np.any(t5_only["clip_mask"]) and not np.any(t5_only["clip_pooled"])
    both_dropped = unconditional(cond)
    assert all(not np.any(both_dropped[k]) for k in ("t5", "t5_mask", "clip", "clip_mask", "clip_pooled"))


def test_dropout_rates_are_per_encoder_and_independent(cond):
    """Over many examples each encoder is dropped at its own rate, independently."""
    big = jax.tree.map(lambda x: jnp.repeat(x[:1], 4000, axis=0), cond)
    out = dropout_conditioning(jax.random.key(0), big, {"t5": 0.25, "clip": 0.2})
    t5_kept = np.asarray(out["t5_mask"].sum(1) > 0)
    clip_kept = np.asarray(out["clip_mask"].sum(1) > 0)
    assert abs(1 - t5_kept.mean() - 0.25) < 0.03 and abs(1 - clip_kept.mean() - 0.2) < 0.03
    assert abs((~t5_kept & ~clip_kept).mean() - 0.05) < 0.015  # both dropped: 0.25 * 0.2
    # Kept rows are untouched; dropped rows are all zero.
    np.testing.assert_array_equal(np.asarray(out["t5"])[t5_kept], np.asarray(big["t5"])[t5_kept])
    assert not np.any(np.asarray(out["clip_pooled"])[~clip_kept])


def test_cache_round_trips(encoders, shapes_data_dir, tmp_path):
    """Cached embeddings equal fresh ones, for every caption looked up."""
    from ediff_jax.data.shapes_tfds import make_builder

    builder = pipeline.prepare(make_builder(32, num_train=40, num_validation=8, data_dir=str(tmp_path)))
    text_config = base_config().text
    path = text_cache.build_cache(builder, encoders, text_config)
    assert path.parent.parent == __import__("pathlib").Path(builder.data_dir)
    loaded = text_cache.TextEmbeddingCache.load(path)
    captions = pipeline.read_captions(builder, "train")[:8]
    assert len(loaded) == len(set(pipeline.read_captions(builder, "train") + pipeline.read_captions(builder, "validation")))
    got = loaded.lookup(captions)
    fresh = jax.device_get(encoders.encode(encoders.params, encoders.tokenize(captions)))
    for k in text_cache.COND_KEYS:
        np.testing.assert_allclose(got[k], fresh[k], atol=1e-5, err_msg=k)
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        loaded.lookup(["a mauve hexagon"])


def test_cache_command_builds_what_training_reads(shapes_data_dir, tmp_path, monkeypatch):
    """`python -m ediff_jax.text.cache --config C` (in process) loads the encoders onto the config's mesh (all 8
    devices), as training does, and writes the file training would look up: same path (settings and weights),
    and its rows equal a fresh encoding on one device."""
    import shutil

    from ediff_jax.config_utils import load_config
    from ediff_jax.text import conditioning

    data_dir = tmp_path / "tfds"
    shutil.copytree(shapes_data_dir, data_dir)
    config_arg = "configs/base64.py:size=tiny"
    loaded, original = [], conditioning.load_text_encoders

    def recording(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(conditioning, "load_text_encoders", recording)
    text_cache.main(["--config", str(REPO / config_arg), "--data_dir", str(data_dir)])
    assert all(x.sharding.mesh.size == len(jax.devices()) for x in jax.tree.leaves(loaded[0].params))
    config = load_config(str(REPO / config_arg))
    builder = pipeline.builder_from_config(config.data, data_dir=str(data_dir))
    one_device = load_text_encoders(config.text)
    path = text_cache.cache_path(builder, config.text, one_device.fingerprints)
    assert path.exists()
    captions = pipeline.read_captions(builder, "validation")[:6]
    got = text_cache.TextEmbeddingCache.load(path).lookup(captions)
    fresh = jax.device_get(one_device.encode(one_device.params, one_device.tokenize(captions)))
    for k in text_cache.COND_KEYS:
        np.testing.assert_allclose(got[k], fresh[k], atol=1e-5, err_msg=k)


def test_cache_key_depends_on_encoders():
    """Settings and weights both key the cache: rebuilt encoders under one path get a new file."""
    a = base_config().text
    b = base_config().text
    b.t5_max_length = 64
    weights = {"t5": "0" * 64, "clip": "1" * 64}
    assert text_cache.cache_key(a, weights) != text_cache.cache_key(b, weights)
    assert text_cache.cache_key(a, weights) != text_cache.cache_key(a, {**weights, "t5": "2" * 64})
