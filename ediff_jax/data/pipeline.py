"""tf.data input pipeline: TFDS builder -> sharded, deterministic numpy batches.

Training batches are a pure function of ``(seed, step, process_index, process_count)``:
the stream is a sequence of epochs, each epoch a shuffle of this host's shard seeded by
``(seed, process_index, epoch)``. Resuming at ``start_step`` therefore needs no iterator
checkpoint: it starts at the right epoch and skips the examples already consumed in it.

Super-resolution adds random crops and degraded low-res inputs. Their randomness uses
stateless TF ops seeded by ``(seed, process_index, epoch, position in epoch)``, so an
example is cropped and degraded identically however the stream was reached, and resuming
stays exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# photos and image_folder register their TFDS builders on import, like shapes_tfds.
from ediff_jax.data import degradations, image_folder, photos, shapes_tfds
from ediff_jax.data.shapes import RELATIONS

Batch = dict[str, np.ndarray]

SHAPES_NAME = "ediff_shapes"
PHOTOS_NAME = photos.EdiffPhotos.name  # "ediff_photos"
IMAGE_FOLDER_NAMES = ("image_folder", "ediff_image_folder")
_MAX_EPOCHS = 2**62  # "forever"; a range rather than repeat() keeps the epoch number


def shapes_config_names() -> list[str]:
    """Registered ``ediff_shapes`` configs, as full dataset names."""
    return [f"{SHAPES_NAME}/{c.name}" for c in shapes_tfds.EdiffShapes.BUILDER_CONFIGS]


def builder_from_config(data_config: Any, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The dataset of a config's `data` section (name, data_dir, and folder for image_folder)."""
    folder = data_config.get("folder")
    kwargs = {"folder": folder, "validation_fraction": float(data_config.get("validation_fraction", 0.05))} \
        if folder else {}
    return get_dataset_builder(data_config.name, data_dir or data_config.data_dir, **kwargs)


