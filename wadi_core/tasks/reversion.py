"""Relation inversion with a one-step student (ReVersion's idea; WaDi's downstream section; notebook 05 §3).

ReVersion (Huang et al., SIGGRAPH Asia 2024) learns one new token ``<R>`` in a frozen text encoder from a handful
of exemplar images of a relation; only that embedding row trains. Its two additions to textual inversion:

- **relation-steering contrastive loss** (:func:`steering_loss`): ``<R>``'s normalised embedding is pulled toward
  preposition words (a few sampled from a prior set each step) and pushed from the caption's entity words,
  InfoNCE at τ = 0.07, weight 0.01;
- **relation-focal importance sampling** (:func:`relation_focal_timesteps`): t drawn from
  f(t) ∝ 1 − α·cos(πt/T), α = 0.5, favouring the high-noise steps where layout is decided.

The paper uses the token with the one-step WaDi student as is (1.44 s vs 0.16 s per image, 88.89 % less). Here
the token is learned on the **teacher** (:func:`train_relation_token`, ``through="teacher"``), without the steering
loss (the ablation), and **through the one-step student itself** (``through="student"``: the student's x0 at
t = T−1 on the noised exemplar, :func:`one_step_reconstruction_loss`). ShapesWorld draws "X above Y" but captions
it "a X and a Y", so the teacher has never read the word "above".
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_modules, merged_copy
from ..artifacts import TrainedModel, fields_except, load_or_train, module_digest
from ..diffusion import one_step_x0
from ..eval.attributes import attribute_table
from ..optim import cosine_lr, set_lr
from ..profiles import Profile, ReVersionConfig
from ..world import COMBOS
from ..world.render import render_scene
from ..world.scenes import sample_two_object_scene
from .controlnet import training_latents

TOKEN_KIND = "relation_token"
VARIANTS = {  # name: (through, steering, the opposite relation's word dropped from the steering positives)
    "teacher": ("teacher", True, False),
    "teacher, no steering": ("teacher", False, False),
    "teacher, no opposite positive": ("teacher", True, True),
    "student": ("student", True, False),
}
OPPOSITE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
EVALUATION_FIELDS = ("eval_pairs", "eval_seeds", "timing_images")  # ReVersionConfig fields that do not shape <R>
EXEMPLAR_STREAM = 7_919  # the exemplars' own random stream (disjoint from the world's splits by the offset)


# --------------------------------------------------------------------------------------------------------------
# Exemplars and the placeholder token
# --------------------------------------------------------------------------------------------------------------


def relation_exemplars(config: ReVersionConfig, resolution: int, world_seed: int = 0):
    """``config.exemplars`` two-object scenes in ``config.relation`` (object 0 relative to object 1), rendered at
    ``resolution``: (images uint8 (N, 3, H, W), the (colour, shape) pairs, ReVersion's captions
    ``"a {first} <R> a {second}"``)."""
    rng = np.random.default_rng([world_seed, EXEMPLAR_STREAM, config.seed])
    scenes = [sample_two_object_scene(rng, relation=config.relation) for _ in range(config.exemplars)]
    images = torch.from_numpy(np.stack([render_scene(s, resolution) for s in scenes])).permute(0, 3, 1, 2)
    pairs = [tuple((o.color, o.shape) for o in s.objects) for s in scenes]
    return images.contiguous(), pairs, [relation_prompt(pair, config.token) for pair in pairs]


def relation_prompt(pair, word: str) -> str:
    """``"a {colour} {shape} {word} a {colour} {shape}"`` for a pair of (colour, shape) objects."""
    (c1, s1), (c2, s2) = pair
    return f"a {c1} {s1} {word} a {c2} {s2}"


def held_out_pairs(exemplar_pairs, count: int, seed: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Up to ``count`` ordered pairs of distinct (colour, shape) objects, none of them an exemplar's pair."""
    seen = set(exemplar_pairs)
    pairs = [(a, b) for a in COMBOS for b in COMBOS if a != b and (a, b) not in seen]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order[:count]]


