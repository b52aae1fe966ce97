"""ShapesWorld: deterministic procedural 32×32 captioned images (``docs/design.md#the-tiny-world``)."""

from .datasets import (
    SPLITS,
    ShapesDataset,
    condition_maps,
    describe_splits,
    make_split,
    object_targets,
    sample_scenes,
)
from .render import edge_map, render_mask, render_scene
from .scenes import (
    CAPTION_RELATION_WORDS,
    COLORS,
    COMBOS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapesObject,
    region_of,
    relation_between,
    sample_scene,
    size_of,
)