def get_dataset_builder(
    name: str,
    data_dir: str | None = None,
    *,
    folder: str | Path | None = None,
    validation_fraction: float = image_folder.DEFAULT_VALIDATION_FRACTION,
) -> tfds.core.DatasetBuilder:
    """Builder for ``"ediff_shapes/64"``-style names, ``"ediff_photos"``, ``"image_folder"``
    (with ``folder=``, a captioned image folder) or any TFDS name via ``tfds.builder``.

    Raises a ValueError naming the unknown dataset and listing the built-in ones, since a
    typo in a config file should say what would have worked. ``validation_fraction`` is
    only used by ``image_folder``.
    """
    available = ", ".join(shapes_config_names())
    dataset, _, rest = name.partition("/")
    if dataset.split(":")[0] in IMAGE_FOLDER_NAMES:
        if folder is None:
            raise ValueError(
                f"Dataset {name!r} needs the image folder: pass folder=... "
                f"(config: data.folder = '/path/to/images' holding captions.tsv or captions.jsonl)."
            )
        return image_folder.make_image_folder_builder(folder, data_dir, validation_fraction)
    if folder is not None:
        raise ValueError(
            f"folder={str(folder)!r} was given for dataset {name!r}, but only "
            f"{IMAGE_FOLDER_NAMES[0]!r} reads a folder: set the name to {IMAGE_FOLDER_NAMES[0]!r} "
            f"or drop the folder."
        )
    if dataset.split(":")[0] == SHAPES_NAME:
        config = rest.split(":")[0].split("/")[0]
        known = [c.name for c in shapes_tfds.EdiffShapes.BUILDER_CONFIGS]
        if config and config not in known:
            raise ValueError(
                f"Unknown dataset {name!r}: {SHAPES_NAME} has no config {config!r}. "
                f"Available {SHAPES_NAME} configs: {available}."
            )
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as err:
        raise ValueError(
            f"Unknown dataset {name!r} (not a registered TFDS dataset). "
            f"Built-in datasets: {available}, {PHOTOS_NAME}, "
            f"{IMAGE_FOLDER_NAMES[0]} (with folder=...)."
        ) from err


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Generate/download the data once; later calls are no-ops. Returns the builder."""
    if not builder.is_prepared():
        # Statistics are unused here and cost a full extra pass over the images.
        config = tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
        builder.download_and_prepare(download_config=config)
    return builder


def _shard_bounds(
    num_examples: int, process_index: int, process_count: int, even: bool
) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of this host's shard of a split.

    ``even=True`` drops the remainder so that every host has the same number of
    examples (what ``tfds.even_splits(..., drop_remainder=True)`` does), which keeps
    hosts in lock-step; ``even=False`` spreads the remainder (for one-pass evaluation).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if even:
        per = num_examples // process_count
        if per == 0:
            raise ValueError(f"{num_examples} examples cannot be split over {process_count} hosts")
        return process_index * per, (process_index + 1) * per
    start = process_index * num_examples // process_count
    end = (process_index + 1) * num_examples // process_count
    return start, end


# tf.data only decodes small PNGs here; its default thread pools (one thread per core)
# would compete with XLA's compute threads for the same cores and slow training down by
# ~40% on a 2-core machine. Two private threads keep the input well ahead of the step.
DATA_THREADS = 2


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True  # parallel map/interleave keep their input order
    options.threading.private_threadpool_size = DATA_THREADS
    options.threading.max_intra_op_parallelism = 1
    return options


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """Examples of ``split`` in file order, image still PNG-encoded, only image/caption."""
    read_config = tfds.ReadConfig(
        options=_options(),
        try_autocache=False,  # the epoch structure below re-reads; keep memory flat
        skip_prefetch=True,
    )
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config,
    )
    return ds.map(lambda ex: {"image": ex["image"], "caption": ex["caption"]})


def _static_hw(builder: tfds.core.DatasetBuilder) -> tuple[int, int] | None:
    """``(H, W)`` when every stored image has that size, ``None`` for variable sizes."""
    height, width = builder.info.features["image"].shape[:2]
    return None if height is None or width is None else (int(height), int(width))


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    return int(value)


def _check_sizes(
    builder: tfds.core.DatasetBuilder,
    image_size: int | None,
    crop: int | None,
    lowres_size: int | None,
    crop_arg: str,
) -> None:
    """Fail before building the pipeline when the sizes cannot give square, batchable output.

    After ``image_size``, fixed-size data are ``image_size`` square (as always) and
    variable-size data have short side ``image_size``; a crop then has to fit.
    """
    static = _static_hw(builder)
    name = builder.info.full_name
    if static is None and crop is None and image_size is None:
        raise ValueError(
            f"{name} holds images of different sizes, which cannot be batched as they are: "
            f"pass {crop_arg}=N (crops of N x N) or image_size=N (short side resized to N, "
            f"centre N x N)."
        )
    if image_size is not None:
        short_side = image_size
    else:
        short_side = None if static is None else min(static)
    if crop is not None and short_side is not None and crop > short_side:
        raise ValueError(
            f"{crop_arg}={crop} is larger than the images of {name} "
            f"({'image_size' if image_size is not None else 'native'} short side {short_side}); "
            f"use {crop_arg} <= {short_side} or a larger image_size."
        )
    if lowres_size is None:
        return
    if crop is None and image_size is None and static is not None and static[0] != static[1]:
        raise ValueError(
            f"lowres_size needs square high-res images, but {name} is {static[0]}x{static[1]}: "
            f"pass {crop_arg} or image_size."
        )
    highres = crop or image_size or (static[0] if static is not None else None)
    if highres is not None and lowres_size > highres:
        raise ValueError(
            f"lowres_size={lowres_size} exceeds the high-res size {highres}; the low-res "
            f"input must be at most as large as the image it conditions."
        )


def _resize_short_side(image: tf.Tensor, size: int) -> tf.Tensor:
    """Scale so the shorter side is ``size``, keeping the aspect ratio (area when shrinking)."""
    hw = tf.shape(image)[:2]
    short = tf.reduce_min(hw)
    scale = tf.cast(size, tf.float64) / tf.cast(short, tf.float64)
    target = tf.cast(tf.round(tf.cast(hw, tf.float64) * scale), tf.int32)
    target = tf.where(hw == short, tf.fill([2], tf.constant(size, tf.int32)), target)
    shrink = lambda: tf.image.resize(image, target, method="area", antialias=True)
    enlarge = lambda: tf.image.resize(image, target, method="bicubic", antialias=True)
    keep = lambda: image
    return tf.case([(short > size, shrink), (short < size, enlarge)], default=keep, exclusive=True)


# Marker for tf.data crop assertions, turned into a ValueError when iterating.
_SMALL_IMAGE = "An image is smaller than the requested crop"


def _assert_fits(image: tf.Tensor, size: int, crop_arg: str) -> tf.Tensor:
    hw = tf.shape(image)[:2]
    check = tf.debugging.assert_greater_equal(
        hw,
        tf.constant([size, size], tf.int32),
        message=(
            f"{_SMALL_IMAGE}: {crop_arg}={size}; pass image_size >= {size} (resizes the "
            f"short side first) or a smaller {crop_arg}"
        ),
        summarize=2,
    )
    with tf.control_dependencies([check]):
        return tf.identity(image)


def _random_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """``size`` x ``size`` window at a uniformly random offset drawn from ``seed``."""
    image = _assert_fits(image, size, "crop_size")
    hw = tf.shape(image)[:2]
    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, num=2, alg="philox"))
    top = tf.random.stateless_uniform([], seed_y, 0, hw[0] - size + 1, dtype=tf.int32, alg="philox")
    left = tf.random.stateless_uniform([], seed_x, 0, hw[1] - size + 1, dtype=tf.int32, alg="philox")
    crop = image[top : top + size, left : left + size]
    crop.set_shape([size, size, 3])
    return crop


def _center_crop(image: tf.Tensor, size: int, crop_arg: str) -> tf.Tensor:
    """The central ``size`` x ``size`` window (offsets rounded down)."""
    image = _assert_fits(image, size, crop_arg)
    hw = tf.shape(image)[:2]
    top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
    crop = image[top : top + size, left : left + size]
    crop.set_shape([size, size, 3])
    return crop


def _decode_fn(
    builder: tfds.core.DatasetBuilder,
    image_size: int | None,
    *,
    crop_size: int | None = None,
    center_crop: int | None = None,
    lowres_size: int | None = None,
    degradation: Mapping[str, Any] | None = None,
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Decode -> resize (``image_size``) -> crop -> scale to float32 [-1, 1] -> low-res.

    Fixed-size images resize to ``image_size`` square (area when shrinking), as always;
    variable-size ones resize their short side to ``image_size`` and, without any crop,
    keep the centre square. ``crop_size`` crops at random (needs ``ex["seed"]``),
    ``center_crop`` in the middle. ``lowres_size`` adds ``"lowres"``, degraded from the
    final high-res image per ``degradation`` (validated; ``None`` = clean area downsample).
    ``ex["image"]`` is the stored encoding, or pixels already decoded by ``_decoded_cache``.
    """
    image_feature = builder.info.features["image"]
    native = image_feature.shape[0]
    variable = _static_hw(builder) is None

    def decode(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = ex["image"]
        if image.dtype == tf.string:  # still encoded (no _decoded_cache in front)
            image = image_feature.decode_example(image)
        image = tf.cast(image, tf.float32)
        if variable:
            if image_size is not None:
                image = _resize_short_side(image, image_size)
                if crop_size is None and center_crop is None:
                    image = _center_crop(image, image_size, "image_size")
        elif image_size is not None and image_size != native:
            method = "area" if image_size < native else "bicubic"
            image = tf.image.resize(image, (image_size, image_size), method=method, antialias=True)
        # Training examples carry a per-example seed; evaluation is not random.
        example_seed = ex.get("seed", tf.zeros([2], tf.int64))
        crop_seed, degrade_seed = tf.unstack(
            tf.random.experimental.stateless_split(example_seed, num=2, alg="philox")
        )
        if crop_size is not None:
            image = _random_crop(image, crop_size, crop_seed)
        elif center_crop is not None:
            image = _center_crop(image, center_crop, "center_crop")
        image = tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)
        # No random horizontal flip: it would turn "to the left of" into a false
        # caption (and swap left/right regions), poisoning the spatial conditioning.
        out = {"image": image, "caption": ex["caption"]}
        if "index" in ex:
            out["index"] = ex["index"]
        if lowres_size is not None:
            out["lowres"] = degradations.degrade(image, lowres_size, degradation, degrade_seed)
        return out

    return decode


