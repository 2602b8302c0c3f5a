"""Real photographs shipped inside the scikit-image and scikit-learn wheels.

Super-resolution has to be checked on real textures (fur, foliage, fabric, noise-like
star fields), which ``ediff_shapes`` does not have. These ten photos need no network:
every loader reads a file inside an installed wheel (scikit-image's ``eagle``, ``lily``
and ``skin`` are fetched with pooch on first use, so they are left out). The photos are
split once, by hand, into a training set and a disjoint held-out set of different
subjects, so that held-out numbers measure generalisation rather than memorisation.

The ``ediff_photos`` TFDS builder stores them at native size (variable shapes) with a
caption each; the input pipeline crops them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data  # deferred: only needed when a photo is actually read

        return getattr(skimage.data, name)()

    load.__doc__ = f"skimage.data.{name}()"
    return load


def _motorcycle() -> np.ndarray:
    """Left view of skimage's Middlebury stereo pair (the other two arrays are not photos)."""
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _sklearn(file_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        # Looked up by file name: the order of load_sample_images() is not documented.
        sample = load_sample_images()
        for path, image in zip(sample.filenames, sample.images):
            if Path(path).name == file_name:
                return image
        raise FileNotFoundError(
            f"{file_name} is not among sklearn's sample images "
            f"({[Path(p).name for p in sample.filenames]}); check the scikit-learn install."
        )

    load.__doc__ = f"sklearn.datasets.load_sample_images(): {file_name}"
    return load


PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "retina": _skimage("retina"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "motorcycle": _motorcycle,
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}

CAPTIONS: dict[str, str] = {
    "astronaut": "a photo of an astronaut in an orange suit in front of a flag and a space shuttle model",
    "coffee": "a photo of a cup of coffee on a red saucer on a wooden table",
    "chelsea": "a close-up photo of a tabby cat with green eyes",
    "rocket": "a photo of a rocket on a launch pad at night between lightning towers",
    "retina": "a fundus photo of a human retina with blood vessels",
    "hubble_deep_field": "a telescope photo of many small galaxies in deep space",
    "immunohistochemistry": "a microscope photo of stained tissue in brown and blue",
    "motorcycle": "a photo of a red motorcycle parked in a garage",
    "china": "a photo of a chinese pagoda on a hill above a lake",
    "flower": "a close-up photo of an orange dahlia flower on a dark green background",
}

# Held-out: an animal, a still life and a flower, none of which resembles a training
# photo (no other cat, cup or plant close-up), so held-out scores measure generalisation.
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "flower")
TRAIN_PHOTOS: tuple[str, ...] = tuple(name for name in PHOTOS if name not in HELDOUT_PHOTOS)


def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` as uint8 [H, W, 3] at native size."""
    if name not in PHOTOS:
        raise ValueError(f"Unknown photo {name!r}; available photos: {sorted(PHOTOS)}.")
    image = np.asarray(PHOTOS[name]())
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"photo {name!r} loaded as {image.dtype} {image.shape}, expected uint8 HxWx3; "
            f"the installed scikit-image/scikit-learn changed its sample data."
        )
    return image


def photo_caption(name: str) -> str:
    """The short caption of photo ``name``."""
    if name not in CAPTIONS:
        raise ValueError(f"Unknown photo {name!r}; available photos: {sorted(CAPTIONS)}.")
    return CAPTIONS[name]


_DESCRIPTION = """\
Ten real photographs from the scikit-image and scikit-learn wheels at native size, each
with a short caption. `train` holds seven of them, `validation` three disjoint held-out
photos (a cat, a cup of coffee, a flower). For super-resolution smoke tests and demos.
"""

SPLIT_PHOTOS: dict[str, tuple[str, ...]] = {"train": TRAIN_PHOTOS, "validation": HELDOUT_PHOTOS}


class EdiffPhotos(tfds.core.GeneratorBasedBuilder):
    """The ``ediff_photos`` dataset (registered under that name on import)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Ten wheel-shipped photos; 7 train, 3 held-out validation."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    # Native, per-photo sizes; PNG keeps the loaded pixels exactly.
                    "image": tfds.features.Image(
                        shape=(None, None, 3), dtype=np.uint8, encoding_format="png"
                    ),
                    "caption": tfds.features.Text(),
                    "name": tfds.features.Text(),
                }
            ),
            supervised_keys=("caption", "image"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # everything is read from installed wheels
        return {split: self._generate_examples(names) for split, names in SPLIT_PHOTOS.items()}

    def _generate_examples(self, names: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
        for name in names:
            yield name, {"image": load_photo(name), "caption": photo_caption(name), "name": name}
