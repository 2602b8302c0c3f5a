"""Evaluation: Fréchet distance / KID against closed forms, the shipped feature network, the
ediff_shapes alignment scorer on ground-truth and corrupted images, and CLIP vision / CLIP score
parity with transformers' PyTorch CLIP.

Images come from ``ediff_jax.data.shapes`` directly (no TFDS): seeding examples with
``(0, crc32("validation"), i)`` reproduces the validation split of ``ediff_shapes`` byte for byte
(PNG is lossless), without the cost of preparing the dataset.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys
import zlib

import jax
import numpy as np
import pytest
from scipy import linalg, ndimage

from ediff_jax.data import shapes
from ediff_jax.eval import (
    DEFAULT_FEATURE_WEIGHTS,
    CLIPScorer,
    ExpectedObject,
    aggregate_alignment,
    clip_preprocess,
    clip_score,
    compute_features,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    kid,
    load_clip_preprocessing,
    load_clip_vision_encoder,
    load_feature_fn,
    load_feature_weights,
    parse_prompt,
    score_alignment,
    score_alignment_batch,
)
from ediff_jax.text import CheckpointError, resolve_text_path


def _validation_images(count: int, size: int, offset: int = 0) -> tuple[np.ndarray, list[str]]:
    split = zlib.crc32(b"validation")  # == shapes_tfds.split_seed("validation")
    examples = [shapes.generate_example((0, split, offset + i), size) for i in range(count)]
    return np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]


# ----------------------------------------------------------------------------------------------
# Fréchet distance and KID


def test_package_imports_without_tensorflow() -> None:
    """`ediff_jax.eval` must stay usable where TF is absent: only train_features reads TFDS."""
    import subprocess

    code = "import sys, ediff_jax.eval; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    """FD of diagonal Gaussians is ||mu1-mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_sqrtm_for_full_covariances() -> None:
    """Non-commuting covariances: the eigh formulation equals the textbook sqrtm formula."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 12)), rng.normal(size=(12, 12))
    s1, s2 = a @ a.T + 0.1 * np.eye(12), b @ b.T + 0.1 * np.eye(12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular() -> None:
    """30 samples in 64-D: the covariance is singular, where plain sqrtm needs an eps offset."""
    features = np.random.default_rng(2).normal(size=(30, 64))
    mu, sigma = gaussian_stats(features)
    assert np.linalg.matrix_rank(sigma) < 64
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    shifted = frechet_distance_from_features(features, features + 0.5)
    # Only the means differ. The ~34 null eigenvalues are round-off of size ~1e-16, and square
    # roots turn each into ~1e-8: a singular covariance limits FD to ~1e-6 absolute.
    assert shifted == pytest.approx(64 * 0.25, abs=1e-5)


def _kid_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with explicit loops over pairs (the definition, O(n^2) in Python)."""
    m, d = len(x), x.shape[1]
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_unbiased_estimator() -> None:
    """One subset of the whole set (MMD^2 ignores order) equals the definition."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(25, 6)), rng.normal(0.3, 1.2, size=(25, 6))
    result = kid(x, y, subset_size=25, num_subsets=1)
    assert result.mean == pytest.approx(_kid_direct(x, y), rel=1e-10)
    assert result.std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted() -> None:
    """Same distribution: |KID| within subset noise; shifted by 0.5: far above it."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same = kid(a, b, subset_size=200, num_subsets=20)
    shifted = kid(a, b + 0.5, subset_size=200, num_subsets=20)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 20 * max(abs(same.mean), same.std)


def test_compute_features_pads_to_one_batch_shape() -> None:
    """Batched features equal unbatched ones, and every call sees the same batch size."""
    seen = []

    def feature_fn(images):
        seen.append(images.shape)
        return images.reshape(len(images), -1)[:, :5].astype(np.float32) * 2

    images = np.random.default_rng(5).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    out = compute_features(feature_fn, images, batch_size=4)
    np.testing.assert_array_equal(out, images.reshape(10, -1)[:, :5] * 2.0)
    assert seen == [(4, 4, 4, 3)] * 3