def single_token_ids(tokenizer, word: str) -> list[int]:
    """The token ids of ``word`` (no BOS/EOS)."""
    return tokenizer(word, add_special_tokens=False).input_ids


def with_placeholder(backbone, token: str, initializer: str | None = None):
    """A copy of ``backbone`` whose tokenizer knows ``token`` as one new token and whose text encoder has a row for
    it, initialised to ``initializer``'s embedding when given (the rest shared with ``backbone``).
    Returns (backbone, the token's id).

    Raises:
        ValueError: ``token`` is already a token (or a word) of the vocabulary, or ``initializer`` is not one token.
    """
    tokenizer = backbone.tokenizer
    pieces = tokenizer.tokenize(token)
    if token in tokenizer.get_vocab() or (len(pieces) == 1 and pieces[0] != tokenizer.unk_token):
        raise ValueError(f"placeholder token {token!r} already exists in the vocabulary (as {pieces}); "
                         "choose a new string, e.g. '<R>'")
    init = None if initializer is None else single_token_ids(tokenizer, initializer)
    if init is not None and (len(init) != 1 or init[0] == tokenizer.unk_token_id):
        raise ValueError(f"initializer {initializer!r} must be one token of the vocabulary, got pieces "
                         f"{tokenizer.tokenize(initializer)}")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([token])
    text_encoder = copy.deepcopy(backbone.text_encoder)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if init is not None:
        with torch.no_grad():
            table = text_encoder.get_input_embeddings().weight
            table[token_id] = table[init[0]]
    text_encoder.requires_grad_(False)
    return dataclasses.replace(backbone, tokenizer=tokenizer, text_encoder=text_encoder), token_id


class TokenEmbedding(nn.Module):
    """The learned input embedding of one token (what ReVersion stores for ``<R>``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(dim))


def with_token_embedding(backbone, token: str, embedding: torch.Tensor):
    """A copy of ``backbone`` (:func:`with_placeholder`) whose ``token`` has the learned ``embedding``."""
    placed, token_id = with_placeholder(backbone, token)
    with torch.no_grad():
        placed.text_encoder.get_input_embeddings().weight[token_id] = embedding.to(placed.text_encoder.dtype)
    return placed


# --------------------------------------------------------------------------------------------------------------
# The two losses of ReVersion and the one-step student's
# --------------------------------------------------------------------------------------------------------------


def relation_focal_timesteps(count: int, num_timesteps: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` timesteps drawn from f(t) ∝ 1 − α·cos(πt/T), t = 0 … T−1 (ReVersion's relation-focal sampling)."""
    if not 0 <= alpha < 1:
        raise ValueError(f"focal alpha must lie in [0, 1), got {alpha}")
    t = torch.arange(num_timesteps, dtype=torch.float64)
    weights = 1 - alpha * torch.cos(torch.pi * t / num_timesteps)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def steering_loss(table: torch.Tensor, token_id: int, positive_ids: list[int], negative_ids: list[int],
                  temperature: float) -> torch.Tensor:
    """ReVersion's relation-steering InfoNCE on normalised input embeddings: for each positive p,
    −log exp(r·p/τ) / (exp(r·p/τ) + Σ_n exp(r·n/τ)), averaged over the positives."""
    if not positive_ids or not negative_ids:
        raise ValueError("the steering loss needs at least one positive and one negative token")
    vectors = F.normalize(table, dim=-1)
    anchor = vectors[token_id]
    positive = vectors[positive_ids] @ anchor / temperature  # (P,)
    negative = vectors[negative_ids] @ anchor / temperature  # (N,)
    logits = torch.cat([positive[:, None], negative.expand(len(positive_ids), -1)], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(positive_ids), dtype=torch.long, device=table.device))


