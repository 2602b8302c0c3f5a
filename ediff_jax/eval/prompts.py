"""Parse ``ediff_shapes`` captions back into the objects, region and relation they ask for.

The grammar is the spec's four caption templates (shapes.md, "Captions"), built from the very
word lists that ``ediff_jax.data.shapes`` samples from, so the parser cannot drift from the
captions the dataset produces.
"""

from __future__ import annotations

import dataclasses
import re

from ediff_jax.data.shapes import COLORS, REGIONS, RELATIONS, SHAPES


@dataclasses.dataclass(frozen=True)
class ExpectedObject:
    color: str
    shape: str


@dataclasses.dataclass(frozen=True)
class ParsedPrompt:
    """What a caption asks for: 1 or 2 objects, a region (of the single object) or a relation
    (of the first object relative to the second), never both."""

    objects: tuple[ExpectedObject, ...]
    region: str | None = None
    relation: str | None = None


def _alternatives(words: tuple[str, ...]) -> str:
    # Longest first, so that "top left" is tried before "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT = rf"a (?P<{{p}}color>{_alternatives(COLORS)}) (?P<{{p}}shape>{_alternatives(SHAPES)})"
_FIRST = _OBJECT.format(p="a_")
_SECOND = _OBJECT.format(p="b_")
_TEMPLATES = (
    re.compile(rf"{_FIRST}"),
    re.compile(rf"{_FIRST} in the (?P<region>{_alternatives(REGIONS)})"),
    re.compile(rf"{_FIRST} (?P<relation>{_alternatives(RELATIONS)}) {_SECOND}"),
    re.compile(rf"{_FIRST} and {_SECOND}"),
)
TEMPLATES_HELP = (
    "'a {color} {shape}', 'a {color} {shape} in the {region}', "
    "'a {color} {shape} {relation} a {color} {shape}' or 'a {color} {shape} and a {color} {shape}' "
    f"with color in {list(COLORS)}, shape in {list(SHAPES)}, region in {list(REGIONS)}, "
    f"relation in {list(RELATIONS)}"
)


def normalize_prompt(prompt: str) -> str:
    """Lower case, single spaces, no final period: user-typed prompts still parse."""
    return " ".join(prompt.lower().split()).rstrip(".").strip()


def parse_prompt(prompt: str) -> ParsedPrompt:
    """The objects, region and relation of an ``ediff_shapes`` caption; ValueError otherwise."""
    text = normalize_prompt(prompt)
    for template in _TEMPLATES:
        match = template.fullmatch(text)
        if match is None:
            continue
        groups = match.groupdict()
        objects = [ExpectedObject(groups["a_color"], groups["a_shape"])]
        if groups.get("b_color"):
            objects.append(ExpectedObject(groups["b_color"], groups["b_shape"]))
        return ParsedPrompt(
            objects=tuple(objects), region=groups.get("region"), relation=groups.get("relation")
        )
    raise ValueError(
        f"prompt {prompt!r} is not an ediff_shapes caption, so it cannot be scored; "
        f"it must read {TEMPLATES_HELP}"
    )
