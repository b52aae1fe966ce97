"""The ShapesWorld feature network: FID's "Inception analog" and the attribute reader in one CNN.

No Inception or CLIP weights are available offline, so the tiny world trains its own feature
network on ShapesWorld labels. Its penultimate layer (``features``) feeds clean-fid through
``custom_feat_extractor``; its heads read, for each of the 12 (colour, shape) object classes, whether the
object is present and its centre and radius — enough to check every attribute a caption names.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..artifacts import TrainedModel, load_or_train
from ..optim import cosine_lr, set_lr
from ..profiles import Profile, ReaderTrainConfig
from ..world import COMBOS, ShapesDataset, make_split, object_targets


def _conv_trunk(channels: tuple[int, ...]) -> nn.Sequential:
    """Per stage: conv 3×3, then a stride-2 conv 3×3, each with GroupNorm + SiLU (32→16→8→4 for 3 stages)."""
    layers, in_ch = [], 3
    for out_ch in channels:
        layers += [
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(8, out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, stride=2), nn.GroupNorm(8, out_ch), nn.SiLU(),
        ]
        in_ch = out_ch
    return nn.Sequential(*layers)


class ShapesFeatureNet(nn.Module):
    """Two conv trunks: *what* is in the image and *where*, with per-object heads.

    Input: images in [-1, 1], (B, 3, 32, 32). The *what* trunk is max-pooled over space (translation
    invariant: one detector serves every position) and gives the presence of each (colour, shape) class; the
    *where* trunk keeps its 4×4 map (flattened into an embedding) and gives each object's centre and radius.
    Sharing one trunk between the two made presence unlearnable at this size, so they are separate. The FID
    features concatenate both, so FID sees layout as well as colour and shape.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128, resolution: int = 32):
        super().__init__()
        spatial = resolution // 2 ** len(channels)
        self.what = _conv_trunk(channels)
        self.where = nn.Sequential(
            _conv_trunk(channels), nn.Flatten(), nn.Linear(channels[-1] * spatial**2, feature_dim), nn.SiLU()
        )
        self.presence_head = nn.Linear(channels[-1], len(COMBOS))
        self.geometry_head = nn.Linear(feature_dim, len(COMBOS) * 3)
        self.feature_dim = channels[-1] + feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, channels[-1] + feature_dim) = [what, where]: what FID compares."""
        return torch.cat([self.what(images).amax(dim=(2, 3)), self.where(images)], dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Presence logits (B, 12) and geometry (B, 12, 3) = (cx, cy, radius) / 32 per object class."""
        what, where = self.features(images).split([self.presence_head.in_features, self.geometry_head.in_features], 1)
        return self.presence_head(what), self.geometry_head(where).view(len(images), len(COMBOS), 3)


def reader_loss(net: ShapesFeatureNet, images: torch.Tensor, presence: torch.Tensor, geometry: torch.Tensor):
    """BCE on presence + L1 on the geometry of the objects that are present."""
    logits, geo = net(images)
    geo_error = (geo - geometry).abs().sum(-1) * presence
    return F.binary_cross_entropy_with_logits(logits, presence) + 10 * geo_error.sum() / presence.sum()


def train_feature_net(train: ShapesDataset, config: ReaderTrainConfig) -> tuple[ShapesFeatureNet, dict]:
    """Supervised training on rendered images, with light Gaussian pixel noise so that slightly noisy
    generated images are still read correctly."""
    torch.manual_seed(config.seed)
    net = ShapesFeatureNet(config.channels, config.feature_dim, train.images.shape[-1])
    presence, geometry = object_targets(train.scenes)
    pixels = train.images_float()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    log: dict[str, list[float]] = {"step": [], "loss": [], "seconds": []}
    start = time.perf_counter()
    net.train()
    for step in tqdm(range(config.steps), desc="feature net", mininterval=2.0):
        batch = torch.randint(len(train), (config.batch_size,), generator=generator)
        sigma = 0.1 * torch.rand(len(batch), 1, 1, 1, generator=generator)
        noisy = pixels[batch] + sigma * torch.randn(pixels[batch].shape, generator=generator)
        loss = reader_loss(net, noisy, presence[batch], geometry[batch])
        set_lr(optimizer, cosine_lr(step, config.steps, config.lr, config.lr / 20, warmup_steps=config.steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("step", step), ("loss", loss.item()), ("seconds", time.perf_counter() - start)):
            log[key].append(float(value))
    return net.eval().requires_grad_(False), log


def load_or_train_feature_net(profile: Profile) -> TrainedModel:
    """The feature net of ``profile``: loaded from ``data/`` when cached, else trained and saved."""
    reader = profile.reader

    def build(metadata: dict[str, str]) -> ShapesFeatureNet:
        return ShapesFeatureNet(reader.channels, reader.feature_dim, profile.world.resolution).requires_grad_(False)

    def train() -> tuple[ShapesFeatureNet, dict, dict[str, str]]:
        net, log = train_feature_net(make_split("train", profile.world), reader)
        return net, log, {}

    return load_or_train("feature_net", {"world": profile.world, "reader": reader}, build, train, config=reader)
