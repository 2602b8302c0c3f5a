"""Tests for the ``ediff_shapes`` scenes, its TFDS builder and the tf.data pipeline.

Expected values are written from /work/shared/specs/shapes.md, not from the code, so a
wrong palette, swapped axes, a wrong threshold or a non-resumable pipeline all fail.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from ediff_jax.data import shapes
from ediff_jax.data.shapes import Scene, ShapeObject

SPEC_PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
SPEC_BACKGROUND = (240, 240, 240)

_C = "(red|green|blue|yellow|purple|orange)"
_S = "(circle|square|triangle)"
_R = "(top left|top right|bottom left|bottom right|top|bottom|left|right|center)"
ONE_RE = re.compile(rf"^a {_C} {_S}(?: in the {_R})?$")
TWO_RE = re.compile(rf"^a {_C} {_S} (to the left of|to the right of|above|below|and) a {_C} {_S}$")


def spec_region(cx: float, cy: float) -> str:
    """Independent re-statement of the 3x3 grid (y grows downwards)."""
    row = ["top", "middle", "bottom"][min(int(cy * 3), 2)]
    col = ["left", "center", "right"][min(int(cx * 3), 2)]
    if row == "middle":
        return col
    if col == "center":
        return row
    return f"{row} {col}"


@pytest.fixture(scope="module")
def sampled() -> list[tuple[Scene, str]]:
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(2000):
        scene = shapes.sample_scene(rng)
        out.append((scene, shapes.caption_scene(scene, rng)))
    return out


def _hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# --------------------------------------------------------------------------- scenes


def test_constants_match_spec() -> None:
    assert list(shapes.PALETTE.items()) == list(SPEC_PALETTE.items())  # order matters
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert tuple(shapes.BACKGROUND) == SPEC_BACKGROUND
    assert set(shapes.REGIONS) == {
        "top left", "top", "top right", "left", "center", "right",
        "bottom left", "bottom", "bottom right",
    }


@pytest.mark.parametrize(
    "cx, cy, word",
    [
        (0.1, 0.1, "top left"), (0.5, 0.1, "top"), (0.9, 0.1, "top right"),
        (0.1, 0.5, "left"), (0.5, 0.5, "center"), (0.9, 0.5, "right"),
        (0.1, 0.9, "bottom left"), (0.5, 0.9, "bottom"), (0.9, 0.9, "bottom right"),
        (0.34, 0.32, "top"), (0.32, 0.34, "left"),
    ],
)
def test_region_of(cx: float, cy: float, word: str) -> None:
    assert shapes.region_of(cx, cy) == word


def test_objects_inside_sizes_gap_colours(sampled) -> None:
    for scene, _ in sampled:
        assert len(scene.objects) in (1, 2)
        for o in scene.objects:
            assert o.color in SPEC_PALETTE and o.shape in shapes.SHAPES
            assert 0.22 <= o.size <= 0.38
            ymin, xmin, ymax, xmax = o.bbox
            assert 0.0 <= ymin < ymax <= 1.0 and 0.0 <= xmin < xmax <= 1.0
            assert ymax - ymin == pytest.approx(o.size) and xmax - xmin == pytest.approx(o.size)
            assert (ymin + ymax) / 2 == pytest.approx(o.cy)
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.color != b.color
            gap_x = max(b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])
            gap_y = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2])
            assert max(gap_x, gap_y) >= 0.03


def test_caption_grammar_and_truth(sampled) -> None:
    for scene, caption in sampled:
        assert caption == caption.lower() and not caption.endswith(".")
        objs = scene.objects
        if len(objs) == 1:
            m = ONE_RE.match(caption)
            assert m, caption
            color, shape, region = m.groups()
            assert (color, shape) == (objs[0].color, objs[0].shape)
            if region is not None:
                assert region == spec_region(objs[0].cx, objs[0].cy), (caption, objs[0])
            continue
        m = TWO_RE.match(caption)
        assert m, caption
        ca, sa, rel, cb, sb = m.groups()
        a, b = objs
        assert (ca, sa, cb, sb) == (a.color, a.shape, b.color, b.shape)
        dx, dy = a.cx - b.cx, a.cy - b.cy
        if rel in ("to the left of", "to the right of"):
            assert abs(dx) >= abs(dy) and abs(dx) >= 0.15, (caption, a, b)
            assert (dx < 0) == (rel == "to the left of")
        elif rel in ("above", "below"):
            assert abs(dy) >= abs(dx) and abs(dy) >= 0.15, (caption, a, b)
            assert (dy < 0) == (rel == "above")  # y grows downwards


def test_frequencies(sampled) -> None:
    n1 = [c for s, c in sampled if len(s.objects) == 1]
    assert abs(len(n1) / len(sampled) - 0.5) < 0.05
    assert abs(np.mean([" in the " in c for c in n1]) - 0.5) < 0.06
    eligible = [
        (s, c) for s, c in sampled
        if len(s.objects) == 2 and shapes.relation_of(*s.objects) is not None
    ]
    assert len(eligible) > 300
    assert abs(np.mean([" and a " not in c for _, c in eligible]) - 0.5) < 0.07
    # The 15% threshold never binds for valid pairs: boxes >= 0.22 wide with a >= 0.03
    # gap put the centres >= 0.25 apart along the separating axis.
    two = [s for s, _ in sampled if len(s.objects) == 2]
    assert len(eligible) == len(two)
    assert min(max(abs(a.cx - b.cx), abs(a.cy - b.cy)) for a, b in (s.objects for s in two)) >= 0.25
    colors = [o.color for s, _ in sampled for o in s.objects]
    kinds = [o.shape for s, _ in sampled for o in s.objects]
    for name in SPEC_PALETTE:
        assert abs(colors.count(name) / len(colors) - 1 / 6) < 0.03
    for name in shapes.SHAPES:
        assert abs(kinds.count(name) / len(kinds) - 1 / 3) < 0.04


def test_relation_of_axes() -> None:
    def obj(cx: float, cy: float) -> ShapeObject:
        return ShapeObject("red", "circle", cx, cy, 0.25)

    assert shapes.relation_of(obj(0.2, 0.5), obj(0.7, 0.55)) == "to the left of"
    assert shapes.relation_of(obj(0.7, 0.5), obj(0.2, 0.55)) == "to the right of"
    assert shapes.relation_of(obj(0.5, 0.2), obj(0.45, 0.8)) == "above"
    assert shapes.relation_of(obj(0.5, 0.8), obj(0.45, 0.2)) == "below"
    assert shapes.relation_of(obj(0.5, 0.5), obj(0.64, 0.4)) is None  # < 15% on both
    close = Scene((obj(0.5, 0.5), ShapeObject("blue", "square", 0.6, 0.62, 0.25)))
    captions = {shapes.caption_scene(close, np.random.default_rng(i)) for i in range(20)}
    assert captions == {"a red circle and a blue square"}
    far = Scene((obj(0.2, 0.5), ShapeObject("blue", "square", 0.7, 0.45, 0.25)))
    captions = {shapes.caption_scene(far, np.random.default_rng(i)) for i in range(20)}
    assert captions == {"a red circle and a blue square", "a red circle to the left of a blue square"}


def test_render_centre_colours_and_background(sampled) -> None:
    size = 64
    for scene, _ in sampled[:150]:
        image = shapes.render_scene(scene, size)
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        outside = np.ones((size, size), bool)
        for o in scene.objects:
            r, c = int(o.cy * size), int(o.cx * size)
            assert tuple(image[r, c]) == SPEC_PALETTE[o.color], (o, image[r, c])
            ymin, xmin, ymax, xmax = o.bbox
            outside[
                max(int(ymin * size) - 1, 0): int(np.ceil(ymax * size)) + 1,
                max(int(xmin * size) - 1, 0): int(np.ceil(xmax * size)) + 1,
            ] = False
        assert (image[outside] == SPEC_BACKGROUND).all()
        for r, c in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)]:
            if outside[r, c]:
                assert tuple(image[r, c]) == SPEC_BACKGROUND


@pytest.mark.parametrize("shape, area", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_render_shape_geometry(shape: str, area: float) -> None:
    size, s = 128, 0.3
    scene = Scene((ShapeObject("blue", shape, 0.45, 0.55, s),))
    image = shapes.render_scene(scene, size).astype(np.float64)
    bg, fg = np.array(SPEC_BACKGROUND, float), np.array(SPEC_PALETTE["blue"], float)
    coverage = ((image - bg) / (fg - bg)).mean(-1)  # 0 background, 1 fill
    assert coverage.sum() / (s * size) ** 2 == pytest.approx(area, rel=0.02)
    ys, xs = np.nonzero(coverage > 0.5)
    assert xs.mean() / size == pytest.approx(0.45, abs=0.01)  # symmetric about cx
    if shape == "triangle":  # points up: narrow at the top of the bbox, wide at the bottom
        top = int((0.55 - s / 2) * size)
        bottom = int((0.55 + s / 2) * size) - 1
        assert coverage[top + 2].sum() < 0.2 * coverage[bottom - 1].sum()
        assert coverage[bottom - 1].sum() / size == pytest.approx(s, abs=0.03)


def test_render_size_independent(sampled) -> None:
    for scene, _ in sampled[:20]:
        small = shapes.render_scene(scene, 64).astype(np.float64)
        big = shapes.render_scene(scene, 256).astype(np.float64)
        down = big.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        diff = np.abs(down - small)
        assert diff.mean() < 0.5 and diff.max() < 40, (diff.mean(), diff.max())


def test_generate_example_deterministic() -> None:
    a = shapes.generate_example((0, 7, 3), 32)
    b = shapes.generate_example((0, 7, 3), 32)
    c = shapes.generate_example((0, 7, 4), 32)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not np.array_equal(a["image"], c["image"])
    assert all(o["bbox"].dtype == np.float32 and o["bbox"].shape == (4,) for o in a["objects"])


# --------------------------------------------------------------------------- TFDS builder

NUM_TRAIN, NUM_VAL, SIZE = 32, 8, 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def builder(data_root):
    from ediff_jax.data import make_builder, prepare

    return prepare(make_builder(SIZE, NUM_TRAIN, NUM_VAL, str(data_root / "a"), seed=0))


@pytest.fixture(scope="module")
def train_examples(builder) -> list[dict]:
    import tensorflow_datasets as tfds

    return list(tfds.as_numpy(builder.as_dataset(split="train")))


def test_registered_configs() -> None:
    from ediff_jax.data import EdiffShapes, builder_config_name, get_dataset_builder

    names = [c.name for c in EdiffShapes.BUILDER_CONFIGS]
    assert {builder_config_name(s) for s in (32, 64, 256, 1024)} <= set(names)
    b = get_dataset_builder(f"ediff_shapes/{builder_config_name(64)}", data_dir=None)
    assert b.name == "ediff_shapes" and b.builder_config.size == 64
    assert str(b.info.version) == "1.0.0"


def test_builder_features_and_splits(builder, train_examples) -> None:
    info = builder.info
    assert info.splits["train"].num_examples == NUM_TRAIN
    assert info.splits["validation"].num_examples == NUM_VAL
    feats = info.features
    assert feats["objects"]["color"].names == list(SPEC_PALETTE)
    assert feats["objects"]["shape"].names == ["circle", "square", "triangle"]
    assert len(train_examples) == NUM_TRAIN
    for ex in train_examples:
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (SIZE, SIZE, 3)
        caption = ex["caption"].decode()
        assert ONE_RE.match(caption) or TWO_RE.match(caption), caption
        bboxes = ex["objects"]["bbox"]
        assert bboxes.dtype == np.float32 and bboxes.shape[1:] == (4,)
        colors = [feats["objects"]["color"].int2str(i) for i in ex["objects"]["color"]]
        kinds = [feats["objects"]["shape"].int2str(i) for i in ex["objects"]["shape"]]
        assert caption.startswith(f"a {colors[0]} {kinds[0]}")
        for color, (ymin, xmin, ymax, xmax) in zip(colors, bboxes):
            r, c = int((ymin + ymax) / 2 * SIZE), int((xmin + xmax) / 2 * SIZE)
            assert tuple(ex["image"][r, c]) == SPEC_PALETTE[color]


def test_builder_deterministic_given_seed(builder, train_examples, data_root) -> None:
    from ediff_jax.data import make_builder, prepare
    from ediff_jax.data.shapes_tfds import split_seed

    again = prepare(make_builder(SIZE, NUM_TRAIN, NUM_VAL, str(data_root / "b"), seed=0))
    for split in ("train", "validation"):
        files_a = sorted(Path(builder.data_dir).glob(f"*-{split}.tfrecord*"))
        files_b = sorted(Path(again.data_dir).glob(f"*-{split}.tfrecord*"))
        assert files_a and [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]
    # The stored examples are exactly those generated from (seed, split, index).
    expected = {
        _hash(shapes.generate_example((0, split_seed("train"), i), SIZE)["image"])
        for i in range(NUM_TRAIN)
    }
    assert {_hash(ex["image"]) for ex in train_examples} == expected
    other = {
        _hash(shapes.generate_example((1, split_seed("train"), i), SIZE)["image"])
        for i in range(NUM_TRAIN)
    }
    assert not other & expected


# --------------------------------------------------------------------------- pipeline


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def test_train_batches(builder, train_examples) -> None:
    from ediff_jax.data import make_train_iterator

    batches = _take(make_train_iterator(builder, batch_size=8, seed=0), 8)  # two epochs
    for b in batches:
        assert b["image"].dtype == np.float32 and b["image"].shape == (8, SIZE, SIZE, 3)
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["caption"].shape == (8,) and all(isinstance(c, str) for c in b["caption"])
    stored = {_hash(ex["image"]) for ex in train_examples}
    epochs = [[_hash(x) for b in batches[i:i + 4] for x in _to_uint8(b["image"])] for i in (0, 4)]
    for order in epochs:  # each epoch is a permutation of the stored examples
        assert set(order) == stored and len(order) == NUM_TRAIN
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    small = next(make_train_iterator(builder, batch_size=4, seed=0, image_size=16))
    assert small["image"].shape == (4, 16, 16, 3) and small["image"].dtype == np.float32


def test_train_deterministic_and_resume(builder) -> None:
    from ediff_jax.data import make_train_iterator

    ref = _take(make_train_iterator(builder, batch_size=6, seed=3), 9)
    again = _take(make_train_iterator(builder, batch_size=6, seed=3), 9)
    other = _take(make_train_iterator(builder, batch_size=6, seed=4), 9)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(ref, again))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(ref, other))
    # Step 5 starts 30 examples in: resuming crosses the epoch boundary mid-batch.
    for start in (1, 5, 6):
        resumed = _take(make_train_iterator(builder, batch_size=6, seed=3, start_step=start), 3)
        for a, b in zip(resumed, ref[start:start + 3]):
            assert np.array_equal(a["image"], b["image"])
            assert list(a["caption"]) == list(b["caption"])


def test_relation_repeats_epoch_and_resume(builder, train_examples) -> None:
    """Each epoch holds every example once and each relation-caption example k times (by the
    spec's grammar), and resuming mid-epoch still equals skipping batches."""
    from ediff_jax.data import make_train_iterator
    from ediff_jax.data.pipeline import is_relation_caption

    k = 3
    relation = {_hash(ex["image"]) for ex in train_examples
                if re.fullmatch(r"a \w+ \w+ (to the left of|to the right of|above|below) a \w+ \w+", ex["caption"].decode())}
    assert relation and {is_relation_caption(ex["caption"].decode()) for ex in train_examples} == {True, False}
    assert sum(is_relation_caption(ex["caption"].decode()) for ex in train_examples) == len(relation)
    epoch = NUM_TRAIN + (k - 1) * len(relation)
    batch = 4
    n_batches = -(-2 * epoch // batch)
    ref = _take(make_train_iterator(builder, batch_size=batch, seed=1, relation_repeats=k), n_batches)
    order = [_hash(x) for b in ref for x in _to_uint8(b["image"])]
    counts = {h: order[:epoch].count(h) for h in set(order[:epoch])}
    assert counts == {_hash(ex["image"]): (k if _hash(ex["image"]) in relation else 1) for ex in train_examples}
    for start in (1, epoch // batch):
        resumed = _take(make_train_iterator(builder, batch_size=batch, seed=1, relation_repeats=k, start_step=start), 2)
        for a, b in zip(resumed, ref[start:start + 2]):
            assert list(a["caption"]) == list(b["caption"])
    with pytest.raises(ValueError, match="relation_repeats=0"):
        make_train_iterator(builder, batch_size=batch, seed=1, relation_repeats=0)


def test_two_process_sharding_disjoint(builder, train_examples) -> None:
    from ediff_jax.data import make_eval_iterator, make_train_iterator

    seen = []
    for index in range(2):
        it = make_train_iterator(builder, batch_size=4, seed=0, process_index=index, process_count=2)
        seen.append({_hash(x) for b in _take(it, 4) for x in _to_uint8(b["image"])})
    assert len(seen[0]) == len(seen[1]) == NUM_TRAIN // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {_hash(ex["image"]) for ex in train_examples}
    evals = [
        [x for b in make_eval_iterator(builder, batch_size=3, process_index=i, process_count=2)
         for x in b["caption"]]
        for i in range(2)
    ]
    assert len(evals[0]) + len(evals[1]) == NUM_VAL


def test_eval_iterator_one_pass(builder) -> None:
    from ediff_jax.data import make_eval_iterator

    first = list(make_eval_iterator(builder, batch_size=3))
    second = list(make_eval_iterator(builder, batch_size=3))
    assert [len(b["caption"]) for b in first] == [3, 3, 2]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, second))


def test_unknown_dataset_message() -> None:
    from ediff_jax.data import get_dataset_builder

    with pytest.raises(ValueError) as err:
        get_dataset_builder("ediff_shapes/65", data_dir=None)
    assert "ediff_shapes/65" in str(err.value) and "ediff_shapes/64" in str(err.value)
    with pytest.raises(ValueError) as err:
        get_dataset_builder("no_such_dataset_xyz", data_dir=None)
    message = str(err.value)
    assert "no_such_dataset_xyz" in message and "ediff_shapes/32" in message
