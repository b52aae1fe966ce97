"""ShapesWorld scenes and their captions: the miniature of the paper's text-to-image world
(``docs/design.md#the-tiny-world``).

Grammar (every caption is lower case, no punctuation):

- one object: ``a [small|large] {colour} {shape} [at the top left|at the top right|at the bottom left|
  at the bottom right|in the center]`` — size and position words are each present with probability 3/4;
- two objects: ``a {colour} {shape} {left of|right of|below} a {colour} {shape}``; the fourth relation,
  **above**, is captioned only as ``a {colour} {shape} and a {colour} {shape}`` (first object above the second).
  The word "above" never appears in any caption, so the teacher never reads it: the relation-inversion task
  (ReVersion analog) must learn it from exemplars.

Coordinates are in pixels of the ``resolution``-sized image, origin top left, y growing downwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (46, 184, 76),
    "blue": (48, 96, 232),
    "yellow": (236, 204, 36),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (4.5, 6.0), "large": (7.5, 9.5)}  # radius ranges at 32 px
POSITIONS: dict[str, tuple[float, float]] = {  # region centres at 32 px (x, y)
    "top left": (10.0, 10.0),
    "top right": (22.0, 10.0),
    "bottom left": (10.0, 22.0),
    "bottom right": (22.0, 22.0),
    "center": (16.0, 16.0),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "below", "above")
CAPTION_RELATION_WORDS: dict[str, str] = {
    "left of": "left of", "right of": "right of", "below": "below", "above": "and"
}
PAIR_RADIUS: tuple[float, float] = (4.0, 6.0)  # object radius in two-object scenes
COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # reader's 12 object classes
_REFERENCE_RESOLUTION = 32


@dataclass(frozen=True)
class ShapesObject:
    color: str
    shape: str
    cx: float  # centre, pixels at the reference resolution of 32
    cy: float
    radius: float

    @property
    def combo(self) -> int:
        """Index of (colour, shape) in :data:`COMBOS`."""
        return COMBOS.index((self.color, self.shape))


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapesObject, ...]
    caption: str
    relation: str | None = None  # one of RELATIONS for two-object scenes (object 0 relative to object 1)
    size: str | None = None  # size word of a one-object scene
    position: str | None = None  # region of a one-object scene
    mentions_size: bool = False
    mentions_position: bool = False


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def sample_single_object_scene(rng: np.random.Generator) -> Scene:
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS)))
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high))
    px, py = POSITIONS[position]
    jitter = 1.5 if position != "center" else 2.0
    cx, cy = (float(v + rng.uniform(-jitter, jitter)) for v in (px, py))
    mentions_size, mentions_position = bool(rng.random() < 0.75), bool(rng.random() < 0.75)
    words = ["a"] + ([size] if mentions_size else []) + [color, shape]
    if mentions_position:
        words.append(position_phrase(position))
    return Scene(
        objects=(ShapesObject(color, shape, cx, cy, radius),),
        caption=" ".join(words),
        size=size,
        position=position,
        mentions_size=mentions_size,
        mentions_position=mentions_position,
    )


def _pair_centres(rng: np.random.Generator, relation: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of (object 0, object 1) such that object 0 is ``relation`` object 1."""
    near, far = 9.5, 22.5
    lateral = [float(16 + rng.uniform(-4, 4)) for _ in range(2)]
    along = [float(v + rng.uniform(-1.5, 1.5)) for v in (near, far)]
    if relation == "left of":
        return (along[0], lateral[0]), (along[1], lateral[1])
    if relation == "right of":
        return (along[1], lateral[0]), (along[0], lateral[1])
    if relation == "above":
        return (lateral[0], along[0]), (lateral[1], along[1])
    if relation == "below":
        return (lateral[0], along[1]), (lateral[1], along[0])
    raise ValueError(f"unknown relation {relation!r}; choose one of {RELATIONS}")


def sample_two_object_scene(rng: np.random.Generator, relation: str | None = None) -> Scene:
    """Two distinct (colour, shape) objects in a random relation, or in ``relation`` when given (the exemplars
    of relation inversion)."""
    first, second = rng.choice(len(COMBOS), size=2, replace=False)  # two distinct (colour, shape) objects
    relation = str(rng.choice(RELATIONS)) if relation is None else relation
    centres = _pair_centres(rng, relation)
    objects = tuple(
        ShapesObject(*COMBOS[int(combo)], cx, cy, float(rng.uniform(*PAIR_RADIUS)))
        for combo, (cx, cy) in zip((first, second), centres)
    )
    a, b = (f"{o.color} {o.shape}" for o in objects)
    return Scene(objects=objects, caption=f"a {a} {CAPTION_RELATION_WORDS[relation]} a {b}", relation=relation)


def sample_scene(rng: np.random.Generator, two_object_fraction: float = 0.5) -> Scene:
    """One random scene: two objects with probability ``two_object_fraction``, else one."""
    if rng.random() < two_object_fraction:
        return sample_two_object_scene(rng)
    return sample_single_object_scene(rng)


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Spatial relation of point ``a`` to point ``b`` (dominant axis), in :data:`RELATIONS` terms."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def region_of(cx: float, cy: float) -> str:
    """Closest position region of a centre given at the 32-px reference resolution."""
    return min(POSITIONS, key=lambda name: (POSITIONS[name][0] - cx) ** 2 + (POSITIONS[name][1] - cy) ** 2)


def size_of(radius: float) -> str:
    """Size word of a one-object scene from its radius (threshold between the two ranges)."""
    return "small" if radius < (SIZES["small"][1] + SIZES["large"][0]) / 2 else "large"
