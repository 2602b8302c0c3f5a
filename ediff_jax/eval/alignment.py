"""Does a generated image show what its ``ediff_shapes`` prompt asks for? Pixels only.

Each object of the prompt is matched to the largest blob of its colour (``segmentation``) and
checked for shape, then the prompt's region (3x3 grid of the bounding-box centre) or relation.
Extra objects are reported (``count_ok``) but not penalised in ``all_ok``, as in GenEval's
single- and two-object tasks: the question is whether what was asked for is there.

Relations: by default ``"A to the left of B"`` holds when A's centre is at least
``RELATION_THRESHOLD`` (15% of the side) left of B's, whatever the vertical offset; that is the
spec's condition for the relation being *true* along its axis. ``strict_relations=True`` also
requires it to be the axis the spec's captioner would choose (the one where the centres differ
most), i.e. that the dataset would caption the image with this very relation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ediff_jax.data.shapes import RELATION_THRESHOLD, ShapeObject, relation_of
from ediff_jax.eval.prompts import ExpectedObject, ParsedPrompt, parse_prompt
from ediff_jax.eval.segmentation import ANALYSIS_MAX_SIZE, DetectedObject, detect_objects


@dataclasses.dataclass(frozen=True)
class AlignmentResult:
    """Per-image verdict. ``region_ok`` / ``relation_ok`` are None when the prompt asks for none;
    ``matched[i]`` is the blob taken for the prompt's i-th object (None: colour absent)."""

    prompt: str
    parsed: ParsedPrompt
    detected: tuple[DetectedObject, ...]
    matched: tuple[DetectedObject | None, ...]
    color_ok: bool
    shape_ok: bool
    region_ok: bool | None
    relation_ok: bool | None
    count_ok: bool
    all_ok: bool


def _match(expected: Sequence[ExpectedObject], detected: Sequence[DetectedObject]) -> list[DetectedObject | None]:
    """The i-th expected object of a colour takes the i-th largest blob of that colour."""
    used: dict[str, int] = {}
    matched = []
    for obj in expected:
        candidates = [d for d in detected if d.color == obj.color]  # largest first
        index = used.get(obj.color, 0)
        matched.append(candidates[index] if index < len(candidates) else None)
        used[obj.color] = index + 1
    return matched


def relation_holds(a: DetectedObject, b: DetectedObject, relation: str, strict: bool = False) -> bool:
    """Whether ``relation`` is true of A relative to B (see the module docstring for ``strict``)."""
    if strict:
        as_scene_object = lambda d: ShapeObject(d.color, d.shape or "square", d.cx, d.cy, d.size)  # noqa: E731
        return relation_of(as_scene_object(a), as_scene_object(b)) == relation
    dx, dy = a.cx - b.cx, a.cy - b.cy
    offsets = {"to the left of": -dx, "to the right of": dx, "above": -dy, "below": dy}
    if relation not in offsets:
        raise ValueError(f"unknown relation {relation!r}; expected one of {sorted(offsets)}")
    return offsets[relation] >= RELATION_THRESHOLD


def score_alignment(
    image: np.ndarray,
    prompt: str,
    strict_relations: bool = False,
    max_size: int = ANALYSIS_MAX_SIZE,
) -> AlignmentResult:
    """Colour, shape, region and relation correctness of one uint8 image against its prompt."""
    parsed = parse_prompt(prompt)
    detected = tuple(detect_objects(image, max_size=max_size))
    matched = tuple(_match(parsed.objects, detected))
    color_ok = all(m is not None for m in matched)
    shape_ok = color_ok and all(m.shape == e.shape for m, e in zip(matched, parsed.objects))
    region_ok = None
    if parsed.region is not None:
        region_ok = matched[0] is not None and matched[0].region == parsed.region
    relation_ok = None
    if parsed.relation is not None:
        a, b = matched
        relation_ok = a is not None and b is not None and relation_holds(a, b, parsed.relation, strict_relations)
    all_ok = color_ok and shape_ok and region_ok is not False and relation_ok is not False
    return AlignmentResult(
        prompt=prompt,
        parsed=parsed,
        detected=detected,
        matched=matched,
        color_ok=color_ok,
        shape_ok=shape_ok,
        region_ok=region_ok,
        relation_ok=relation_ok,
        count_ok=len(detected) == len(parsed.objects),
        all_ok=all_ok,
    )


def score_alignment_batch(
    images: np.ndarray, prompts: Sequence[str], strict_relations: bool = False
) -> list[AlignmentResult]:
    """``score_alignment`` over uint8 images [N, H, W, 3] and their N prompts."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) != len(prompts):
        raise ValueError(
            f"need uint8 images [N, H, W, 3] and N prompts, got images {images.shape} and {len(prompts)} prompts"
        )
    return [score_alignment(img, p, strict_relations) for img, p in zip(images, prompts)]


def _mean(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if flags else math.nan


def aggregate_alignment(results: Sequence[AlignmentResult]) -> dict[str, float]:
    """Accuracies over a batch (NaN where the batch has no prompt of that kind).

    ``one_object_color_shape_accuracy``: one-object prompts with the right colour and shape
    (region ignored); ``two_object_relation_accuracy``: two-object prompts with a relation that
    are fully correct (both colours, both shapes, the relation); ``num_*`` are the denominators.
    Each ``*_strict_accuracy`` is the same count that also requires no extra object
    (``count_ok``): the lenient figure asks "is what was asked for there", the strict one adds
    "and nothing else".
    """
    one = [r for r in results if len(r.parsed.objects) == 1]
    two = [r for r in results if len(r.parsed.objects) == 2]
    with_region = [r for r in results if r.region_ok is not None]
    with_relation = [r for r in results if r.relation_ok is not None]
    two_with_relation = [r for r in two if r.relation_ok is not None]
    return {
        "all_ok_accuracy": _mean([r.all_ok for r in results]),
        "one_object_color_shape_accuracy": _mean([r.color_ok and r.shape_ok for r in one]),
        "one_object_color_shape_strict_accuracy": _mean([r.color_ok and r.shape_ok and r.count_ok for r in one]),
        "one_object_all_ok_accuracy": _mean([r.all_ok for r in one]),
        "two_object_color_shape_accuracy": _mean([r.color_ok and r.shape_ok for r in two]),
        "two_object_relation_accuracy": _mean([r.all_ok for r in two_with_relation]),
        "two_object_relation_strict_accuracy": _mean([r.all_ok and r.count_ok for r in two_with_relation]),
        "two_object_all_ok_accuracy": _mean([r.all_ok for r in two]),
        "color_accuracy": _mean([r.color_ok for r in results]),
        "shape_accuracy": _mean([r.shape_ok for r in results]),
        "region_accuracy": _mean([bool(r.region_ok) for r in with_region]),
        "relation_accuracy": _mean([bool(r.relation_ok) for r in with_relation]),
        "object_count_accuracy": _mean([r.count_ok for r in results]),
        "num_prompts": float(len(results)),
        "num_one_object": float(len(one)),
        "num_two_object": float(len(two)),
        "num_two_object_relation": float(len(two_with_relation)),
        "num_region": float(len(with_region)),
    }
