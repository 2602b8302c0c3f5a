"""Captions of ``ediff_shapes`` scenes for encoder pretraining: true captions, truth, hard negatives.

Why: contrastive training only teaches binding and word order if the negatives differ from the
truth in exactly those respects (colours swapped between the objects, shapes swapped, the relation
reversed, A and B exchanged, the region changed). Some of those edits leave a caption true ("A and
B" with A and B exchanged; a colour swap between two circles), so every negative is checked
against the scene, and the contrastive loss also needs to know which *other* captions of a batch
happen to be true of an image. Both come from ``truth_matrix``, a vectorised reading of the spec's
grammar (shapes.md), lenient about relations: "A above B" is true whenever A's centre is at least
``RELATION_THRESHOLD`` above B's, so nothing that could be read as true is ever used as a negative.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from ediff_jax.data.shapes import (
    COLORS,
    REGIONS,
    RELATION_THRESHOLD,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    relation_of,
    render_scene,
    sample_scene,
)
from ediff_jax.eval.prompts import parse_prompt

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
NEGATIVE_KINDS = ("color_swap", "shape_swap", "relation_reversed", "objects_exchanged", "region_changed", "attribute_changed")
_NONE = -1


def _object_text(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def true_captions(scene: Scene) -> list[str]:
    """Every caption the spec's templates allow for this scene, with either object first.

    The dataset's captioner names object A first; training on both orders teaches the encoder
    that "A and B" means "B and A" and "A left of B" means "B right of A".
    """
    objs = scene.objects
    if len(objs) == 1:
        (o,) = objs
        return [_object_text(o.color, o.shape), f"{_object_text(o.color, o.shape)} in the {o.region}"]
    captions = []
    for a, b in (objs, objs[::-1]):
        pair = (_object_text(a.color, a.shape), _object_text(b.color, b.shape))
        captions.append(f"{pair[0]} and {pair[1]}")
        relation = relation_of(a, b)
        if relation is not None:
            captions.append(f"{pair[0]} {relation} {pair[1]}")
    return captions


# ------------------------------------------------------------------------------------------------
# Integer codes: one row per caption / scene, so truth over a whole batch is a few array ops.


@dataclasses.dataclass(frozen=True)
class CaptionCode:
    """``n`` objects; colour/shape ids of the first and second (-1: none); region or relation id."""

    n: int
    c1: int
    s1: int
    c2: int
    s2: int
    region: int
    relation: int

    def as_row(self) -> tuple[int, ...]:
        return (self.n, self.c1, self.s1, self.c2, self.s2, self.region, self.relation)


@functools.lru_cache(maxsize=None)
def caption_code(caption: str) -> CaptionCode:
    """The caption's parse as ids (the caption language is small: the cache holds all of it)."""
    parsed = parse_prompt(caption)
    (a, *rest) = parsed.objects
    b = rest[0] if rest else None
    return CaptionCode(
        n=len(parsed.objects),
        c1=COLORS.index(a.color),
        s1=SHAPES.index(a.shape),
        c2=COLORS.index(b.color) if b else _NONE,
        s2=SHAPES.index(b.shape) if b else _NONE,
        region=REGIONS.index(parsed.region) if parsed.region else _NONE,
        relation=RELATIONS.index(parsed.relation) if parsed.relation else _NONE,
    )


def caption_codes(captions: Sequence[str]) -> np.ndarray:
    """int32 [M, 7] rows of ``CaptionCode``."""
    return np.asarray([caption_code(c).as_row() for c in captions], np.int32).reshape(-1, 7)


def _relation_holds(a: ShapeObject, b: ShapeObject) -> list[bool]:
    """For each relation (RELATIONS order): is it true of A relative to B, leniently?"""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    return [-dx >= RELATION_THRESHOLD, dx >= RELATION_THRESHOLD, -dy >= RELATION_THRESHOLD, dy >= RELATION_THRESHOLD]


def scene_codes(scenes: Sequence[Scene]) -> np.ndarray:
    """int32 [N, 14]: n, colour/shape of objects 0 and 1, region of object 0, and the four
    relations of 0 w.r.t. 1 and of 1 w.r.t. 0 (lenient truth)."""
    rows = []
    for scene in scenes:
        o = scene.objects
        first = [COLORS.index(o[0].color), SHAPES.index(o[0].shape)]
        if len(o) == 1:
            rows.append([1, *first, _NONE, _NONE, REGIONS.index(o[0].region), *([0] * 8)])
        else:
            second = [COLORS.index(o[1].color), SHAPES.index(o[1].shape)]
            rows.append([2, *first, *second, _NONE, *_relation_holds(o[0], o[1]), *_relation_holds(o[1], o[0])])
    return np.asarray(rows, np.int32).reshape(-1, 14)