def test_bad_inputs_name_the_problem() -> None:
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="subset_size=50 must be in"):
        kid(rng.normal(size=(20, 3)), rng.normal(size=(30, 3)), subset_size=50)
    with pytest.raises(ValueError, match=r"\[N, D\] feature matrix"):
        gaussian_stats(np.zeros(5))
    with pytest.raises(ValueError, match="to_uint8"):
        compute_features(lambda x: x, np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="feature widths differ"):
        kid(rng.normal(size=(20, 3)), rng.normal(size=(20, 4)), subset_size=10)


# ----------------------------------------------------------------------------------------------
# The shipped feature network


@pytest.fixture(scope="module")
def feature_fn():
    return load_feature_fn()


@pytest.fixture(scope="module")
def real_features(feature_fn) -> tuple[np.ndarray, np.ndarray]:
    images, _ = _validation_images(800, 32)
    return images, compute_features(feature_fn, images, batch_size=200)


def test_shipped_weights_are_small_and_report_their_accuracy() -> None:
    """The asset stays under 2 MiB and carries the held-out accuracy it was trained to."""
    assert DEFAULT_FEATURE_WEIGHTS.stat().st_size < 2 * 1024 * 1024
    _, params, metadata = load_feature_weights()
    assert metadata["dataset"] == "ediff_shapes/32"
    # Measured: shape 92.4% and region 91.9% per object, clean-vs-degraded 99.9%.
    assert metadata["validation_object_shape_accuracy"] >= 0.9
    assert metadata["validation_object_region_accuracy"] >= 0.9
    assert metadata["validation_clean_vs_degraded_accuracy"] >= 0.95


def test_features_are_deterministic_and_shaped(feature_fn, real_features) -> None:
    """Same images, same features; 128-D, finite; other image sizes are resized inside."""
    images, features = real_features
    assert features.shape == (800, 128) and np.all(np.isfinite(features))
    again = np.asarray(feature_fn(images[:200]))
    np.testing.assert_array_equal(again, features[:200].astype(np.float32))
    big, _ = _validation_images(4, 64)
    assert np.asarray(feature_fn(big)).shape == (4, 128)


def _as_uint8(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.round(images), 0, 255).astype(np.uint8))


def test_frechet_distance_separates_real_from_corrupted(feature_fn, real_features) -> None:
    """Two disjoint halves of real images are far closer than real vs blurred, noisy or
    colour-swapped copies of the second half (the blur and noise are milder than in training)."""
    images, features = real_features
    halves = frechet_distance_from_features(features[:400], features[400:])
    second = images[400:].astype(np.float32)
    corrupted = {
        "blurred": _as_uint8(ndimage.gaussian_filter(second, (0, 0.7, 0.7, 0))),
        "noisy": _as_uint8(second + np.random.default_rng(0).normal(0, 8, second.shape)),
        "swapped": _as_uint8(second[..., ::-1]),  # RGB -> BGR: off-palette colours, same geometry
    }
    for name, other in corrupted.items():
        distance = frechet_distance_from_features(features[:400], compute_features(feature_fn, other, 200))
        assert distance > 5 * halves, (name, distance, halves)


def test_gaussian_blur_matches_scipy() -> None:
    """The training-time blur is a true Gaussian (7 taps, edges replicated), per-image sigma."""
    from ediff_jax.eval.degradations import degrade_batch, gaussian_blur

    x = np.random.default_rng(8).uniform(0, 255, (2, 12, 12, 3)).astype(np.float32)
    sigma = np.array([0.6, 1.4], np.float32)
    ours = np.asarray(gaussian_blur(x, sigma))
    for i in range(2):
        ref = ndimage.gaussian_filter(x[i], (sigma[i], sigma[i], 0), mode="nearest", radius=(3, 3, 0))
        assert np.max(np.abs(ours[i] - ref)) < 1e-3
    clean = np.random.default_rng(9).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    degraded, is_clean = degrade_batch(jax.random.PRNGKey(0), clean)
    degraded, is_clean = np.asarray(degraded), np.asarray(is_clean)
    assert degraded.dtype == np.uint8 and degraded.shape == clean.shape and 16 < is_clean.sum() < 48
    changed = np.any(degraded != clean, axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, ~is_clean)


