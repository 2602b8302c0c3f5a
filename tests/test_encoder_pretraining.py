"""The in-house text encoders (issue #15 part 1): captions and hard negatives, the contrastive
loss, Hugging Face export, the shipped builtins, and what a damaged or mismatched asset does."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax.data.shapes import RELATION_THRESHOLD, caption_scene, sample_scene
from ediff_jax.eval.prompts import parse_prompt
from ediff_jax import hf_checkpoint
from ediff_jax.text import loading
from ediff_jax.text.build_default_assets import CLIP_NAME, T5_NAME, clip_text_config, t5_encoder_config
from ediff_jax.text.clip import CLIPTextEncoder
from ediff_jax.text.conditioning import load_text_encoders
from ediff_jax.text.pretrain import captions as caps
from ediff_jax.text.pretrain.clip_contrastive import contrastive_loss
from ediff_jax.text.pretrain.export import export_clip_text_encoder, export_t5_encoder
from ediff_jax.text.t5 import T5Encoder

PROMPTS = ["a red circle to the left of a blue square", "a purple triangle in the bottom right", "a green square"]


# --- captions, truth and hard negatives --------------------------------------------------


def reference_truth(scene, caption: str) -> bool:
    """The spec read literally, one pair at a time: the caption's objects are exactly the
    scene's, the region is the object's, and the relation holds by at least 15% of the side."""
    parsed = parse_prompt(caption)
    asked = sorted((o.color, o.shape) for o in parsed.objects)
    if asked != sorted((o.color, o.shape) for o in scene.objects):
        return False
    by_color = {o.color: o for o in scene.objects}
    if parsed.region is not None and by_color[parsed.objects[0].color].region != parsed.region:
        return False
    if parsed.relation is not None:
        a, b = (by_color[o.color] for o in parsed.objects)
        offset = {"to the left of": b.cx - a.cx, "to the right of": a.cx - b.cx,
                  "above": b.cy - a.cy, "below": a.cy - b.cy}[parsed.relation]
        return offset >= RELATION_THRESHOLD
    return True


@pytest.fixture(scope="module")
def scenes_and_captions():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(150)]
    captions = [caption_scene(s, rng) for s in scenes]
    pool = captions + [n for s, c in zip(scenes, captions) for n in caps.negative_candidates(c, rng).values()]
    return scenes, captions, pool


def test_truth_matrix_matches_the_spec_read_pair_by_pair(scenes_and_captions):
    scenes, _, pool = scenes_and_captions
    fast = caps.truth_matrix(caps.caption_codes(pool), caps.scene_codes(scenes))
    slow = np.array([[reference_truth(s, c) for c in pool] for s in scenes])
    assert fast.shape == slow.shape and fast.sum() > len(scenes)  # more than the diagonal is true
    np.testing.assert_array_equal(fast, slow)


def test_true_captions_hold_and_hard_negatives_do_not(scenes_and_captions):
    scenes, captions, _ = scenes_and_captions
    rng = np.random.default_rng(1)
    kinds_seen = set()
    for scene, caption in zip(scenes, captions):
        assert all(reference_truth(scene, c) for c in caps.true_captions(scene))
        for kind, negative in caps.hard_negatives(scene, caption, rng).items():
            kinds_seen.add(kind)
            assert not reference_truth(scene, negative), (kind, caption, negative)
            assert sorted(negative.split()) == sorted(caption.split()) or kind in (
                "region_changed", "attribute_changed", "relation_reversed")  # swaps only reorder words
    assert kinds_seen == set(caps.NEGATIVE_KINDS)
    # "A and B" with A and B exchanged says the same thing: it must never be used as a negative.
    two = next(s for s in scenes if len(s.objects) == 2)
    a, b = two.objects
    swapped = f"a {b.color} {b.shape} and a {a.color} {a.shape}"
    assert "objects_exchanged" not in caps.hard_negatives(two, f"a {a.color} {a.shape} and a {b.color} {b.shape}", rng)
    assert reference_truth(two, swapped)


def test_negatives_for_batch_gives_k_false_captions_each(scenes_and_captions):
    scenes, captions, _ = scenes_and_captions
    negatives = caps.negatives_for_batch(scenes[:40], captions[:40], 4, np.random.default_rng(2))
    assert len(negatives) == 160
    for i, scene in enumerate(scenes[:40]):
        assert not any(reference_truth(scene, n) for n in negatives[4 * i : 4 * i + 4])


# --- contrastive loss ----------------------------------------------------------------------


def test_contrastive_loss_matches_a_numpy_reference_and_masks_true_captions():
    rng = np.random.default_rng(0)
    b, t, d = 4, 10, 8
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    img, txt = unit(rng.normal(size=(b, d))), unit(rng.normal(size=(t, d)))
    also_true = np.zeros((b, t), bool)
    also_true[0, 5] = also_true[2, 1] = True
    scale = np.log(10.0)

    def xent(logits, target):
        logits = logits - logits.max()
        return np.log(np.exp(logits).sum()) - logits[target]

    logits = 10.0 * img @ txt.T
    i2t = [xent(np.where(also_true[i], -np.inf, logits[i]), i) for i in range(b)]
    t2i = [xent(np.where(also_true[:, i], -np.inf, logits[:, i]), i) for i in range(b)]
    expected = 0.5 * (np.mean(i2t) + np.mean(t2i))
    loss, metrics = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale), jnp.asarray(also_true))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    unmasked, _ = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale), jnp.zeros((b, t), bool))
    assert abs(float(unmasked) - expected) > 1e-3  # the mask matters
    np.testing.assert_allclose(float(metrics["temperature"]), 0.1, rtol=1e-6)


# --- Hugging Face export -------------------------------------------------------------------


def _flax_t5(vocab: int):
    config = t5_encoder_config(vocab)
    module = T5Encoder(config)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = module.init(jax.random.PRNGKey(3), ids, ids + 1)["params"]
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(4), p.shape), params)
    return config, module, params


def test_export_writes_what_transformers_and_our_loader_read(tmp_path):
    """Random Flax params -> HF directory -> torch T5EncoderModel / CLIPTextModelWithProjection and our
    loader: the same outputs, and our loader gets the very arrays back."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    config, module, params = _flax_t5(40)
    export_t5_encoder(tmp_path / "t5", config, params, pad_token_id=0, eos_token_id=1)
    ids = np.array([[5, 9, 12, 1, 0, 0], [7, 1, 0, 0, 0, 0]])
    mask = (np.arange(6)[None] < np.array([[4], [2]])).astype(np.int64)
    ours = np.asarray(module.apply({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = T5EncoderModel.from_pretrained(tmp_path / "t5").eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours * mask[..., None], theirs * mask[..., None], atol=1e-4)
    _, loaded = loading.load_t5_encoder(tmp_path / "t5")
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))

    clip_config = clip_text_config(40, eos_token_id=39)
    clip = CLIPTextEncoder(clip_config)
    clip_params = clip.init(jax.random.PRNGKey(5), jnp.asarray(ids), jnp.asarray(mask))["params"]
    export_clip_text_encoder(tmp_path / "clip", clip_config, clip_params, bos_token_id=38, pad_token_id=39)
    clip_ids = np.array([[38, 5, 9, 39, 39, 39], [38, 7, 39, 39, 39, 39]])
    hidden, pooled = clip.apply({"params": clip_params}, clip_ids, mask)
    with torch.no_grad():
        out = CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip").eval()(
            input_ids=torch.tensor(clip_ids), attention_mask=torch.tensor(mask))
    np.testing.assert_allclose(np.asarray(pooled), out.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(hidden) * mask[..., None], out.last_hidden_state.numpy() * mask[..., None],
                               atol=1e-4)