def truth_matrix(captions: np.ndarray, scenes: np.ndarray) -> np.ndarray:
    """bool [N scenes, M captions]: does caption m describe scene n (no missing or extra object)?"""
    c = captions[None, :, :]
    s = scenes[:, None, :]
    same_count = c[..., 0] == s[..., 0]
    # one object: colour, shape, and the region when the caption names one
    one = (c[..., 1] == s[..., 1]) & (c[..., 2] == s[..., 2]) & ((c[..., 5] == _NONE) | (c[..., 5] == s[..., 5]))
    # two objects, read in either order; the relation is looked up for the order that matched
    forward = (c[..., 1] == s[..., 1]) & (c[..., 2] == s[..., 2]) & (c[..., 3] == s[..., 3]) & (c[..., 4] == s[..., 4])
    backward = (c[..., 1] == s[..., 3]) & (c[..., 2] == s[..., 4]) & (c[..., 3] == s[..., 1]) & (c[..., 4] == s[..., 2])
    relation = np.clip(c[..., 6], 0, 3)
    holds_forward = np.take_along_axis(s[..., 6:10], relation[..., None].repeat(s.shape[0], 0), -1)[..., 0] == 1
    holds_backward = np.take_along_axis(s[..., 10:14], relation[..., None].repeat(s.shape[0], 0), -1)[..., 0] == 1
    no_relation = c[..., 6] == _NONE
    two = (forward & (no_relation | holds_forward)) | (backward & (no_relation | holds_backward))
    return same_count & np.where(c[..., 0] == 1, one, two)


# ------------------------------------------------------------------------------------------------
# Hard negatives


def _render(code: CaptionCode) -> str:
    first = _object_text(COLORS[code.c1], SHAPES[code.s1])
    if code.n == 1:
        return first if code.region == _NONE else f"{first} in the {REGIONS[code.region]}"
    second = _object_text(COLORS[code.c2], SHAPES[code.s2])
    if code.relation == _NONE:
        return f"{first} and {second}"
    return f"{first} {RELATIONS[code.relation]} {second}"


def negative_candidates(caption: str, rng: np.random.Generator) -> dict[str, str]:
    """One edited caption per applicable kind (not yet checked against the scene)."""
    code = caption_code(caption)
    edits: dict[str, CaptionCode] = {}
    if code.n == 2:
        edits["color_swap"] = dataclasses.replace(code, c1=code.c2, c2=code.c1)
        edits["shape_swap"] = dataclasses.replace(code, s1=code.s2, s2=code.s1)
        edits["objects_exchanged"] = dataclasses.replace(code, c1=code.c2, s1=code.s2, c2=code.c1, s2=code.s1)
        if code.relation != _NONE:
            edits["relation_reversed"] = dataclasses.replace(
                code, relation=RELATIONS.index(OPPOSITE[RELATIONS[code.relation]])
            )
        else:  # "A and B" has no relation to reverse: state one, which may or may not hold
            edits["relation_reversed"] = dataclasses.replace(code, relation=int(rng.integers(len(RELATIONS))))
    else:
        others = [r for r in range(len(REGIONS)) if r != code.region]
        edits["region_changed"] = dataclasses.replace(code, region=int(rng.choice(others)))
    # A different colour or shape for one object: always available, so every caption has negatives.
    which = int(rng.integers(code.n))
    if rng.random() < 0.5:
        used = {code.c1, code.c2}
        color = int(rng.choice([c for c in range(len(COLORS)) if c not in used]))
        edits["attribute_changed"] = dataclasses.replace(code, **{("c1", "c2")[which]: color})
    else:
        current = (code.s1, code.s2)[which]
        shape = int(rng.choice([s for s in range(len(SHAPES)) if s != current]))
        edits["attribute_changed"] = dataclasses.replace(code, **{("s1", "s2")[which]: shape})
    return {kind: _render(edit) for kind, edit in edits.items()}


def hard_negatives(scene: Scene, caption: str, rng: np.random.Generator) -> dict[str, str]:
    """The candidates that are false of ``scene`` (kind -> caption)."""
    candidates = negative_candidates(caption, rng)
    kinds = list(candidates)
    truth = truth_matrix(caption_codes([candidates[k] for k in kinds]), scene_codes([scene]))[0]
    return {kind: candidates[kind] for kind, true in zip(kinds, truth) if not true}


def negatives_for_batch(
    scenes: Sequence[Scene], captions: Sequence[str], per_caption: int, rng: np.random.Generator
) -> list[str]:
    """``per_caption`` false captions per scene, hard kinds first, topped up with attribute changes."""
    out = []
    for scene, caption in zip(scenes, captions):
        chosen: list[str] = []
        negatives = hard_negatives(scene, caption, rng)
        kinds = [k for k in negatives if k != "attribute_changed"]
        rng.shuffle(kinds)
        chosen += [negatives[k] for k in kinds[:per_caption]]
        attempts = 0
        while len(chosen) < per_caption:
            extra = hard_negatives(scene, caption, rng).get("attribute_changed")
            attempts += 1
            if extra is not None and (extra not in chosen or attempts > 20):
                chosen.append(extra)
        out += chosen
    return out


# ------------------------------------------------------------------------------------------------
# Scene corpora


@dataclasses.dataclass(frozen=True)
class SceneSet:
    """Scenes with their rendered images (uint8 [N, S, S, 3]) and codes."""

    scenes: tuple[Scene, ...]
    images: np.ndarray
    codes: np.ndarray

    def __len__(self) -> int:
        return len(self.scenes)


def make_scene_set(count: int, image_size: int, seed: int) -> SceneSet:
    """``count`` scenes drawn as the dataset draws them, rendered at ``image_size``."""
    rng = np.random.default_rng(seed)
    scenes = tuple(sample_scene(rng) for _ in range(count))
    images = np.stack([render_scene(s, image_size) for s in scenes])
    return SceneSet(scenes=scenes, images=images, codes=scene_codes(scenes))


def caption_corpus_from_scenes(scenes: Sequence[Scene], rng: np.random.Generator) -> list[str]:
    """One true caption per scene, template drawn uniformly among the scene's true captions."""
    return [str(rng.choice(true_captions(s))) for s in scenes]
