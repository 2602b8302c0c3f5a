"""Find the coloured shapes in an ``ediff_shapes``-style image from its pixels alone.

Why mixing lines rather than nearest colour: an anti-aliased or blurred edge pixel is a mix
``background + alpha * (colour - background)``, and such mixes are often *nearer to another
palette colour* (a half-covered blue pixel is nearest to purple), which would ring every object
with a fringe of a wrong colour. Projecting each pixel onto the background->colour line of every
palette colour instead gives the colour whose line it lies on and how much of the pixel the
object covers (``alpha``), which is exactly how the dataset renders and how blur mixes.

Shapes are recognised by fitting the spec's own templates: from the blob's soft area and
centroid, each hypothesis (circle, square, triangle) has one size and position; it is rendered
with ``ediff_jax.data.shapes.render_scene`` and the best soft IoU wins. The fit also yields the
bounding-box centre the spec uses for regions and relations (for a triangle that is not the
centroid, which lies a sixth of the side lower).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage

from ediff_jax.data.shapes import (
    BACKGROUND,
    COLORS,
    PALETTE,
    SHAPES,
    Scene,
    ShapeObject,
    region_of,
    render_scene,
)

# Thresholds, in the units noted; generous enough for blurred, noisy samples of a model, tight
# enough that a colour between two palette entries (or grey, black, white) is not an object.
COLOR_TOLERANCE = 60.0  # max RGB distance (0..441) of a pixel from a background->colour line
CORE_ALPHA = 0.5  # pixels covered at least this much seed the connected components
SOFT_ALPHA_FLOOR = 0.1  # lighter mixes are treated as background (noise would add up otherwise)
FRINGE_PIXELS = 2  # a component's anti-aliased / blurred rim: its core dilated this much
MIN_AREA_FRACTION = 0.005  # blobs smaller than this fraction of the canvas are noise (the
# smallest object of the dataset, a 0.22-wide triangle, covers 0.024)
MIN_FIT_IOU = 0.5  # below this soft IoU no shape template describes the blob: shape is None
ANALYSIS_MAX_SIZE = 128  # larger images are box-downsampled (mixing stays linear) to this side

_BACKGROUND = np.asarray(BACKGROUND, np.float64)
_DIRECTIONS = np.asarray([PALETTE[c] for c in COLORS], np.float64) - _BACKGROUND  # [K, 3]
_AREA_FACTOR = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bbox side^2
assert set(_AREA_FACTOR) == set(SHAPES), "update _AREA_FACTOR when the spec adds a shape"


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """A blob of one palette colour: the best-fitting shape and its normalised bounding box.

    ``shape`` is None when no template fits (soft IoU below ``MIN_FIT_IOU``); ``area`` is the
    soft pixel coverage as a fraction of the canvas.
    """

    color: str
    shape: str | None
    cx: float
    cy: float
    size: float
    area: float
    fit_iou: float

    @property
    def region(self) -> str:
        return region_of(self.cx, self.cy)


def check_image(image: np.ndarray) -> np.ndarray:
    """A square uint8 RGB image, or a ValueError that says how to convert it."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}; "
            "convert [-1, 1] floats with ediff_jax.images.to_uint8"
        )
    if image.shape[0] != image.shape[1] or image.shape[0] < 8:
        raise ValueError(
            f"ediff_shapes scenes are square canvases of side >= 8, got {image.shape[:2]}; "
            "score each square view separately"
        )
    return image


def color_mixtures(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour: coverage ``alpha`` [H, W, K] in [0, 1] and the RGB
    distance [H, W, K] of the pixel from that colour's background->colour mixing line."""
    offset = image.astype(np.float64) - _BACKGROUND
    alpha = offset @ _DIRECTIONS.T / np.sum(_DIRECTIONS**2, axis=1)
    alpha = np.clip(alpha, 0.0, 1.0)
    residual = offset[..., None, :] - alpha[..., None] * _DIRECTIONS
    return alpha, np.linalg.norm(residual, axis=-1)


def _analysis_image(image: np.ndarray, max_size: int) -> np.ndarray:
    if image.shape[0] <= max_size:
        return image
    pil_image = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil_image.resize((max_size, max_size), Image.Resampling.BOX))


def _template_alpha(shape: str, color: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Coverage [size, size] of one spec shape, read back from the dataset's own renderer."""
    scene = Scene(objects=(ShapeObject(color=color, shape=shape, cx=cx, cy=cy, size=side),))
    offset = render_scene(scene, size).astype(np.float64) - _BACKGROUND
    direction = _DIRECTIONS[COLORS.index(color)]
    return np.clip(offset @ direction / (direction @ direction), 0.0, 1.0)


def _fit_shape(blob: np.ndarray, color: str) -> DetectedObject:
    """Best spec template for a soft blob mask [size, size] (coverage in [0, 1])."""
    size = blob.shape[0]
    area = float(blob.sum())
    rows, cols = np.indices(blob.shape)
    centroid_x = float(((cols + 0.5) * blob).sum() / area) / size
    centroid_y = float(((rows + 0.5) * blob).sum() / area) / size
    best: DetectedObject | None = None
    for shape in SHAPES:
        side = float(np.sqrt(area / _AREA_FACTOR[shape])) / size
        # The centroid of the upward isosceles triangle lies 2/3 of the height below the apex,
        # i.e. side/6 below its bounding-box centre; discs and squares are centred.
        cy = centroid_y - side / 6 if shape == "triangle" else centroid_y
        template = _template_alpha(shape, color, centroid_x, cy, side, size)
        iou = float(np.minimum(blob, template).sum() / np.maximum(blob, template).sum())
        if best is None or iou > best.fit_iou:
            best = DetectedObject(color, shape, centroid_x, cy, side, area / size**2, iou)
    assert best is not None
    if best.fit_iou < MIN_FIT_IOU:
        return dataclasses.replace(best, shape=None)
    return best


def detect_objects(image: np.ndarray, max_size: int = ANALYSIS_MAX_SIZE) -> list[DetectedObject]:
    """Every palette-coloured blob of ``image`` (uint8, square), largest first."""
    image = _analysis_image(check_image(image), max_size)
    size = image.shape[0]
    alpha, residual = color_mixtures(image)
    nearest = np.argmin(residual, axis=-1)
    nearest_alpha = np.take_along_axis(alpha, nearest[..., None], axis=-1)[..., 0]
    nearest_residual = np.take_along_axis(residual, nearest[..., None], axis=-1)[..., 0]
    on_a_line = nearest_residual <= COLOR_TOLERANCE
    core = on_a_line & (nearest_alpha >= CORE_ALPHA)
    soft = np.where(on_a_line & (nearest_alpha >= SOFT_ALPHA_FLOOR), nearest_alpha, 0.0)
    fringe = 2 * FRINGE_PIXELS + 1
    detected = []
    for k, color in enumerate(COLORS):
        labels, count = ndimage.label(core & (nearest == k), structure=np.ones((3, 3), bool))
        if count == 0:
            continue
        grown = ndimage.grey_dilation(labels, size=(fringe, fringe))
        color_soft = np.where(nearest == k, soft, 0.0)
        for label in range(1, count + 1):
            blob = np.where(grown == label, color_soft, 0.0)
            if blob.sum() < MIN_AREA_FRACTION * size * size:
                continue
            detected.append(_fit_shape(blob, color))
    return sorted(detected, key=lambda obj: -obj.area)