def _decoded_cache(builder: tfds.core.DatasetBuilder, ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` with its images decoded once and kept in memory (uint8, native size).

    Why: random crops of a few large photos otherwise decode a whole PNG per crop (on
    configs/sr_photos.py caching raised the step rate by about 10%). Only for small
    datasets: the decoded split has to fit in host memory.
    """
    feature = builder.info.features["image"]
    return ds.map(lambda ex: {**ex, "image": feature.decode_example(ex["image"])}).cache()


def _small_image_message(tf_message: str) -> str:
    """The crop assertion's sentence and the offending size, without TF's graph noise."""
    sentence = re.search(re.escape(_SMALL_IMAGE) + r"[^\]]*", tf_message)
    assert sentence is not None, tf_message
    size = re.search(r"\[(\d+) (\d+)\]", tf_message[sentence.end():])
    found = f" The image is {size[1]}x{size[2]} (height x width)." if size else ""
    return f"{sentence[0].strip()}.{found}"


def _to_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as err:
            if _SMALL_IMAGE not in err.message:
                raise
            raise ValueError(_small_image_message(err.message)) from None
        out = dict(batch)
        out["caption"] = np.array([c.decode("utf-8") for c in batch["caption"]], dtype=object)
        yield out


def _epoch_seed(seed: int, process_index: int, epoch: tf.Tensor) -> tf.Tensor:
    """A distinct, reproducible int64 shuffle seed per (seed, host, epoch)."""
    base = (int(seed) * 1_000_003 + int(process_index) * 7_919) % (2**31)
    return tf.constant(base, tf.int64) * 65_537 + epoch + 1


_AUGMENT_SALT = 0x5EED_C40B  # keeps augmentation streams apart from the shuffle seeds


def _example_seed(seed: int, process_index: int, epoch: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """Stateless int64 [2] seed of the example at ``position`` in this host's ``epoch``."""
    key = tf.stack([_epoch_seed(seed, process_index, epoch), tf.constant(_AUGMENT_SALT, tf.int64)])
    return tf.random.experimental.stateless_fold_in(key, position, alg="philox")


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Examples in ``split``; a missing split names the ones that exist."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"{builder.info.full_name} has no split {split!r}; its splits: "
            f"{sorted(builder.info.splits)}."
        ) from err


def make_train_iterator(
    builder: tfds.core.DatasetBuilder,
    *,
    batch_size: int,
    seed: int,
    image_size: int | None = None,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_buffer: int = 10_000,
    split: str = "train",
    crop_size: int | None = None,
    lowres_size: int | None = None,
    degradation: Mapping[str, Any] | None = None,
    cache_decoded: bool = False,
    relation_repeats: int = 1,
) -> Iterator[Batch]:
    """Endless ``{"image": float32 [B,H,W,3] in [-1,1], "caption": str [B], "index": int64 [B]}``
    batches; ``index`` is each example's position in ``split``.

    ``batch_size`` is per host. Each host reads a disjoint, equal-sized contiguous shard
    of ``split``. Batches may straddle epochs (the stream is flat), which is what makes
    ``start_step=k`` equal to skipping ``k`` batches from step 0. Shuffles use op-level
    seeds only, so the order is reproducible across runs as long as nobody changes the
    TF global seed (``tf.random.set_seed``), which TF mixes into every op seed.

    Super-resolution: ``crop_size`` takes a random ``crop_size`` square after the
    ``image_size`` resize (required, or ``image_size``, for variable-size datasets such as
    ``ediff_photos``); ``lowres_size`` adds ``"lowres"`` float32 [B, lowres, lowres, 3] in
    [-1, 1] made from the final image by ``degradations.degrade(..., degradation)``
    (``None``: clean area downsample). Crops and degradations are stateless functions of
    ``(seed, process_index, epoch, position in epoch)``, so resuming stays exact.
    ``cache_decoded`` decodes this host's shard once and keeps it in memory (small
    datasets of large images, such as ``ediff_photos``); the stream is the same either way.
    ``relation_repeats=k`` shows every example whose caption states a spatial relation k times
    per epoch (adjacent copies, mixed by the shuffle): relations are the rarest and latest-learnt
    captions (issue #15), and repeating them, rather than sampling them, keeps resume exact.
    """
    if batch_size <= 0 or start_step < 0:
        raise ValueError(f"need batch_size > 0 and start_step >= 0, got {batch_size}, {start_step}")
    image_size = _positive_or_none("image_size", image_size)
    crop_size = _positive_or_none("crop_size", crop_size)
    lowres_size = _positive_or_none("lowres_size", lowres_size)
    if degradation is not None and lowres_size is None:
        raise ValueError("degradation only shapes the low-res input: pass lowres_size too.")
    degradation = degradations.validate_degradation(degradation)
    _check_sizes(builder, image_size, crop_size, lowres_size, "crop_size")

    total = _split_size(builder, split)
    start, end = _shard_bounds(total, process_index, process_count, even=True)
    per_host = end - start
    # Each example's position in the split: which examples a step (or an expert) saw.
    base = _read_split(builder, f"{split}[{start}:{end}]").enumerate(start=start)
    base = base.map(lambda index, ex: {**ex, "index": index})
    if cache_decoded:
        base = _decoded_cache(builder, base)
    if relation_repeats != 1:
        base, per_host = _repeat_relations(builder, base, f"{split}[{start}:{end}]", per_host, relation_repeats)
    buffer = max(1, min(shuffle_buffer, per_host))

    consumed = start_step * batch_size
    first_epoch, offset = divmod(consumed, per_host)

    def epoch_ds(epoch: tf.Tensor) -> tf.data.Dataset:
        shuffled = base.shuffle(
            buffer, seed=_epoch_seed(seed, process_index, epoch), reshuffle_each_iteration=False
        )
        skip = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64))
        # Number positions before skipping: an example's seed must not depend on where
        # this run started.
        numbered = shuffled.enumerate().skip(skip)
        return numbered.map(
            lambda position, ex: {**ex, "seed": _example_seed(seed, process_index, epoch, position)}
        )

    decode = _decode_fn(
        builder, image_size, crop_size=crop_size, lowres_size=lowres_size, degradation=degradation
    )
    ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch_ds)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _to_numpy(ds.with_options(_options()))


_RELATION_PATTERN = ".* (" + "|".join(RELATIONS) + ") .*"


def is_relation_caption(caption: str) -> bool:
    """Whether an `ediff_shapes` caption states a spatial relation (`a red circle above a blue square`)."""
    return re.fullmatch(_RELATION_PATTERN, caption) is not None


def _repeat_relations(
    builder: tfds.core.DatasetBuilder, base: tf.data.Dataset, shard: str, per_host: int, repeats: int
) -> tuple[tf.data.Dataset, int]:
    """`base` with each relation-caption example repeated `repeats` times in place, and the new epoch length."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"config.data.relation_repeats={repeats!r}: use a whole number >= 1 (1: every example once).")
    relations = sum(map(is_relation_caption, read_captions(builder, shard)))
    if relations == 0:
        raise ValueError(f"config.data.relation_repeats={repeats} but no caption of {shard} states a relation "
                         f"({', '.join(RELATIONS)}); set relation_repeats=1 for this dataset.")

    def copies(ex: dict[str, tf.Tensor]) -> tf.data.Dataset:
        match = tf.strings.regex_full_match(ex["caption"], _RELATION_PATTERN)
        return tf.data.Dataset.from_tensors(ex).repeat(tf.where(match, tf.constant(repeats, tf.int64), tf.constant(1, tf.int64)))

    return base.flat_map(copies), per_host + (repeats - 1) * relations


def make_eval_iterator(
    builder: tfds.core.DatasetBuilder,
    *,
    batch_size: int,
    split: str = "validation",
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = False,
    center_crop: int | None = None,
    lowres_size: int | None = None,
) -> Iterator[Batch]:
    """One pass over this host's shard of ``split`` in stored order, no shuffling.

    Shards cover the split exactly (sizes differ by at most one), so the last batch may
    be smaller unless ``drop_remainder``. ``center_crop`` keeps the central square after
    the ``image_size`` resize; ``lowres_size`` adds ``"lowres"`` as a plain area
    downsample (no random degradation), so evaluation is reproducible.
    """
    image_size = _positive_or_none("image_size", image_size)
    center_crop = _positive_or_none("center_crop", center_crop)
    lowres_size = _positive_or_none("lowres_size", lowres_size)
    _check_sizes(builder, image_size, center_crop, lowres_size, "center_crop")
    total = _split_size(builder, split)
    start, end = _shard_bounds(total, process_index, process_count, even=False)
    ds = _read_split(builder, f"{split}[{start}:{end}]")
    decode = _decode_fn(builder, image_size, center_crop=center_crop, lowres_size=lowres_size)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    return _to_numpy(ds.with_options(_options()))


def describe(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """Name, image shape and split sizes, for logging at the start of a run."""
    return {
        "name": builder.info.full_name,
        "image_shape": tuple(builder.info.features["image"].shape),
        "splits": {k: v.num_examples for k, v in builder.info.splits.items()},
    }


def read_captions(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """All captions of `split` in file order, without decoding images (for the text cache)."""
    ds = _read_split(builder, split).map(lambda ex: ex["caption"])
    return [c.decode("utf-8") for c in ds.as_numpy_iterator()]
