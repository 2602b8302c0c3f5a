"""Tests for the super-resolution data side: degradations, random crops and low-res inputs
in the tf.data pipeline, the wheel-shipped photos and captioned image folders.

Expected values come from independent numpy re-statements (block means, exact window
search in the stored pixels), never from the code under test, so a shifted crop, a
wrong downsample, a seed that depends on where a run started, or a lossy round trip
all fail.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

from ediff_jax.data import degradations, image_folder, photos, pipeline  # noqa: E402

# --------------------------------------------------------------------------- helpers


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Inverse of the pipeline's ``v / 127.5 - 1`` (exact for unresized pixels)."""
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Area downsample by an integer factor, written independently of TF."""
    h, w, c = image.shape
    return image.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def _window_offsets(image: np.ndarray, window: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``window`` occurs exactly inside ``image`` (uint8 arrays)."""
    h, w = window.shape[:2]
    big_h, big_w = image.shape[:2]
    if h > big_h or w > big_w:
        return []
    ys, xs = np.nonzero(np.all(image[: big_h - h + 1, : big_w - w + 1] == window[0, 0], axis=-1))
    for dy, dx in ((h - 1, w - 1), (h // 2, w // 2), (0, w - 1), (h - 1, 0)):  # cheap filters first
        keep = np.all(image[ys + dy, xs + dx] == window[dy, dx], axis=-1)
        ys, xs = ys[keep], xs[keep]
    return [(int(y), int(x)) for y, x in zip(ys, xs) if np.array_equal(image[y : y + h, x : x + w], window)]


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _write_folder(root: Path, sizes: list[tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
    """Random-noise PNGs (every window unique) named im<i>.png; returns name -> pixels."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for i, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"im{i}.png")
        written[f"im{i}.png"] = pixels
    return written


def _tsv(captions: dict[str, str]) -> str:
    return "".join(f"{name}\t{text}\n" for name, text in captions.items())


def _folder_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- fixtures

FOLDER_SIZES = [(40, 48), (44, 36), (52, 60), (36, 36), (48, 40), (56, 44)]  # H, W


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sr_data")


@pytest.fixture(scope="module")
def folder_pixels(tmp_root) -> dict[str, np.ndarray]:
    written = _write_folder(tmp_root / "noise", FOLDER_SIZES, seed=0)
    captions = {name: f"noise picture {name}" for name in written}
    (tmp_root / "noise" / "captions.tsv").write_text(_tsv(captions))
    return written


@pytest.fixture(scope="module")
def folder_builder(tmp_root, folder_pixels):
    """Six variable-size noise images, all in train (validation_fraction=0)."""
    builder = pipeline.get_dataset_builder(
        "image_folder", str(tmp_root / "tfds"), folder=str(tmp_root / "noise"), validation_fraction=0.0
    )
    return pipeline.prepare(builder)


@pytest.fixture(scope="module")
def shapes_builder(tmp_root):
    """A tiny fixed-size (32px) ediff_shapes config: the fixed-shape code path."""
    from ediff_jax.data import make_builder

    return pipeline.prepare(make_builder(32, 12, 4, str(tmp_root / "tfds"), seed=0))


# --------------------------------------------------------------------------- degradations


def _test_image() -> tf.Tensor:
    """Smooth gradient plus a sharp checkerboard: blur, noise and JPEG all show on it."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    checker = ((np.arange(64)[:, None] // 4 + np.arange(64)[None] // 4) % 2) * 0.6 - 0.3
    image = np.stack([x - 0.5 + checker, y - 0.5, 0.3 * checker], axis=-1)
    return tf.constant(np.clip(image, -1, 1), tf.float32)


ALWAYS = dict(blur_prob=1.0, noise_prob=1.0, jpeg_prob=1.0)


def test_clean_degradation_is_block_mean() -> None:
    """degradation=None is a plain area downsample (what sampling-time inputs look like)."""
    image = _test_image()
    low = degradations.degrade(image, 16, None, tf.constant([0, 0]))
    assert low.shape == (16, 16, 3) and low.dtype == tf.float32
    np.testing.assert_allclose(low.numpy(), _block_mean(image.numpy(), 4), atol=1e-5)


def test_degradation_changes_image_within_range() -> None:
    """Full degradation gives [16,16,3] in [-1,1] that differs from the clean downsample."""
    image = _test_image()
    clean = _block_mean(image.numpy(), 4)
    for seed in range(4):
        low = degradations.degrade(image, 16, ALWAYS, tf.constant([seed, 1])).numpy()
        assert low.shape == (16, 16, 3)
        assert -1.0 <= low.min() and low.max() <= 1.0
        assert np.abs(low - clean).mean() > 0.01, seed


def test_degradation_steps_have_their_effect() -> None:
    """Blur removes detail, noise has the requested std, JPEG lands on the uint8 grid."""
    image = _test_image()
    seed = tf.constant([5, 6])
    none = dict(blur_prob=0.0, noise_prob=0.0, jpeg_prob=0.0, resize_methods=("area",))
    plain = degradations.degrade(image, 32, none, seed).numpy()
    np.testing.assert_allclose(plain, _block_mean(image.numpy(), 2), atol=1e-5)

    blurred = degradations.degrade(image, 32, {**none, "blur_prob": 1.0, "blur_sigma": (1.5, 1.5)}, seed)
    detail = lambda a: np.abs(np.diff(np.asarray(a), axis=1)).mean()  # noqa: E731
    assert detail(blurred) < 0.7 * detail(plain)

    noisy = degradations.degrade(image, 32, {**none, "noise_prob": 1.0, "noise_sigma": (0.05, 0.05)}, seed)
    residual = noisy.numpy() - plain
    assert abs(residual.std() - 2 * 0.05) < 0.01  # 0.05 of the [0,1] range = 0.1 in [-1,1]

    jpeg = degradations.degrade(image, 32, {**none, "jpeg_prob": 1.0, "jpeg_quality": (30, 30)}, seed)
    levels = (jpeg.numpy() + 1.0) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(jpeg.numpy() - plain).mean() > 0.005


def test_degradation_deterministic_per_seed() -> None:
    """Equal seeds (int32 or int64) give bitwise-equal outputs; different seeds differ."""
    image = _test_image()
    config = degradations.DEFAULT_DEGRADATION
    a = degradations.degrade(image, 16, config, tf.constant([7, 8], tf.int32)).numpy()
    b = degradations.degrade(image, 16, config, tf.constant([7, 8], tf.int64)).numpy()
    assert np.array_equal(a, b)
    others = [degradations.degrade(image, 16, config, tf.constant([7, s])).numpy() for s in range(9, 13)]
    assert all(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (dict(blur_probability=0.5), "valid keys"),
        (dict(noise_prob=1.5), "noise_prob"),
        (dict(blur_sigma=(1.0, 0.5)), "blur_sigma"),
        (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (dict(noise_sigma=0.1), "(low, high)"),
        (dict(jpeg_quality=(50, 101)), "jpeg_quality"),
        (dict(jpeg_quality=(50.5, 90)), "integers"),
        (dict(resize_methods=("nearest",)), "resize_methods"),
        (dict(resize_methods=()), "resize_methods"),
        ("strong", "mapping"),
    ],
)
def test_validate_degradation_rejects(config, fragment: str) -> None:
    """Bad configs fail at the boundary with a message naming the problem."""
    with pytest.raises(ValueError) as err:
        degradations.validate_degradation(config)
    assert fragment in str(err.value)


def test_validate_degradation_fills_defaults() -> None:
    """Missing keys take DEFAULT_DEGRADATION's values; None passes through (clean path)."""
    filled = degradations.validate_degradation({"jpeg_prob": 0.0, "resize_methods": ["area"]})
    assert filled["jpeg_prob"] == 0.0 and filled["resize_methods"] == ("area",)
    assert filled["blur_sigma"] == tuple(degradations.DEFAULT_DEGRADATION["blur_sigma"])
    assert set(filled) == set(degradations.DEFAULT_DEGRADATION)
    assert degradations.validate_degradation(None) is None


# --------------------------------------------------------------------------- pipeline


def test_train_crops_are_windows_of_stored_images(folder_builder, folder_pixels) -> None:
    """Variable-size images: each crop is an exact sub-window of its own source image,
    at offsets that vary, and the caption travels with it."""
    batches = _take(pipeline.make_train_iterator(folder_builder, batch_size=6, seed=0, crop_size=16), 2)
    offsets = set()
    for batch in batches:
        assert batch["image"].shape == (6, 16, 16, 3) and "lowres" not in batch
        for crop, caption in zip(_to_uint8(batch["image"]), batch["caption"]):
            source = caption.removeprefix("noise picture ")
            found = _window_offsets(folder_pixels[source], crop)
            assert len(found) == 1, (caption, found)
            offsets.add(found[0])
    # Random offsets along both axes, not a fixed corner, centre or row.
    assert len({y for y, _ in offsets}) > 3 and len({x for _, x in offsets}) > 3


def test_lowres_clean_is_area_downsample_of_crop(folder_builder) -> None:
    """lowres with degradation=None equals the block mean of the high-res crop."""
    batch = next(pipeline.make_train_iterator(folder_builder, batch_size=4, seed=1, crop_size=16, lowres_size=4))
    assert batch["lowres"].shape == (4, 4, 4, 3) and batch["lowres"].dtype == np.float32
    for high, low in zip(batch["image"], batch["lowres"]):
        np.testing.assert_allclose(low, _block_mean(high, 4), atol=1e-5)


def test_resume_with_crops_and_degradations(folder_builder) -> None:
    """start_step=k equals skipping k batches from step 0, bitwise, with random crops and
    degradations on; other seeds differ. Batches of 4 over 6 examples: step 2 resumes two
    examples into the second epoch, and step 3 straddles the next epoch boundary."""
    kwargs = dict(batch_size=4, crop_size=24, lowres_size=8, degradation=degradations.DEFAULT_DEGRADATION)
    ref = _take(pipeline.make_train_iterator(folder_builder, seed=3, **kwargs), 4)
    resumed = _take(pipeline.make_train_iterator(folder_builder, seed=3, start_step=2, **kwargs), 2)
    for a, b in zip(resumed, ref[2:]):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["lowres"], b["lowres"])
        assert list(a["caption"]) == list(b["caption"])
    other = next(pipeline.make_train_iterator(folder_builder, seed=4, **kwargs))
    assert not np.array_equal(other["image"], ref[0]["image"])
    lowres = np.concatenate([b["lowres"] for b in ref])
    assert -1.0 <= lowres.min() and lowres.max() <= 1.0


def test_cache_decoded_gives_the_same_stream(folder_builder) -> None:
    """Decoding once and caching changes nothing the model sees: the same crops, low-res
    inputs and captions, bitwise, from step 0 and when resuming across an epoch boundary."""
    kwargs = dict(batch_size=4, seed=5, crop_size=16, lowres_size=4, degradation=degradations.DEFAULT_DEGRADATION)
    for start in (0, 2):
        plain = _take(pipeline.make_train_iterator(folder_builder, start_step=start, **kwargs), 3)
        cached = _take(pipeline.make_train_iterator(folder_builder, start_step=start, cache_decoded=True, **kwargs), 3)
        for a, b in zip(plain, cached):
            assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["lowres"], b["lowres"])
            assert list(a["caption"]) == list(b["caption"])


def test_variable_sizes_need_a_crop_and_crops_must_fit(folder_builder) -> None:
    """Variable-size data without crop/image_size, a too-large crop, and a degradation
    without lowres_size are all clear ValueErrors."""
    with pytest.raises(ValueError, match="different sizes.*crop_size"):
        pipeline.make_train_iterator(folder_builder, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="smaller than the requested crop.*crop_size=40") as err:
        next(pipeline.make_train_iterator(folder_builder, batch_size=6, seed=0, crop_size=40))
    assert "36x36" in str(err.value)  # the offending image's size
    with pytest.raises(ValueError, match="lowres_size"):
        pipeline.make_train_iterator(folder_builder, batch_size=2, seed=0, crop_size=16, degradation={})
    with pytest.raises(ValueError, match="exceeds"):
        pipeline.make_train_iterator(folder_builder, batch_size=2, seed=0, crop_size=16, lowres_size=32)
    with pytest.raises(ValueError, match="no split 'validation'"):
        pipeline.make_eval_iterator(folder_builder, batch_size=2, center_crop=16)


def test_image_size_keeps_aspect_on_variable_sizes(folder_builder, folder_pixels) -> None:
    """image_size on variable-size data scales the short side (no distortion) and keeps the
    centre square: the 36x36 image at image_size=36 comes back untouched."""
    batch = next(pipeline.make_train_iterator(folder_builder, batch_size=6, seed=0, image_size=36))
    assert batch["image"].shape == (6, 36, 36, 3)
    index = list(batch["caption"]).index("noise picture im3.png")
    assert np.array_equal(_to_uint8(batch["image"][index]), folder_pixels["im3.png"])


def test_fixed_size_crop_lowres_and_center_crop_eval(shapes_builder) -> None:
    """Fixed-size data: train crops are windows of stored images; eval centre crops are
    exactly the middle window, lowres its block mean, and two passes agree."""
    stored = list(tfds.as_numpy(shapes_builder.as_dataset(split="train")))
    train = next(pipeline.make_train_iterator(
        shapes_builder, batch_size=6, seed=0, crop_size=24, lowres_size=12,
        degradation=degradations.DEFAULT_DEGRADATION))
    assert train["image"].shape == (6, 24, 24, 3) and train["lowres"].shape == (6, 12, 12, 3)
    for crop in _to_uint8(train["image"]):
        assert any(_window_offsets(ex["image"], crop) for ex in stored)

    validation = list(tfds.as_numpy(shapes_builder.as_dataset(split="validation")))
    first = list(pipeline.make_eval_iterator(shapes_builder, batch_size=3, center_crop=16, lowres_size=8))
    second = list(pipeline.make_eval_iterator(shapes_builder, batch_size=3, center_crop=16, lowres_size=8))
    images = np.concatenate([b["image"] for b in first])
    lowres = np.concatenate([b["lowres"] for b in first])
    assert images.shape == (4, 16, 16, 3) and lowres.shape == (4, 8, 8, 3)
    for image, low, ex in zip(images, lowres, validation):
        assert np.array_equal(_to_uint8(image), ex["image"][8:24, 8:24])
        np.testing.assert_allclose(low, _block_mean(image, 2), atol=1e-5)
    assert all(np.array_equal(a["lowres"], b["lowres"]) for a, b in zip(first, second))


# --------------------------------------------------------------------------- image folder


def _mixed_folder(root: Path) -> dict[str, np.ndarray]:
    """RGB, grey and RGBA PNGs (one in a subfolder); returns the expected RGB pixels."""
    rgb = _write_folder(root, [(12, 20), (16, 16)], seed=1)
    grey = np.arange(15 * 10, dtype=np.uint8).reshape(15, 10)
    (root / "sub").mkdir()
    Image.fromarray(grey, mode="L").save(root / "sub" / "grey.png")
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:4, ..., 3] = 255  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(root / "alpha.png")
    expected_alpha = np.full((8, 9, 3), 255, np.uint8)
    expected_alpha[:4] = (10, 200, 30)
    return {**rgb, "sub/grey.png": np.repeat(grey[..., None], 3, -1), "alpha.png": expected_alpha}


@pytest.mark.parametrize("caption_format", ["tsv", "jsonl"])
def test_image_folder_round_trip(tmp_path, caption_format: str) -> None:
    """Captions and pixels read back equal what was written (grey -> RGB, transparency on
    white), for both caption formats; the user's folder is left byte-for-byte unchanged."""
    root = tmp_path / "my images"
    expected = _mixed_folder(root)
    captions = {name: f"caption of {name} \u00e9" for name in expected}
    if caption_format == "tsv":
        (root / "captions.tsv").write_text(_tsv(captions), encoding="utf-8")
    else:
        lines = [json.dumps({"file": n, "caption": c}) for n, c in captions.items()]
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = _folder_digest(root)

    builder = pipeline.prepare(pipeline.get_dataset_builder(
        "image_folder", str(tmp_path / "tfds"), folder=str(root), validation_fraction=0.0))
    assert builder.builder_config.name.startswith("my_images_")
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert sorted(ex["file"].decode() for ex in examples) == sorted(expected)
    for ex in examples:
        name = ex["file"].decode()
        assert ex["caption"].decode() == captions[name]
        assert np.array_equal(ex["image"], expected[name]), name
    assert _folder_digest(root) == before


def test_image_folder_names_and_validation_split(tmp_path, folder_builder) -> None:
    """Different folders get different builder configs; the validation split is a stable,
    name-hashed share, disjoint from train."""
    names = [f"photo_{i:04d}.jpg" for i in range(2000)]
    share = np.mean([image_folder.split_of(n, 0.1) == "validation" for n in names])
    assert 0.08 < share < 0.12
    assert [image_folder.split_of(n, 0.1) for n in names[:50]] == \
        [image_folder.split_of(n, 0.1) for n in names[:50]]

    root = tmp_path / "noise"
    written = _write_folder(root, [(8, 8)] * 12, seed=2)
    (root / "captions.tsv").write_text(_tsv({n: n for n in written}))
    builder = pipeline.prepare(image_folder.make_image_folder_builder(root, str(tmp_path / "tfds"), 0.5))
    assert builder.builder_config.name != folder_builder.builder_config.name  # same folder name
    splits = {s: {ex["file"].decode() for ex in tfds.as_numpy(builder.as_dataset(split=s))}
              for s in ("train", "validation")}
    assert not splits["train"] & splits["validation"]
    assert splits["train"] | splits["validation"] == set(written)
    assert splits["validation"] == {n for n in written if image_folder.split_of(n, 0.5) == "validation"}


def test_image_folder_errors(tmp_path) -> None:
    """Missing folder/captions, captions naming absent files, uncaptioned images, bad lines
    and unreadable images fail with the file named."""
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.get_dataset_builder("image_folder", str(tmp_path), folder=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="needs the image folder"):
        pipeline.get_dataset_builder("image_folder", str(tmp_path))
    root = tmp_path / "imgs"
    _write_folder(root, [(8, 8), (8, 8)], seed=3)
    with pytest.raises(ValueError, match="No captions file.*captions.tsv"):
        image_folder.make_image_folder_builder(root, str(tmp_path))

    captions = root / "captions.tsv"
    captions.write_text("im0.png\ta\nim1.png\tb\nghost.png\tc\n")
    with pytest.raises(ValueError, match="ghost.png"):
        image_folder.make_image_folder_builder(root, str(tmp_path))
    captions.write_text("im0.png\ta\n")
    with pytest.raises(ValueError, match="no caption.*im1.png"):
        image_folder.make_image_folder_builder(root, str(tmp_path))
    captions.write_text("im0.png\ta\nim1.png b\n")
    with pytest.raises(ValueError, match="line 2.*tab"):
        image_folder.make_image_folder_builder(root, str(tmp_path))

    captions.write_text("im0.png\ta\nim1.png\tb\nbroken.png\tc\n")
    (root / "broken.png").write_bytes(b"not a png at all")
    builder = image_folder.make_image_folder_builder(root, str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="Cannot read image.*broken.png"):
        pipeline.prepare(builder)


# --------------------------------------------------------------------------- photos


def test_photo_registry() -> None:
    """Every photo is uint8 HxWx3; train and held-out are disjoint and cover the registry;
    china/flower are not swapped (the flower has a dark border, the pagoda a bright sky)."""
    assert set(photos.TRAIN_PHOTOS).isdisjoint(photos.HELDOUT_PHOTOS)
    assert set(photos.TRAIN_PHOTOS) | set(photos.HELDOUT_PHOTOS) == set(photos.PHOTOS)
    assert len(photos.HELDOUT_PHOTOS) >= 3 and len(photos.TRAIN_PHOTOS) >= 7
    assert {"astronaut", "motorcycle", "china", "flower", "retina"} <= set(photos.PHOTOS)
    for name in photos.PHOTOS:
        image = photos.load_photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 256, name
        assert photos.photo_caption(name).startswith("a "), name
    assert photos.load_photo("flower")[:20].mean() < 80
    assert photos.load_photo("china")[:20].mean() > 150
    with pytest.raises(ValueError, match="astronaut"):
        photos.load_photo("astronot")


def test_photos_builder_eval_and_train(tmp_root) -> None:
    """ediff_photos resolves by name, stores native variable sizes, and feeds centre crops
    (exact middle windows of the held-out photos) and random training crops."""
    builder = pipeline.prepare(pipeline.get_dataset_builder("ediff_photos", str(tmp_root / "tfds")))
    assert builder.info.features["image"].shape == (None, None, 3)
    assert builder.info.splits["train"].num_examples == len(photos.TRAIN_PHOTOS)
    assert builder.info.splits["validation"].num_examples == len(photos.HELDOUT_PHOTOS)
    by_caption = {photos.photo_caption(n): photos.load_photo(n) for n in photos.PHOTOS}

    batches = list(pipeline.make_eval_iterator(builder, batch_size=2, center_crop=128, lowres_size=32))
    captions = [c for b in batches for c in b["caption"]]
    assert sorted(captions) == sorted(photos.photo_caption(n) for n in photos.HELDOUT_PHOTOS)
    for batch in batches:
        for image, low, caption in zip(batch["image"], batch["lowres"], batch["caption"]):
            full = by_caption[caption]
            top, left = (full.shape[0] - 128) // 2, (full.shape[1] - 128) // 2
            assert np.array_equal(_to_uint8(image), full[top:top + 128, left:left + 128])
            np.testing.assert_allclose(low, _block_mean(image, 4), atol=1e-5)

    train = next(pipeline.make_train_iterator(builder, batch_size=len(photos.TRAIN_PHOTOS), seed=0, crop_size=64))
    assert set(train["caption"]) == {photos.photo_caption(n) for n in photos.TRAIN_PHOTOS}
    for crop, caption in zip(_to_uint8(train["image"]), train["caption"]):
        assert _window_offsets(by_caption[caption], crop), caption