@pytest.mark.parametrize("name", [T5_NAME, CLIP_NAME])
def test_shipped_encoders_load_in_transformers_and_agree(name):
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    path = loading.resolve_text_path(f"builtin:{name}")
    tokenizer = loading.load_tokenizer(path)
    batch = tokenizer(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids < len(tokenizer)).all()  # the words themselves: test_text_encoders' round trip
    with torch.no_grad():
        if name == T5_NAME:
            module, params = loading.load_t5_encoder(path)
            ours = np.asarray(module.apply({"params": params}, ids, mask))
            theirs = T5EncoderModel.from_pretrained(path).eval()(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        else:
            module, params = loading.load_clip_text_encoder(path)
            ours = np.asarray(module.apply({"params": params}, ids, mask)[1])
            theirs = CLIPTextModelWithProjection.from_pretrained(path).eval()(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).text_embeds.numpy()
            mask = np.ones(ours.shape[:1], np.int64)  # pooled: one vector per prompt
    m = mask[..., None] if ours.ndim == 3 else 1
    np.testing.assert_allclose(ours * m, theirs * m, atol=1e-4)
    report = json.loads((path / loading.PRETRAINING_REPORT).read_text())
    assert report["weights_sha256"] == loading.weights_fingerprint(path)


def test_shipped_t5_binds_words_better_than_its_initialisation():
    """Re-measures the shipped T5's linear binding probe (which object has which colour and shape,
    and the relation) on fresh captions: it must beat the same encoder at the initialisation its
    pretraining started from, and a bag of words."""
    from ediff_jax.text.build_default_assets import SEED, scene_captions, t5_encoder_config
    from ediff_jax.text.pretrain.probe import bag_of_words_features, probe_binding, split_by_caption, t5_features_fn
    from ediff_jax.text.pretrain.t5_pretrain import initial_encoder_params

    path = loading.resolve_text_path(f"builtin:{T5_NAME}")
    module, params = loading.load_t5_encoder(path)
    tokenizer = loading.load_tokenizer(path)
    initial = initial_encoder_params(t5_encoder_config(len(tokenizer)), SEED)
    train, val = split_by_caption(scene_captions(4000, seed=11), val_fraction=0.25, seed=0)
    trained = probe_binding(t5_features_fn(module, params, tokenizer), train, val)
    at_init = probe_binding(t5_features_fn(module, initial, tokenizer), train, val)
    words = probe_binding(bag_of_words_features, train, val)
    assert trained["mean"] > at_init["mean"] + 0.05 and trained["mean"] > words["mean"] + 0.2, (trained, at_init)


# --- damaged and mismatched assets ---------------------------------------------------------


@pytest.fixture()
def builtin_copy(tmp_path, monkeypatch):
    """The shipped v2 encoders copied to a fake builtin root, so they can be damaged safely."""
    root = tmp_path / "assets"
    for name in (T5_NAME, CLIP_NAME):
        shutil.copytree(loading.resolve_text_path(f"builtin:{name}"), root / name)
    monkeypatch.setattr(hf_checkpoint, "_BUILTIN_ROOT", root)
    return root


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "not a readable safetensors|sha256"),
    (lambda f: f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0"), "does not match the sha256"),
    (lambda f: f.unlink(), "is missing"),
])
def test_a_damaged_builtin_names_the_file_and_the_rebuild_command(builtin_copy, damage, message):
    weights = builtin_copy / T5_NAME / "model.safetensors"
    damage(weights)
    with pytest.raises(loading.CheckpointError, match=message) as raised:
        loading.load_t5_encoder(f"builtin:{T5_NAME}")
    text = str(raised.value)
    assert "model.safetensors" in text and loading.REBUILD_COMMAND in text and "\n" not in text


