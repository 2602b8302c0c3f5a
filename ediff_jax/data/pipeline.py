"""tf.data input pipeline: TFDS builder -> sharded, deterministic numpy batches.

Training batches are a pure function of ``(seed, step, process_index, process_count)``:
the stream is a sequence of epochs, each epoch a shuffle of this host's shard seeded by
``(seed, process_index, epoch)``. Resuming at ``start_step`` therefore needs no iterator
checkpoint: it starts at the right epoch and skips the examples already consumed in it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ediff_jax.data import shapes_tfds

Batch = dict[str, np.ndarray]

SHAPES_NAME = "ediff_shapes"
_MAX_EPOCHS = 2**62  # "forever"; a range rather than repeat() keeps the epoch number


def shapes_config_names() -> list[str]:
    """Registered ``ediff_shapes`` configs, as full dataset names."""
    return [f"{SHAPES_NAME}/{c.name}" for c in shapes_tfds.EdiffShapes.BUILDER_CONFIGS]


def get_dataset_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Builder for ``"ediff_shapes/64"``-style names, or any TFDS name via ``tfds.builder``.

    Raises a ValueError naming the unknown dataset and listing the ``ediff_shapes``
    configs, since a typo in a config file should say what would have worked.
    """
    available = ", ".join(shapes_config_names())
    dataset, _, rest = name.partition("/")
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
            f"Built-in {SHAPES_NAME} configs: {available}."
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


def _decode_fn(
    builder: tfds.core.DatasetBuilder, image_size: int | None
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Decode PNG, resize if asked (area when shrinking), scale to float32 [-1, 1]."""
    image_feature = builder.info.features["image"]
    native = image_feature.shape[0]

    def decode(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = tf.cast(image_feature.decode_example(ex["image"]), tf.float32)
        if image_size is not None and image_size != native:
            method = "area" if image_size < native else "bicubic"
            image = tf.image.resize(image, (image_size, image_size), method=method, antialias=True)
        image = tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)
        # No random horizontal flip: it would turn "to the left of" into a false
        # caption (and swap left/right regions), poisoning the spatial conditioning.
        return {"image": image, "caption": ex["caption"]}

    return decode


def _to_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    for batch in ds.as_numpy_iterator():
        captions = np.array([c.decode("utf-8") for c in batch["caption"]], dtype=object)
        yield {"image": batch["image"], "caption": captions}


def _epoch_seed(seed: int, process_index: int, epoch: tf.Tensor) -> tf.Tensor:
    """A distinct, reproducible int64 shuffle seed per (seed, host, epoch)."""
    base = (int(seed) * 1_000_003 + int(process_index) * 7_919) % (2**31)
    return tf.constant(base, tf.int64) * 65_537 + epoch + 1


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
) -> Iterator[Batch]:
    """Endless ``{"image": float32 [B,H,W,3] in [-1,1], "caption": str [B]}`` batches.

    ``batch_size`` is per host. Each host reads a disjoint, equal-sized contiguous shard
    of ``split``. Batches may straddle epochs (the stream is flat), which is what makes
    ``start_step=k`` equal to skipping ``k`` batches from step 0. Shuffles use op-level
    seeds only, so the order is reproducible across runs as long as nobody changes the
    TF global seed (``tf.random.set_seed``), which TF mixes into every op seed.
    """
    if batch_size <= 0 or start_step < 0:
        raise ValueError(f"need batch_size > 0 and start_step >= 0, got {batch_size}, {start_step}")
    total = builder.info.splits[split].num_examples
    start, end = _shard_bounds(total, process_index, process_count, even=True)
    per_host = end - start
    base = _read_split(builder, f"{split}[{start}:{end}]")
    buffer = max(1, min(shuffle_buffer, per_host))

    consumed = start_step * batch_size
    first_epoch, offset = divmod(consumed, per_host)

    def epoch_ds(epoch: tf.Tensor) -> tf.data.Dataset:
        shuffled = base.shuffle(
            buffer, seed=_epoch_seed(seed, process_index, epoch), reshuffle_each_iteration=False
        )
        skip = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64))
        return shuffled.skip(skip)

    ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch_ds)
    ds = ds.map(_decode_fn(builder, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _to_numpy(ds.with_options(_options()))


def make_eval_iterator(
    builder: tfds.core.DatasetBuilder,
    *,
    batch_size: int,
    split: str = "validation",
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
    """One pass over this host's shard of ``split`` in stored order, no shuffling.

    Shards cover the split exactly (sizes differ by at most one), so the last batch may
    be smaller unless ``drop_remainder``.
    """
    total = builder.info.splits[split].num_examples
    start, end = _shard_bounds(total, process_index, process_count, even=False)
    ds = _read_split(builder, f"{split}[{start}:{end}]")
    ds = ds.map(_decode_fn(builder, image_size), num_parallel_calls=tf.data.AUTOTUNE)
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
