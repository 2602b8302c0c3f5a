"""TFDS builder for ``ediff_shapes``: the procedurally generated default dataset.

Nothing is downloaded: ``download_and_prepare`` renders the scenes locally. Each example
is generated from its own rng seeded by ``(seed, split, index)``, so the data depend only
on the config (size, split sizes, seed), never on generation order, and the generator
could be parallelised without changing a byte.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from ediff_jax.data import shapes

_DESCRIPTION = """\
Procedurally generated captioned scenes: one or two coloured circles, squares or
triangles on a light grey background, with captions naming colour, shape, 3x3 region or
pairwise spatial relation. Every image comes from a known vector scene (given in
`objects`), so generated images can be scored exactly. Specification: shapes.md.
"""

SPLITS: tuple[str, ...] = ("train", "validation")


@dataclasses.dataclass(eq=False)
class EdiffShapesConfig(tfds.core.BuilderConfig):
    """Image side in pixels, number of examples per split, and the generation seed."""

    size: int = 64
    num_train: int = 20_000
    num_validation: int = 1_000
    seed: int = 0


# Split sizes: 32/64 are cheap (< 1 ms per example); 256 and 1024 are for quality runs
# and are sized so that preparing them stays within minutes on a laptop CPU (1024 costs
# ~30 ms to render plus PNG encoding per example).
_DEFAULT_SPLITS: dict[int, tuple[int, int]] = {
    32: (20_000, 1_000),
    64: (20_000, 1_000),
    256: (4_000, 200),
    1024: (500, 50),
}


def builder_config_name(size: int) -> str:
    """Name of the registered config for ``size`` pixels (``ediff_shapes/<name>``)."""
    return str(size)


def _default_config(size: int) -> EdiffShapesConfig:
    num_train, num_validation = _DEFAULT_SPLITS[size]
    return EdiffShapesConfig(
        name=builder_config_name(size),
        version=tfds.core.Version("1.0.0"),
        description=(
            f"{size}x{size} images; train {num_train}, validation {num_validation} examples."
        ),
        size=size,
        num_train=num_train,
        num_validation=num_validation,
    )


def split_seed(split: str) -> int:
    """Stable per-split integer mixed into the example seeds (crc32, not Python's hash)."""
    return zlib.crc32(split.encode("utf-8"))


class EdiffShapes(tfds.core.GeneratorBasedBuilder):
    """The ``ediff_shapes`` dataset (registered under that name)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: shapes.md scenes, train and validation."}
    BUILDER_CONFIGS = [_default_config(s) for s in sorted(_DEFAULT_SPLITS)]
    DEFAULT_BUILDER_CONFIG_NAME = builder_config_name(64)

    @property
    def shapes_config(self) -> EdiffShapesConfig:
        config = self.builder_config
        assert isinstance(config, EdiffShapesConfig), config
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.shapes_config.size
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    # PNG: lossless, so stored pixels are exactly the rendered ones.
                    "image": tfds.features.Image(
                        shape=(size, size, 3), dtype=np.uint8, encoding_format="png"
                    ),
                    "caption": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "color": tfds.features.ClassLabel(names=list(shapes.COLORS)),
                            "shape": tfds.features.ClassLabel(names=list(shapes.SHAPES)),
                            "bbox": tfds.features.BBoxFeature(),
                        }
                    ),
                }
            ),
            supervised_keys=("caption", "image"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # everything is generated locally
        config = self.shapes_config
        counts = {"train": config.num_train, "validation": config.num_validation}
        return {split: self._generate_examples(split, counts[split]) for split in SPLITS}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, Any]]:
        config = self.shapes_config
        split_id = split_seed(split)
        for index in range(num_examples):
            yield index, shapes.generate_example((config.seed, split_id, index), config.size)


def make_builder(
    size: int,
    num_train: int,
    num_validation: int,
    data_dir: str | None,
    seed: int = 0,
) -> EdiffShapes:
    """A builder with a custom config (tests, experiments); not prepared yet.

    The config name encodes every parameter, so different custom configs never share a
    directory under ``data_dir`` and never clash with the registered ones.
    """
    config = EdiffShapesConfig(
        name=f"custom_s{size}_t{num_train}_v{num_validation}_seed{seed}",
        version=tfds.core.Version("1.0.0"),
        description=f"custom: {size}px, train {num_train}, validation {num_validation}",
        size=size,
        num_train=num_train,
        num_validation=num_validation,
        seed=seed,
    )
    return EdiffShapes(config=config, data_dir=data_dir)