def test_a_damaged_builtin_tokenizer_names_the_rebuild_command(builtin_copy):
    (builtin_copy / CLIP_NAME / "tokenizer.json").write_text("{ not json")
    with pytest.raises(loading.CheckpointError, match="tokenizer.json.*" + loading.REBUILD_COMMAND.replace(".", r"\.")):
        loading.load_tokenizer(f"builtin:{CLIP_NAME}")


def test_a_tokenizer_that_does_not_fit_its_model_is_refused_at_load(tmp_path):
    """CLIP's tokenizer (hundreds of tokens) beside the T5 weights (tens): ids past the embedding
    table would be clamped silently by XLA, so loading refuses, naming both sizes."""
    t5 = tmp_path / "t5"
    shutil.copytree(loading.resolve_text_path(f"builtin:{T5_NAME}"), t5)
    for f in t5.glob("tokenizer*"):
        f.unlink()
    clip = loading.resolve_text_path(f"builtin:{CLIP_NAME}")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(clip / name, t5 / name)
    text = {"t5_path": str(t5), "clip_path": f"builtin:{CLIP_NAME}", "t5_max_length": 32, "clip_max_length": 32}
    with pytest.raises(loading.CheckpointError, match=r"tokenizer of \d+ tokens but an embedding table of vocab_size=\d+"):
        load_text_encoders(text)


