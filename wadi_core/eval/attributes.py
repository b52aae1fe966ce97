"""Attribute accuracy: read colour, shape, size, position and relation back from images and check them
against the prompt. An interpretable metric no peer reports; the tiny world's complement to FID and CLIP.

The main number, ``objects``, is "colour and shape both right": the set of (colour, shape) objects read from
the image equals the set the prompt names — a missing, wrong or extra object makes the image wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..world import COLORS, COMBOS, POSITIONS, RELATIONS, SHAPES, SIZES, region_of, relation_between, size_of
from .features import ShapesFeatureNet

_WORD_TO_RELATION = {rel: rel for rel in RELATIONS}  # "above" parses too (relation-inversion prompts)
_POSITION_PHRASES = {("in the center" if p == "center" else f"at the {p}"): p for p in POSITIONS}


@dataclass(frozen=True)
class PromptSpec:
    """What a ShapesWorld prompt asserts. ``relation`` is None for one object and for "and" (unsaid).

    Two-object prompts are ``a {colour} {shape} {relation} a {colour} {shape}`` with a relation of
    :data:`~wadi_core.world.RELATIONS` (training captions never say "above") or "and".
    """

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None
    size: str | None = None
    position: str | None = None


def parse_prompt(prompt: str) -> PromptSpec:
    """Invert the caption grammar of :mod:`wadi_core.world.scenes`; raise ValueError on other text."""
    words = prompt.strip().split()
    try:
        if len(words) >= 6 and words[0] == "a" and " ".join(words[3:-3]) in (*_WORD_TO_RELATION, "and"):
            link = " ".join(words[3:-3])
            (c1, s1), (c2, s2) = (words[1], words[2]), (words[-2], words[-1])
            _check(c1, s1), _check(c2, s2)
            if words[-3] != "a":
                raise ValueError
            return PromptSpec(((c1, s1), (c2, s2)), relation=_WORD_TO_RELATION.get(link))
        if words[0] != "a":
            raise ValueError
        rest = words[1:]
        size = rest.pop(0) if rest and rest[0] in SIZES else None
        color, shape = rest[0], rest[1]
        _check(color, shape)
        phrase = " ".join(rest[2:])
        if phrase and phrase not in _POSITION_PHRASES:
            raise ValueError
        return PromptSpec(((color, shape),), size=size, position=_POSITION_PHRASES.get(phrase))
    except (ValueError, IndexError):
        raise ValueError(f"not a ShapesWorld prompt: {prompt!r}") from None


def _check(color: str, shape: str) -> None:
    if color not in COLORS or shape not in SHAPES:
        raise ValueError


@torch.no_grad()
def read_objects(reader: ShapesFeatureNet, images: torch.Tensor, batch_size: int = 512):
    """Objects read from images in [0, 1] (B, 3, H, W): presence (B, 12) bool, geometry (B, 12, 3) in pixels."""
    presence, geometry = [], []
    for start in range(0, len(images), batch_size):
        logits, geo = reader(images[start : start + batch_size].float() * 2 - 1)
        presence.append(logits > 0)
        geometry.append(geo * 32)  # back to pixels at the 32-px reference resolution
    return torch.cat(presence), torch.cat(geometry)


def attribute_table(reader: ShapesFeatureNet, images: torch.Tensor, prompts: list[str]) -> pd.DataFrame:
    """One row per image: which named attributes were read back correctly (NaN where the prompt is silent), and
    for a prompt naming a relation, ``relation read``: how the first named object sits to the second (None unless
    both were found)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    presence, geometry = read_objects(reader, images)
    rows = []
    for prompt, present, geo in zip(prompts, presence, geometry):
        spec = parse_prompt(prompt)
        wanted = {COMBOS.index(obj) for obj in spec.objects}
        found = set(torch.nonzero(present).flatten().tolist())
        colors_found = sorted(COMBOS[i][0] for i in found)
        shapes_found = sorted(COMBOS[i][1] for i in found)
        row = {
            "prompt": prompt,
            "objects": found == wanted,
            "colors": colors_found == sorted(c for c, _ in spec.objects),
            "shapes": shapes_found == sorted(s for _, s in spec.objects),
            "size": float("nan"),
            "position": float("nan"),
            "relation": float("nan"),
            "relation read": None,
        }
        first = COMBOS.index(spec.objects[0])
        cx, cy, radius = geo[first].tolist()
        if spec.size is not None:
            row["size"] = first in found and size_of(radius) == spec.size
        if spec.position is not None:
            row["position"] = first in found and region_of(cx, cy) == spec.position
        if spec.relation is not None:
            second = COMBOS.index(spec.objects[1])
            second_centre = tuple(geo[second, :2].tolist())
            row["relation read"] = relation_between((cx, cy), second_centre) if wanted <= found else None
            row["relation"] = row["relation read"] == spec.relation
        named = [row[k] for k in ("size", "position", "relation") if row[k] == row[k]]  # skip NaN
        row["all"] = bool(row["objects"] and all(named))
        rows.append(row)
    return pd.DataFrame(rows)


def attribute_accuracy(reader: ShapesFeatureNet, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Mean of each column of :func:`attribute_table` over the prompts that name the attribute."""
    table = attribute_table(reader, images, prompts)
    columns = ("objects", "colors", "shapes", "size", "position", "relation", "all")
    return {name: float(table[name].astype(float).mean()) for name in columns}