def one_step_reconstruction_loss(student: nn.Module, backbone, x0: torch.Tensor, cond: torch.Tensor,
                                 generator: torch.Generator) -> torch.Tensor:
    """The one-step student's denoising loss: its x0 at t = T−1 on the noised ``x0`` (the teacher's ε-loss at the
    student's only timestep, in x0 space), ‖x̂0 − x0‖²."""
    t_last = backbone.scheduler.config.num_train_timesteps - 1
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    noisy = backbone.scheduler.add_noise(x0, noise, torch.full((len(x0),), t_last, dtype=torch.long))
    return F.mse_loss(one_step_x0(student, noisy, cond, backbone.scheduler, backbone.one_step_alpha_bar), x0)


def _frozen(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no adapters, else a merged copy; frozen either way."""
    model = merged_copy(model) if adapter_modules(model) else model
    return model.requires_grad_(False)


def train_relation_token(backbone, images: torch.Tensor, captions: list[str], config: ReVersionConfig,
                         steering: bool = True, student: nn.Module | None = None,
                         progress: bool = True) -> tuple[TokenEmbedding, dict[str, list[float]]]:
    """Learn ``config.token`` from exemplar ``images`` (uint8) and their ``captions`` (which contain the token).

    ``student=None``: the teacher's ε-loss at relation-focal timesteps (ReVersion); else the one-step
    ``student``'s :func:`one_step_reconstruction_loss`. ``steering`` adds :func:`steering_loss`. AdamW on the
    embedding table; every row but the token's is restored after each step. Returns the token's embedding.
    """
    placed, token_id = with_placeholder(backbone, config.token, config.initializer)
    tokenizer, encoder = placed.tokenizer, placed.text_encoder
    table = encoder.get_input_embeddings().weight
    original = table.detach().clone()
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[token_id] = False
    table.requires_grad_(True)
    denoiser = _frozen(backbone.denoiser if student is None else student)
    x0 = training_latents(placed, images)
    ids = tokenizer(captions, padding="max_length", max_length=placed.max_length, truncation=True,
                    return_tensors="pt").input_ids
    if not (ids == token_id).any(dim=1).all():
        raise ValueError(f"every caption must contain the placeholder {config.token!r} within "
                         f"{placed.max_length} tokens")
    positives = sorted({i for word in config.positives for i in single_token_ids(tokenizer, word)})
    ignored = {*tokenizer.all_special_ids, token_id, *single_token_ids(tokenizer, "a")}
    optimizer = torch.optim.AdamW([table], lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    scheduler = placed.scheduler
    log: dict[str, list[float]] = {"step": [], "loss": [], "denoising": [], "steering": [], "lr": []}
    desc = f"<R> through the {'teacher' if student is None else 'student'}"
    for step in tqdm(range(config.steps), desc=desc, mininterval=5.0, disable=not progress):
        lr = cosine_lr(step, config.steps, config.lr, config.lr)
        set_lr(optimizer, lr)
        batch = torch.randint(len(x0), (config.batch_size,), generator=generator)
        cond = encoder(input_ids=ids[batch].to(placed.device)).last_hidden_state
        if student is None:
            noise = torch.randn(x0[batch].shape, generator=generator)
            t = relation_focal_timesteps(len(batch), scheduler.config.num_train_timesteps, config.focal_alpha,
                                         generator)
            pred = denoiser(scheduler.add_noise(x0[batch], noise, t), t, encoder_hidden_states=cond).sample
            denoising = F.mse_loss(pred, noise)
        else:
            denoising = one_step_reconstruction_loss(denoiser, placed, x0[batch], cond, generator)
        steer = torch.zeros(())
        if steering:
            chosen = torch.randperm(len(positives), generator=generator)[: config.num_positives].tolist()
            negatives = sorted({int(i) for i in ids[batch].flatten().tolist()} - ignored - set(positives))
            steer = steering_loss(table, token_id, [positives[i] for i in chosen], negatives, config.temperature)
        loss = denoising + config.steering_weight * steer
        if not torch.isfinite(loss):
            raise FloatingPointError(f"relation-token loss is {loss.item()} at step {step}; lower ReVersionConfig.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            table[keep] = original[keep]
        for key, value in (("step", step), ("loss", loss.item()), ("denoising", denoising.item()),
                           ("steering", steer.item()), ("lr", lr)):
            log[key].append(float(value))
    learned = TokenEmbedding(table.shape[1])
    with torch.no_grad():
        learned.embedding.copy_(table[token_id])
    return learned.requires_grad_(False), log


def load_or_train_relation_token(profile: Profile, backbone, variant: str, student: nn.Module | None = None,
                                 progress: bool = True) -> TrainedModel:
    """The cached ``<R>`` of ``variant`` (one of :data:`VARIANTS`: through the teacher with or without the steering
    loss or with the opposite relation's word left out of its positives, or through the one-step ``student``), else
    learned from :func:`relation_exemplars`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    through, steering, drop_opposite = VARIANTS[variant]
    if through == "student" and student is None:
        raise ValueError(f"variant {variant!r} learns the token through a one-step student; pass student=")
    config = profile.reversion
    if drop_opposite:  # does the opposite relation among the positives explain what the steering loss does?
        opposite = OPPOSITE_RELATION[config.relation].split()[0]
        config = dataclasses.replace(config, positives=tuple(w for w in config.positives if w != opposite))
    key = {"text_encoder": module_digest(backbone.text_encoder), "world": profile.world,
           "reversion": fields_except(config, EVALUATION_FIELDS),
           "steering": steering, "through": through,
           "denoiser": module_digest(backbone.denoiser if through == "teacher" else student)}
    dim = backbone.text_encoder.get_input_embeddings().weight.shape[1]

    def train():
        images, _, captions = relation_exemplars(config, backbone.resolution, profile.world.seed)
        token, log = train_relation_token(backbone, images, captions, config, steering,
                                          student if through == "student" else None, progress)
        return token, log, {"variant": variant}

    return load_or_train(TOKEN_KIND, key, lambda _: TokenEmbedding(dim), train, config=config,
                         label=f"{config.token} ({variant})")


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------


def relation_scores(reader, images: torch.Tensor, pairs, relation: str = "above") -> dict[str, float]:
    """Relation and entity accuracy of images of ``pairs``, read as ``"a X {relation} a Y"``: ``relation`` (both
    objects found and the first in ``relation`` to the second), ``entities`` (exactly the two objects found),
    ``relation given both found``, and ``reversed`` (both found, the first in the opposite relation: the objects
    placed along the right axis in the wrong order)."""
    if relation not in OPPOSITE_RELATION:
        raise ValueError(f"unknown relation {relation!r}; choose one of {', '.join(OPPOSITE_RELATION)}")
    table = attribute_table(reader, images, [relation_prompt(pair, relation) for pair in pairs])
    found = table["objects"].astype(bool)
    return {"relation": float(table["relation"].astype(float).mean()), "entities": float(found.mean()),
            "relation given both found": float(table.loc[found, "relation"].astype(float).mean()) if found.any()
            else float("nan"), "reversed": float((table["relation read"] == OPPOSITE_RELATION[relation]).mean())}


def nearest_words(backbone, embedding: torch.Tensor, words: list[str]) -> pd.Series:
    """Cosine similarity of ``embedding`` to the input embedding of each one-token word in ``words``."""
    table = backbone.text_encoder.get_input_embeddings().weight
    out = {}
    for word in words:
        ids = single_token_ids(backbone.tokenizer, word)
        if len(ids) == 1:
            out[word] = F.cosine_similarity(embedding.float(), table[ids[0]].float(), dim=0).item()
    return pd.Series(out, name="cosine similarity").sort_values(ascending=False)