# --- the rebuild command -------------------------------------------------------------------


@pytest.mark.slow
def test_rebuild_command_writes_loadable_encoders_with_reports(tmp_path):
    """A shortened rebuild: both directories, their reports (metrics, CPU time, sha256), and the
    conditioning loader reading them with matching fingerprints."""
    from ediff_jax.text import build_default_assets

    build_default_assets.main([
        "--out", str(tmp_path), "--t5_steps", "20", "--clip_steps", "20", "--clip_batch", "16",
        "--train_captions", "600", "--held_out_captions", "300", "--retrieval_scenes", "48",
    ])
    reports = {name: json.loads((tmp_path / name / loading.PRETRAINING_REPORT).read_text())
               for name in (T5_NAME, CLIP_NAME)}
    t5, clip = reports[T5_NAME], reports[CLIP_NAME]
    assert 0 <= t5["held_out_span_reconstruction"]["content_accuracy"] <= 1
    assert 0 <= clip["held_out_retrieval"]["accuracy"] <= 1 and clip["held_out_retrieval"]["num_scenes"] == 48
    for report in reports.values():
        assert report["cpu_seconds"] > 0 and set(report["binding_probe"]) == {"trained", "random_init", "bag_of_words"}
    encoders = load_text_encoders({"t5_path": str(tmp_path / T5_NAME), "clip_path": str(tmp_path / CLIP_NAME),
                                   "t5_max_length": 32, "clip_max_length": 32})
    assert encoders.fingerprints == {"t5": t5["weights_sha256"], "clip": clip["weights_sha256"]}
    assert sorted(p.name for p in (tmp_path / T5_NAME).iterdir()) == sorted(
        ["config.json", "model.safetensors", "pretraining.json", "tokenizer.json", "tokenizer_config.json"])


def test_the_older_random_encoders_are_kept_byte_for_byte():
    """Workdirs trained before the pretrained defaults name builtin:t5_shapes / clip_shapes in their
    config; they keep sampling only if those weights never change (the rebuild writes *_v2 only)."""
    from ediff_jax.text.build_default_assets import CLIP_NAME, T5_NAME

    assert {T5_NAME, CLIP_NAME}.isdisjoint({"t5_shapes", "clip_shapes"})
    assert loading.weights_fingerprint(loading.resolve_text_path("builtin:t5_shapes")) == (
        "695caa4eecc35c1f12aa9c172920ca8dd3e4b6097e0fbf6877870a978ade686f")
    assert loading.weights_fingerprint(loading.resolve_text_path("builtin:clip_shapes")) == (
        "abbb606bd4bb8ff653880696d6a4cb628e1618e39835d5ceb2676cb4e4cff815")


def test_weights_fingerprint_is_exact_for_small_files_and_sampled_for_large_ones(tmp_path, monkeypatch):
    """Small weights: the plain sha256 of the bytes. Large ones (a monkeypatched threshold stands in
    for T5-XXL's shards): a change in the sampled data or the header changes the fingerprint."""
    import hashlib

    from safetensors.numpy import save_file

    save_file({"w": np.arange(4096, dtype=np.float32)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    assert loading.weights_fingerprint(tmp_path) == hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(hf_checkpoint, "FULL_HASH_MAX_BYTES", 1024)
    monkeypatch.setattr(hf_checkpoint, "_SAMPLE_BYTES", 64)
    sampled = loading.weights_fingerprint(tmp_path)
    assert sampled != hashlib.sha256(data).hexdigest()
    changed = bytearray(data)
    changed[-10] ^= 0xFF  # inside the last sample
    (tmp_path / "model.safetensors").write_bytes(bytes(changed))
    assert loading.weights_fingerprint(tmp_path) != sampled
