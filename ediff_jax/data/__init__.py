"""Data: the ``ediff_shapes`` dataset, real photos, captioned image folders, SR
degradations and the tf.data input pipeline.

Scene logic (``shapes``) is numpy-only and imported eagerly; the TFDS builders, the
degradations and the pipeline import TensorFlow, so they load lazily on first attribute
access. That keeps ``from ediff_jax.data import shapes`` (used to score generated images)
free of TF.
"""

from __future__ import annotations

import importlib
from typing import Any

from ediff_jax.data.shapes import (
    BACKGROUND,
    COLORS,
    PALETTE,
    REGIONS,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    caption_scene,
    generate_example,
    region_of,
    relation_of,
    render_scene,
    sample_scene,
)

_LAZY = {
    "EdiffShapes": "ediff_jax.data.shapes_tfds",
    "EdiffShapesConfig": "ediff_jax.data.shapes_tfds",
    "builder_config_name": "ediff_jax.data.shapes_tfds",
    "make_builder": "ediff_jax.data.shapes_tfds",
    "get_dataset_builder": "ediff_jax.data.pipeline",
    "make_train_iterator": "ediff_jax.data.pipeline",
    "make_eval_iterator": "ediff_jax.data.pipeline",
    "prepare": "ediff_jax.data.pipeline",
    "shapes_config_names": "ediff_jax.data.pipeline",
    "describe": "ediff_jax.data.pipeline",
    "DEFAULT_DEGRADATION": "ediff_jax.data.degradations",
    "RESIZE_METHODS": "ediff_jax.data.degradations",
    "degrade": "ediff_jax.data.degradations",
    "validate_degradation": "ediff_jax.data.degradations",
    "EdiffPhotos": "ediff_jax.data.photos",
    "PHOTOS": "ediff_jax.data.photos",
    "TRAIN_PHOTOS": "ediff_jax.data.photos",
    "HELDOUT_PHOTOS": "ediff_jax.data.photos",
    "load_photo": "ediff_jax.data.photos",
    "photo_caption": "ediff_jax.data.photos",
    "EdiffImageFolder": "ediff_jax.data.image_folder",
    "EdiffImageFolderConfig": "ediff_jax.data.image_folder",
    "make_image_folder_builder": "ediff_jax.data.image_folder",
    "scan_folder": "ediff_jax.data.image_folder",
}

__all__ = [
    "BACKGROUND",
    "COLORS",
    "PALETTE",
    "REGIONS",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "ShapeObject",
    "caption_scene",
    "generate_example",
    "region_of",
    "relation_of",
    "render_scene",
    "sample_scene",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
