"""Captioned image folders (users' own data) as TFDS datasets.

A folder of ``.png/.jpg/.jpeg/.webp`` images (subfolders allowed) plus one captions file:

* ``captions.tsv``: ``relative/path.png<TAB>caption`` per line, or
* ``captions.jsonl``: ``{"file": "relative/path.png", "caption": "..."}`` per line.

``make_image_folder_builder(folder, data_dir)`` checks the folder up front (missing
files, uncaptioned images, malformed lines all fail with the file and the fix named) and
returns a builder whose shards live in ``data_dir/ediff_image_folder/<config>/``. The
config name is the folder's name plus a fingerprint of its resolved path, captions file,
image list (names, sizes, modification times) and validation fraction: two folders never
share shards, and editing a folder gives a fresh dataset instead of silently stale data.

Images are decoded once with Pillow (EXIF rotation applied; grey, palette and RGBA
converted to RGB, transparency composited onto white) and stored losslessly as PNG at
native size. The folder itself is only ever read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

CAPTION_FILES: tuple[str, ...] = ("captions.tsv", "captions.jsonl")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_VALIDATION_FRACTION = 0.05
_SHOWN = 10  # how many offending files an error message lists


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One image of the folder: its path relative to the folder (posix) and caption."""

    file: str
    caption: str


# --------------------------------------------------------------------------- captions


def find_captions_file(folder: Path) -> Path:
    """The folder's single captions file; errors say which names are accepted."""
    present = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if not present:
        raise ValueError(
            f"No captions file in {folder}: add captions.tsv (one 'file<TAB>caption' line "
            f"per image) or captions.jsonl (one {{\"file\": ..., \"caption\": ...}} per line)."
        )
    if len(present) > 1:
        raise ValueError(
            f"{folder} has both {present[0].name} and {present[1].name}; keep exactly one "
            f"captions file so there is no doubt which captions are used."
        )
    return present[0]


def _parse_tsv_line(line: str, where: str) -> tuple[str, str]:
    file, tab, caption = line.partition("\t")
    if not tab:
        raise ValueError(
            f"{where}: expected 'file<TAB>caption', found no tab in {line!r}. "
            f"Separate the file name and the caption with a single tab character."
        )
    return file.strip(), caption.strip()


def _parse_jsonl_line(line: str, where: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}): {line!r}.") from err
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) \
            or not isinstance(record.get("caption"), str):
        raise ValueError(
            f"{where}: expected an object with string fields \"file\" and \"caption\", "
            f"got {line!r}."
        )
    return record["file"].strip(), record["caption"].strip()


def _normalise_name(file: str, where: str) -> str:
    """Relative posix path inside the folder; rejects paths that would leave it."""
    path = PurePosixPath(file.replace("\\", "/"))
    if not file or path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"{where}: file name {file!r} must be a path relative to the folder "
            f"(e.g. 'cat.png' or 'sub/cat.png'), without '..'."
        )
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{where}: {file!r} is not a supported image type; supported extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}."
        )
    return str(path)


def read_captions_file(path: Path) -> dict[str, str]:
    """``{relative file: caption}`` from a captions.tsv or captions.jsonl file."""
    parse = _parse_jsonl_line if path.suffix == ".jsonl" else _parse_tsv_line
    captions: dict[str, str] = {}
    text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        file, caption = parse(line, where)
        name = _normalise_name(file, where)
        if not caption:
            raise ValueError(f"{where}: empty caption for {file!r}; write a caption or drop the line.")
        if name in captions:
            raise ValueError(f"{where}: {name!r} is captioned twice; keep one line per image.")
        captions[name] = caption
    if not captions:
        raise ValueError(f"{path} has no captions; add one line per image.")
    return captions


# --------------------------------------------------------------------------- folder scan


def list_images(folder: Path) -> list[str]:
    """Supported image files under ``folder`` as sorted relative posix paths.

    Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``) are ignored.
    """
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(relative.as_posix())
    return sorted(found)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{shown}{more}"


