"""ShapesWorld splits: captioned images with condition maps and per-object labels.

| split | role in the paper's world |
|---|---|
| ``train`` | the text-image data the tiny teacher, tiny CLIP and feature net learn from (LAION analog) |
| ``validation`` | prompt sheet for choosing the teacher's guidance scale |
| ``coco14-like`` | held-out captions + real reference images for Table 1 (COCO-2014 30k analog) |
| ``coco17-like`` | second held-out set (COCO-2017 5k analog) |

Each split draws from its own random stream (seeded by the world seed and the split name). Rendering at
32×32 quantises positions and radii, so two random scenes can give the same pixels: every split after
``train`` (in the order above) skips an image that already occurs in an earlier split or earlier in itself,
so no held-out image is ever a training image. The grammar is finite (a few hundred distinct captions), so
caption *strings* repeat across splits, as short COCO captions do.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..profiles import WorldConfig
from .render import edge_map, render_mask, render_scene
from .scenes import _REFERENCE_RESOLUTION, COMBOS, Scene, sample_scene

SPLITS: dict[str, str] = {  # split name -> WorldConfig field holding its size
    "train": "train_size",
    "validation": "validation_size",
    "coco14-like": "coco14_size",
    "coco17-like": "coco17_size",
}


@dataclass
class ShapesDataset:
    """A rendered split. Images are uint8 (N, 3, H, W); masks and edges uint8 (N, 1, H, W) in {0, 1}."""

    name: str
    scenes: list[Scene]
    images: torch.Tensor
    masks: torch.Tensor | None = None
    edges: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def captions(self) -> list[str]:
        return [scene.caption for scene in self.scenes]

    def images_float(self) -> torch.Tensor:
        """Images in [-1, 1], float32 — the diffusion models' pixel convention."""
        return self.images.float() / 127.5 - 1.0


def split_seed(world_seed: int, split: str) -> int:
    """Seed of a split's random stream: distinct splits never share a stream."""
    digest = hashlib.sha256(f"shapesworld/{world_seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_scenes(split: str, count: int, world: WorldConfig) -> list[Scene]:
    """The first ``count`` scenes of a split's random stream (before the de-duplication of held-out splits)."""
    rng = np.random.default_rng(split_seed(world.seed, split))
    return [sample_scene(rng, world.two_object_fraction) for _ in range(count)]


def _digest(image: np.ndarray) -> bytes:
    return hashlib.sha256(image.tobytes()).digest()


@functools.lru_cache(maxsize=8)
def _rendered_split(split: str, world: WorldConfig) -> tuple[tuple[Scene, ...], np.ndarray]:
    """All scenes and uint8 images (N, H, W, 3) of a split; held-out splits skip already-seen images."""
    size = getattr(world, SPLITS[split])
    if split == "train":
        scenes = sample_scenes(split, size, world)
        return tuple(scenes), np.stack([render_scene(s, world.resolution) for s in scenes])
    earlier = list(SPLITS)[: list(SPLITS).index(split)]
    seen = {_digest(image) for name in earlier for image in _rendered_split(name, world)[1]}
    rng = np.random.default_rng(split_seed(world.seed, split))
    scenes, images = [], []
    while len(scenes) < size:
        scene = sample_scene(rng, world.two_object_fraction)
        image = render_scene(scene, world.resolution)
        if (digest := _digest(image)) not in seen:
            seen.add(digest)
            scenes.append(scene)
            images.append(image)
    return tuple(scenes), np.stack(images)


def condition_maps(scenes: list[Scene], resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Object masks and their edge maps, uint8 (N, 1, H, W) in {0, 1}."""
    masks = np.stack([render_mask(s, resolution) for s in scenes])
    edges = np.stack([edge_map(m) for m in masks])
    return torch.from_numpy(masks[:, None]), torch.from_numpy(edges[:, None])


def make_split(split: str, world: WorldConfig, with_maps: bool = False, count: int | None = None) -> ShapesDataset:
    """Render a split deterministically; ``count`` (≤ the profile's size) takes its first images."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    size = getattr(world, SPLITS[split])
    if count is not None and count > size:
        raise ValueError(f"split {split!r} has {size} images in this profile; asked for {count}")
    all_scenes, all_images = _rendered_split(split, world)
    scenes = list(all_scenes[: size if count is None else count])
    images = torch.from_numpy(all_images[: len(scenes)].transpose(0, 3, 1, 2).copy())
    masks, edges = condition_maps(scenes, world.resolution) if with_maps else (None, None)
    return ShapesDataset(split, scenes, images, masks, edges)


def object_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reader targets: presence (N, 12) in {0, 1} and geometry (N, 12, 3) = (cx, cy, radius) / 32.

    Geometry is meaningful only where the object is present. Objects are indexed by :data:`COMBOS`
    (colour × shape), which makes the labels independent of caption word order.
    """
    presence = torch.zeros(len(scenes), len(COMBOS))
    geometry = torch.zeros(len(scenes), len(COMBOS), 3)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            presence[i, obj.combo] = 1.0
            geometry[i, obj.combo] = torch.tensor([obj.cx, obj.cy, obj.radius]) / _REFERENCE_RESOLUTION
    return presence, geometry


def describe_splits(datasets: list[ShapesDataset]) -> pd.DataFrame:
    """Counts per split: images, one-object scenes, each relation, distinct captions, captions saying "above"."""
    rows = []
    for data in datasets:
        relations = pd.Series([s.relation for s in data.scenes if s.relation]).value_counts()
        rows.append({
            "split": data.name,
            "images": len(data),
            "one object": sum(len(s.objects) == 1 for s in data.scenes),
            **{f"{rel}": int(relations.get(rel, 0)) for rel in ("left of", "right of", "below", "above")},
            "distinct captions": len(set(data.captions)),
            'captions saying "above"': sum("above" in c.split() for c in data.captions),
        })
    return pd.DataFrame(rows).set_index("split")