def test_training_step_learns_on_tiny_data() -> None:
    """The training loop reduces the loss (a tiny net on 64 scenes)."""
    from ediff_jax.eval.features import FeatureNetConfig
    from ediff_jax.eval.train_features import object_labels, train

    examples = [shapes.generate_example((7, i), 32) for i in range(64)]
    images = np.stack([e["image"] for e in examples])
    labels = np.stack(
        [
            object_labels(
                [shapes.COLORS.index(o["color"]) for o in e["objects"]],
                [shapes.SHAPES.index(o["shape"]) for o in e["objects"]],
                np.stack([o["bbox"] for o in e["objects"]]),
            )
            for e in examples
        ]
    )
    config = FeatureNetConfig(input_size=16, widths=(8,), feature_dim=16)
    _, losses = train(images, labels, config, steps=40, batch_size=16, learning_rate=1e-2, log_every=0)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])


# ----------------------------------------------------------------------------------------------
# Prompt parsing


def test_parse_prompt_covers_every_template() -> None:
    red_circle, blue_square = ExpectedObject("red", "circle"), ExpectedObject("blue", "square")
    assert parse_prompt("a red circle").objects == (red_circle,)
    parsed = parse_prompt("a red circle in the top left")
    assert parsed.objects == (red_circle,) and parsed.region == "top left" and parsed.relation is None
    assert parse_prompt("a red circle in the top").region == "top"
    parsed = parse_prompt("a red circle to the right of a blue square")
    assert parsed.objects == (red_circle, blue_square) and parsed.relation == "to the right of"
    parsed = parse_prompt("a red circle and a blue square")
    assert parsed.objects == (red_circle, blue_square) and parsed.relation is None and parsed.region is None
    assert parse_prompt("  A Red  Circle Below a blue square.").relation == "below"  # user typing


@pytest.mark.parametrize(
    "prompt", ["a red circle in the middle", "a pink circle", "two red circles", "a red circle above"]
)
def test_parse_prompt_rejects_other_text(prompt: str) -> None:
    with pytest.raises(ValueError, match="not an ediff_shapes caption.*a \\{color\\} \\{shape\\}"):
        parse_prompt(prompt)


# ----------------------------------------------------------------------------------------------
# Alignment scorer