def scan_folder(folder: str | Path) -> tuple[Path, list[CaptionedImage]]:
    """Resolve ``folder`` and pair every image with its caption, checking both ways.

    Returns the resolved folder and the images sorted by file name.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(
            f"Image folder {folder!r} (resolved: {root}) does not exist or is not a directory; "
            f"point data.folder at a folder of images with a captions file."
        )
    captions_path = find_captions_file(root)
    captions = read_captions_file(captions_path)
    images = set(list_images(root))
    missing = sorted(name for name in captions if name not in images)
    if missing:
        raise ValueError(
            f"{captions_path} names {len(missing)} file(s) that are not in {root}: "
            f"{_listing(missing)}. Fix the file names or remove those lines."
        )
    uncaptioned = sorted(images - set(captions))
    if uncaptioned:
        raise ValueError(
            f"{len(uncaptioned)} image(s) in {root} have no caption in {captions_path.name}: "
            f"{_listing(uncaptioned)}. Add a line for each, or move them out of the folder."
        )
    return root, [CaptionedImage(name, captions[name]) for name in sorted(captions)]


def split_of(file: str, validation_fraction: float) -> str:
    """``"validation"`` for a stable ~``validation_fraction`` of file names, else ``"train"``.

    A hash of the name (not the listing order) decides, so adding images never moves
    existing ones between splits.
    """
    bucket = int.from_bytes(hashlib.sha256(file.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if bucket < validation_fraction else "train"


def folder_fingerprint(root: Path, images: list[CaptionedImage], validation_fraction: float) -> str:
    """Hex digest of everything the prepared shards depend on (read with ``stat``, cheap)."""
    digest = hashlib.sha256()
    digest.update(str(root).encode("utf-8"))
    digest.update(repr(float(validation_fraction)).encode("utf-8"))
    digest.update(find_captions_file(root).read_bytes())
    for image in images:
        stat = (root / image.file).stat()
        digest.update(f"\0{image.file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8"))
    return digest.hexdigest()


def config_name(root: Path, fingerprint: str) -> str:
    """``<folder name>_<12 hex>``: readable in ``data_dir`` listings, unique per content."""
    slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_")[:40] or "folder"
    return f"{slug}_{fingerprint[:12]}"


# --------------------------------------------------------------------------- decoding


def _to_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from any common Pillow mode; transparency goes onto white."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNGs
        grey = (np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    has_alpha = "A" in image.mode or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(path: Path) -> np.ndarray:
    """Decode one image to uint8 [H, W, 3], upright per its EXIF orientation."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            return _to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's "cannot identify/truncated"
        raise ValueError(
            f"Cannot read image {path}: {err}. Re-save it as PNG or JPEG, or remove it and "
            f"its caption line."
        ) from err


# --------------------------------------------------------------------------- builder

_DESCRIPTION = """\
A user's captioned image folder (see ediff_jax/data/image_folder.py): images at native
size, stored as PNG, with their captions and file names. The validation split is a
stable hash-based fraction of the file names.
"""


@dataclasses.dataclass(eq=False)
class EdiffImageFolderConfig(tfds.core.BuilderConfig):
    """The resolved folder and the fraction of images held out for validation."""

    folder: str = ""
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION


class EdiffImageFolder(tfds.core.GeneratorBasedBuilder):
    """``ediff_image_folder``: built with ``make_image_folder_builder``, never by name alone."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Captioned image folders (captions.tsv or captions.jsonl)."}

    @property
    def folder_config(self) -> EdiffImageFolderConfig:
        config = self.builder_config
        if not isinstance(config, EdiffImageFolderConfig) or not config.folder:
            raise ValueError(
                "ediff_image_folder needs a folder: use "
                "get_dataset_builder('image_folder', data_dir, folder=...) or "
                "make_image_folder_builder(folder, data_dir)."
            )
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(None, None, 3), dtype=np.uint8, encoding_format="png"
                    ),
                    "caption": tfds.features.Text(),
                    "file": tfds.features.Text(),
                }
            ),
            supervised_keys=("caption", "image"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # local files only
        config = self.folder_config
        root, images = scan_folder(config.folder)
        fingerprint = folder_fingerprint(root, images, config.validation_fraction)
        if config_name(root, fingerprint) != config.name:
            raise ValueError(
                f"{root} changed after its builder was made (config {config.name}); "
                f"call get_dataset_builder / make_image_folder_builder again to pick it up."
            )
        by_split: dict[str, list[CaptionedImage]] = {"train": [], "validation": []}
        for image in images:
            by_split[split_of(image.file, config.validation_fraction)].append(image)
        if not by_split["train"]:
            raise ValueError(
                f"All {len(images)} images of {root} fell into the validation split; "
                f"lower validation_fraction (now {config.validation_fraction}) or add images."
            )
        # TFDS cannot write an empty split: a tiny folder may have no validation split.
        return {
            split: self._generate_examples(root, items) for split, items in by_split.items() if items
        }

    def _generate_examples(
        self, root: Path, images: list[CaptionedImage]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for image in images:
            pixels = load_rgb(root / image.file)
            yield image.file, {"image": pixels, "caption": image.caption, "file": image.file}


def make_image_folder_builder(
    folder: str | Path,
    data_dir: str | None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> EdiffImageFolder:
    """A builder for ``folder`` (checked now; prepared by ``pipeline.prepare``).

    ``validation_fraction`` in [0, 1): the stable share of images held out. When no image
    falls into it (fraction 0, or a tiny folder) the dataset has only a ``train`` split.
    """
    if isinstance(validation_fraction, bool) or not 0.0 <= float(validation_fraction) < 1.0:
        raise ValueError(
            f"validation_fraction must be in [0, 1), got {validation_fraction!r}."
        )
    root, images = scan_folder(folder)
    fingerprint = folder_fingerprint(root, images, float(validation_fraction))
    config = EdiffImageFolderConfig(
        name=config_name(root, fingerprint),
        version=tfds.core.Version("1.0.0"),
        description=f"{len(images)} captioned images from {root}",
        folder=str(root),
        validation_fraction=float(validation_fraction),
    )
    return EdiffImageFolder(config=config, data_dir=data_dir)