def _scenes(count: int, seed: int) -> list[tuple[shapes.Scene, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = shapes.sample_scene(rng)
        out.append((scene, shapes.caption_scene(scene, rng)))
    return out


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_accepts_ground_truth(size: int) -> None:
    """Rendered scenes score as correct >= 98% of the time. Measured: 100% on these 300 scenes at
    each size; over other seeds 99.7% at 32 px (a centre within 0.05 px of a grid line can land
    in the neighbouring region) and 100% at 64 px."""
    scenes = _scenes(300, seed=size)
    images = np.stack([shapes.render_scene(s, size) for s, _ in scenes])
    metrics = aggregate_alignment(score_alignment_batch(images, [c for _, c in scenes]))
    assert metrics["all_ok_accuracy"] >= 0.98, metrics
    assert metrics["num_region"] > 30 and metrics["num_two_object_relation"] > 30  # every check ran


def test_scorer_tolerates_noise_and_mild_blur() -> None:
    """Generated images are soft and noisy: blur sigma 0.7 px plus noise sigma 8 at 64 px still
    scores >= 95% (measured 100%)."""
    rng = np.random.default_rng(11)
    results = []
    for scene, caption in _scenes(150, seed=11):
        image = ndimage.gaussian_filter(shapes.render_scene(scene, 64).astype(float), (0.7, 0.7, 0))
        image = np.clip(np.round(image + rng.normal(0, 8, image.shape)), 0, 255).astype(np.uint8)
        results.append(score_alignment(image, caption))
    assert aggregate_alignment(results)["all_ok_accuracy"] >= 0.95


def _one_object_scene(color: str, shape: str, cx: float, cy: float, size: float = 0.3) -> shapes.Scene:
    return shapes.Scene(objects=(shapes.ShapeObject(color, shape, cx, cy, size),))


def test_scorer_rejects_wrong_colour() -> None:
    image = shapes.render_scene(_one_object_scene("orange", "circle", 0.5, 0.5), 64)
    assert score_alignment(image, "a orange circle").all_ok
    result = score_alignment(image, "a red circle")  # the nearest palette colour to orange
    assert not result.color_ok and not result.all_ok


@pytest.mark.parametrize("asked,drawn", [("circle", "square"), ("square", "circle"), ("triangle", "circle")])
def test_scorer_rejects_wrong_shape(asked: str, drawn: str) -> None:
    for size in (32, 64):
        image = shapes.render_scene(_one_object_scene("blue", drawn, 0.4, 0.6, 0.25), size)
        result = score_alignment(image, f"a blue {asked}")
        assert result.color_ok and not result.shape_ok and not result.all_ok
        assert score_alignment(image, f"a blue {drawn}").all_ok


def test_scorer_rejects_mirrored_relation_and_region() -> None:
    """Mirroring left-right makes 'to the left of' and 'in the left' false."""
    checked = 0
    for scene, caption in _scenes(200, seed=5):
        parsed = parse_prompt(caption)
        horizontal = parsed.relation in ("to the left of", "to the right of")
        if not horizontal and parsed.region not in ("left", "top left", "bottom left"):
            continue
        image = shapes.render_scene(scene, 64)
        assert score_alignment(image, caption).all_ok, caption
        mirrored = score_alignment(image[:, ::-1], caption)
        assert mirrored.color_ok and mirrored.shape_ok and not mirrored.all_ok, caption
        assert mirrored.relation_ok is False or mirrored.region_ok is False
        checked += 1
    assert checked >= 20


def test_scorer_rejects_blank_image() -> None:
    blank = np.full((64, 64, 3), shapes.BACKGROUND, np.uint8)
    for caption in ("a red circle", "a red circle in the top", "a red circle above a blue square"):
        result = score_alignment(blank, caption)
        assert not result.color_ok and not result.all_ok and result.detected == ()
        assert result.relation_ok in (None, False) and result.region_ok in (None, False)


def test_strict_relations_follow_the_captioners_axis() -> None:
    """A is left of B by 0.3 and above it by 0.4: 'to the left of' is true, but the dataset would
    caption 'above', so only the strict mode rejects it."""
    a = shapes.ShapeObject("red", "square", 0.25, 0.25, 0.22)
    b = shapes.ShapeObject("blue", "circle", 0.55, 0.65, 0.22)
    image = shapes.render_scene(shapes.Scene(objects=(a, b)), 64)
    prompt = "a red square to the left of a blue circle"
    assert score_alignment(image, prompt).all_ok
    assert not score_alignment(image, prompt, strict_relations=True).all_ok
    assert score_alignment(image, "a red square above a blue circle", strict_relations=True).all_ok


def test_large_images_are_scored_like_small_ones() -> None:
    """A 256 px render is box-downsampled to 128 px for analysis and scores the same."""
    for scene, caption in _scenes(10, seed=9):
        assert score_alignment(shapes.render_scene(scene, 256), caption).all_ok, caption


def test_aggregate_alignment_counts_each_kind() -> None:
    """Accuracies are per prompt kind; a kind that is absent gives NaN, not 0."""
    scenes = [
        (_one_object_scene("red", "circle", 0.5, 0.5), "a red circle"),  # correct
        (_one_object_scene("red", "circle", 0.5, 0.5), "a red square"),  # wrong shape
        (_one_object_scene("red", "circle", 0.2, 0.2), "a red circle in the top left"),  # correct
    ]
    results = [score_alignment(shapes.render_scene(s, 32), c) for s, c in scenes]
    metrics = aggregate_alignment(results)
    assert metrics["one_object_color_shape_accuracy"] == pytest.approx(2 / 3)
    assert metrics["region_accuracy"] == 1.0 and metrics["num_region"] == 1
    assert metrics["num_two_object"] == 0 and math.isnan(metrics["two_object_relation_accuracy"])


def test_strict_accuracies_also_require_no_extra_object() -> None:
    """A requested object beside an unrequested one is right leniently and wrong strictly."""
    red, blue = shapes.ShapeObject("red", "circle", 0.25, 0.5, 0.3), shapes.ShapeObject("blue", "square", 0.75, 0.5, 0.3)
    green = shapes.ShapeObject("green", "triangle", 0.5, 0.15, 0.25)
    cases = [
        (shapes.Scene((red,)), "a red circle"),  # right both ways
        (shapes.Scene((red, blue)), "a red circle"),  # an extra blue square
        (shapes.Scene((red, blue)), "a red circle to the left of a blue square"),  # right both ways
        (shapes.Scene((red, blue, green)), "a red circle to the left of a blue square"),  # an extra triangle
    ]
    metrics = aggregate_alignment([score_alignment(shapes.render_scene(s, 64), c) for s, c in cases])
    assert metrics["one_object_color_shape_accuracy"] == 1.0
    assert metrics["one_object_color_shape_strict_accuracy"] == 0.5
    assert metrics["two_object_relation_accuracy"] == 1.0
    assert metrics["two_object_relation_strict_accuracy"] == 0.5


def test_scorer_rejects_unusable_images() -> None:
    with pytest.raises(ValueError, match="to_uint8"):
        score_alignment(np.zeros((32, 32, 3), np.float32), "a red circle")
    with pytest.raises(ValueError, match="square"):
        score_alignment(np.zeros((32, 48, 3), np.uint8), "a red circle")


# ----------------------------------------------------------------------------------------------
# CLIP vision tower and CLIP score

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CLIP_TOL = 1e-4
VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


def _tiny_clip_text_config(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Tiny random CLIP checkpoints (with the builtin shapes tokenizer and a 36->32 px image processor)."""
    from ediff_jax.text import load_tokenizer

    root = tmp_path_factory.mktemp("clip_eval")
    tokenizer_dir = resolve_text_path("builtin:clip_shapes")
    tokenizer = load_tokenizer(tokenizer_dir)
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
    )
    dirs = {}
    cases = {
        "clip_model": ("CLIPModel", "quick_gelu"),
        "vision_projection_gelu": ("CLIPVisionModelWithProjection", "gelu"),
        "vision_only": ("CLIPVisionModel", "quick_gelu"),
    }
    for name, (class_name, act) in cases.items():
        torch.manual_seed(0)
        if class_name == "CLIPModel":
            config = transformers.CLIPConfig(
                text_config=_tiny_clip_text_config(tokenizer), vision_config={**VISION, "hidden_act": act},
                projection_dim=24,
            )
            model = transformers.CLIPModel(config)
        else:
            model = getattr(transformers, class_name)(
                transformers.CLIPVisionConfig(**VISION, hidden_act=act, projection_dim=24)
            )
        model.eval().save_pretrained(root / name)
        processor.save_pretrained(root / name)
        for file in tokenizer_dir.iterdir():
            if file.name != "config.json" and file.name != "model.safetensors":
                shutil.copy(file, root / name)
        dirs[name] = root / name
    return dirs


def _torch_model(path: pathlib.Path):
    config = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    return cls.from_pretrained(path, local_files_only=True).eval()


def _reference_images(count: int = 3) -> np.ndarray:
    images, _ = _validation_images(count, 48)
    return images


def test_clip_preprocess_matches_transformers(clip_dirs) -> None:
    """Bicubic shortest-side resize, centre crop and normalisation equal CLIPImageProcessor's,
    for square and non-square inputs."""
    processor = transformers.CLIPImageProcessorPil.from_pretrained(clip_dirs["clip_model"])
    preprocessing = load_clip_preprocessing(clip_dirs["clip_model"], image_size=32)
    assert (preprocessing.shortest_edge, preprocessing.crop_size) == (36, 32)
    for images in (_reference_images(), _reference_images()[:, :, 5:]):
        ref = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = clip_preprocess(images, preprocessing)
        assert ours.shape == ref.shape == (3, 32, 32, 3)
        assert np.max(np.abs(ours - ref)) <= 1e-5


@pytest.mark.parametrize("name", ["clip_model", "vision_projection_gelu", "vision_only"])
def test_vision_tower_matches_torch(clip_dirs, name: str) -> None:
    """Pooled (projected when the checkpoint has visual_projection) and hidden states agree."""
    path = clip_dirs[name]
    model = _torch_model(path)
    pixels = clip_preprocess(_reference_images(), load_clip_preprocessing(path, 32))
    with torch.no_grad():
        inputs = torch.tensor(pixels.transpose(0, 3, 1, 2))
        if name == "clip_model":
            out = model.vision_model(pixel_values=inputs)
            ref_hidden, ref_pooled = out.last_hidden_state, model.visual_projection(out.pooler_output)
        elif name == "vision_projection_gelu":
            out = model(pixel_values=inputs)
            ref_hidden, ref_pooled = out.last_hidden_state, out.image_embeds
        else:
            out = model(pixel_values=inputs)
            ref_hidden, ref_pooled = out.last_hidden_state, out.pooler_output
    module, params = load_clip_vision_encoder(path)
    assert (module.config.projection_dim is None) == (name == "vision_only")
    hidden, pooled = jax.jit(module.apply)({"params": params}, pixels)
    assert hidden.shape == tuple(ref_hidden.shape) and pooled.shape == tuple(ref_pooled.shape)
    assert np.max(np.abs(np.asarray(hidden) - ref_hidden.numpy())) <= CLIP_TOL
    assert np.max(np.abs(np.asarray(pooled) - ref_pooled.numpy())) <= CLIP_TOL


def test_clip_score_matches_torch(clip_dirs) -> None:
    """100 * max(cos, 0) of our embeddings equals the score from transformers' CLIPModel
    features for the same processor output and tokens."""
    path = clip_dirs["clip_model"]
    images, prompts = _validation_images(5, 48)
    scorer = CLIPScorer.from_pretrained(path)
    ours = scorer.scores(images, prompts, batch_size=4)  # 4 + padded 1: the padding is dropped

    model = _torch_model(path)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(path)
    tokens = scorer.tokenizer(prompts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pixels = torch.tensor(processor(images=list(images), return_tensors="np")["pixel_values"])
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        text_emb = model.text_projection(text_out.pooler_output)
        cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb).double()
    reference = 100 * np.maximum(cosine.numpy(), 0)
    assert np.max(np.abs(scorer.image_embeddings(images) - image_emb.numpy())) <= CLIP_TOL
    assert np.max(np.abs(ours - reference)) <= 100 * CLIP_TOL  # score units: 100 x cosine
    assert clip_score(scorer, images, prompts) == pytest.approx(float(reference.mean()), abs=100 * CLIP_TOL)


def test_clip_loading_errors_say_what_to_load(clip_dirs, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="model_type='clip_text_model'.*CLIPModel"):
        load_clip_vision_encoder(resolve_text_path("builtin:clip_shapes"))
    with pytest.raises(CheckpointError, match="projected embeddings"):
        CLIPScorer.from_pretrained(clip_dirs["vision_only"], text_path="builtin:clip_shapes")
    broken = tmp_path / "broken"
    shutil.copytree(clip_dirs["clip_model"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['vision_model.encoder.layers.1"):
        load_clip_vision_encoder(broken)


def test_scorer_with_separate_text_directory(clip_dirs) -> None:
    """A vision-with-projection directory plus a text directory of the same width also scores."""
    scorer = CLIPScorer.from_pretrained(clip_dirs["vision_projection_gelu"], text_path=clip_dirs["clip_model"])
    images, prompts = _validation_images(2, 32)
    scores = scorer.scores(images, prompts)
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 100))
