"""DreamBooth-style customisation with LoRaD (WaDi's downstream section; notebook 05 §4).

DreamBooth (Ruiz et al., CVPR 2023) binds a subject, shown in a few exemplar images, to a rare token ``<S>``
("a <S> dog") by fine-tuning the denoiser, with **prior preservation**: the model's own samples of the class
word ("a dog") trained alongside, so that the class keeps its meaning. The paper shows LoRaD for it qualitatively.
Here the subject is a shape the world never drew (a cross, :mod:`wadi_core.world.render`), the class word the
nearest shape word, and three adapters at **equal trainable parameters** (:func:`matched_ranks`) customise

- the **teacher**, with the usual multi-step recipe (ε-loss, t ~ U[0, T)), and
- the **one-step student**, with its own timestep's loss (x0 at t = T−1 on the noised image,
  :func:`wadi_core.tasks.reversion.one_step_reconstruction_loss`),

same steps and seed. Measured (:func:`subject_similarity`, :func:`color_and_position`): subject fidelity (cosine
similarity of the reader's translation-invariant "what" features to the exemplars, the analog of DreamBooth's DINO
score), prompt fidelity (the colour and position a prompt asks for, by a fixed rule), prior drift (attribute
accuracy of ordinary class prompts before vs after) and each adapter's weight-direction and norm change.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_modules, inject, merged_copy, select_layers
from ..analysis.weights import summarize_changes, weight_changes
from ..artifacts import TrainedModel, fields_except, load_or_train, module_digest, tensor_digest
from ..eval.fid import image_files
from ..optim import set_lr
from ..profiles import DreamBoothConfig, Profile
from ..world import COLORS, POSITIONS, region_of
from ..world.render import render_scene
from ..world.scenes import Scene, ShapesObject, position_phrase
from .controlnet import object_components, training_latents
from .reversion import one_step_reconstruction_loss

DREAMBOOTH_KIND = "dreambooth"
BASES = ("teacher", "student")
EXEMPLAR_STREAM = 104_729  # the subject's own random stream
EVALUATION_FIELDS = ("methods", "subject_images", "eval_seeds")  # DreamBoothConfig fields that do not shape training


# --------------------------------------------------------------------------------------------------------------
# The subject: its token and its exemplar images
# --------------------------------------------------------------------------------------------------------------


def rare_token(tokenizer, captions: list[str]) -> str:
    """A word that is one token of the vocabulary and that no caption of ``captions`` uses: DreamBooth's rare
    identifier (SD1.5's "sks"). The shortest such word, then alphabetical, for determinism."""
    used = {i for ids in tokenizer(list(captions), add_special_tokens=False).input_ids for i in ids}
    special = set(tokenizer.all_special_ids)
    candidates = []
    for piece, index in tokenizer.get_vocab().items():
        word = piece.removesuffix("</w>")
        if index in used or index in special or not word.isalpha():
            continue
        if tokenizer(word, add_special_tokens=False).input_ids == [index]:
            candidates.append((len(word), word))
    if not candidates:
        raise ValueError("the tokenizer has no unused one-token word to serve as the subject token; name one in "
                         "DreamBoothConfig.subject_token")
    return min(candidates)[1]


def check_subject_token(tokenizer, token: str, prompt: str, max_length: int) -> None:
    """Raise ``ValueError`` unless ``token`` is one token of the vocabulary and ``prompt`` (which holds it) fits in
    ``max_length`` tokens with BOS and EOS (the pipeline would silently cut it)."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"subject token {token!r} is {len(ids)} tokens {tokenizer.tokenize(token)} for this "
                         "tokenizer, which allows one; choose a rare one-token word (rare_token)")
    length = len(tokenizer(prompt).input_ids)
    if length > max_length:
        raise ValueError(f"prompt {prompt!r} is {length} tokens, longer than the tokenizer's {max_length}")


def subject_exemplars(config: DreamBoothConfig, resolution: int, world_seed: int = 0) -> torch.Tensor:
    """``config.exemplars`` images (uint8 (N, 3, H, W)) of the subject: a ``config.subject_color``
    ``config.subject_shape`` at random positions and sizes, as DreamBooth's few photos of one object."""
    rng = np.random.default_rng([world_seed, EXEMPLAR_STREAM, config.seed])
    images = []
    for _ in range(config.exemplars):
        obj = ShapesObject(config.subject_color, config.subject_shape, float(rng.uniform(11, 21)),
                           float(rng.uniform(11, 21)), float(rng.uniform(6.5, 9.0)))
        images.append(render_scene(Scene(objects=(obj,), caption=""), resolution))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def write_exemplars(images: torch.Tensor, folder) -> list:
    """Save uint8 images (N, 3, H, W) as ``folder/%02d.png`` (the layout of a DreamBooth subject folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:02d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def load_exemplars(folder, resolution: int) -> torch.Tensor:
    """The subject images of ``folder`` (PNG/JPEG, sorted) as uint8 (N, 3, H, W).

    Raises:
        ValueError: the folder is missing or holds no image, or an image is not ``resolution``² pixels.
    """
    files = image_files(folder)
    if not files:
        raise ValueError(f"exemplar folder {str(folder)!r} holds no images (png/jpg); put the subject's photos there")
    images = []
    for path in files:
        image = Image.open(path).convert("RGB")
        if image.size != (resolution, resolution):
            raise ValueError(f"exemplar {path} is {image.size[0]}×{image.size[1]} pixels; the backbone takes "
                             f"{resolution}×{resolution} (crop and resize the subject's photos first)")
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(images)


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def subject_prompt(config: DreamBoothConfig, token: str, color: str | None = None,
                   position: str | None = None) -> str:
    """``"a [colour] <S> {class_word} [position phrase]"``."""
    words = ["a", *([color] if color else []), token, config.class_word]
    return " ".join(words + ([position_phrase(position)] if position else []))


def class_prompts(config: DreamBoothConfig, count: int) -> list[str]:
    """``count`` prior-preservation prompts: ``config.prior_prompt`` with the colours in turn."""
    colors = list(COLORS)
    return [config.prior_prompt.format(color=colors[i % len(colors)], class_word=config.class_word)
            for i in range(count)]


def grid_prompts(config: DreamBoothConfig, token: str | None = None) -> list[tuple[str, str, str]]:
    """(prompt, colour, position) for every colour × position: ``"a {colour} <S> {class} {position}"``, or the
    ordinary class prompt ``"a {colour} {class} {position}"`` without ``token`` (prior drift)."""
    rows = []
    for color in COLORS:
        for position in POSITIONS:
            words = ["a", color, *([token] if token else []), config.class_word, position_phrase(position)]
            rows.append((" ".join(words), color, position))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Equal trainable parameters
# --------------------------------------------------------------------------------------------------------------


def adapter_parameters(model: nn.Module, method: str, rank: int) -> int:
    """Trainable parameters ``inject(model, method, rank)`` would add, from the layer shapes: LoRaD
    r·(out + in/2), LoRA r·(in + out), DoRA r·(in + out) + out per adapted Linear."""
    per_layer = {"lorad": lambda i, o: rank * (o + i // 2), "lora": lambda i, o: rank * (i + o),
                 "dora": lambda i, o: rank * (i + o) + o}
    if method not in per_layer:
        raise ValueError(f"unknown method {method!r} for customisation; choose one of {', '.join(per_layer)}")
    layers = [model.get_submodule(name) for name in select_layers(model, "student")]
    return sum(per_layer[method](layer.in_features, layer.out_features) for layer in layers)


def matched_ranks(model: nn.Module, rank: int, methods: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{method: (rank, trainable parameters)}: LoRaD at ``rank``, every other method at the rank whose count is
    nearest LoRaD's (the fair comparison at equal trainable parameters)."""
    target = adapter_parameters(model, "lorad", rank)
    out = {}
    for method in methods:
        if method == "lorad":
            out[method] = (rank, target)
            continue
        best = min(range(1, 4 * rank + 2), key=lambda r: abs(adapter_parameters(model, method, r) - target))
        out[method] = (best, adapter_parameters(model, method, best))
    return out


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def plain_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` with any adapters merged (the base a new adapter is injected into)."""
    copied = merged_copy(model) if adapter_modules(model) else copy.deepcopy(model)
    return copied.requires_grad_(False).eval()


def _denoising_loss(model: nn.Module, backbone, x0: torch.Tensor, cond: torch.Tensor, one_step: bool,
                    generator: torch.Generator) -> torch.Tensor:
    if one_step:
        return one_step_reconstruction_loss(model, backbone, x0, cond, generator)
    scheduler = backbone.scheduler
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    return F.mse_loss(model(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample, noise)


def train_dreambooth(base: nn.Module, backbone, method: str, rank: int, exemplars: torch.Tensor, token: str,
                     prior_images: torch.Tensor, prior_prompts: list[str], config: DreamBoothConfig, lr: float,
                     one_step: bool, progress: bool = True) -> tuple[nn.Module, dict[str, list[float]]]:
    """Customise a copy of ``base`` (a plain denoiser) with a ``method`` adapter of ``rank``: the subject loss on
    ``exemplars`` (uint8) captioned ``"a <S> {class_word}"`` plus ``config.prior_weight`` × the same loss on
    ``prior_images`` (the base's own samples of ``prior_prompts``); the multi-step ε-loss, or the one-step
    student's loss when ``one_step``. AdamW at ``lr``, gradient clipping at 1.0."""
    torch.manual_seed(config.seed)
    model = plain_copy(base)
    inject(model, method, rank)
    model.train()
    subject_x0, prior_x0 = training_latents(backbone, exemplars), training_latents(backbone, prior_images)
    prompt = subject_prompt(config, token)
    check_subject_token(backbone.tokenizer, token, prompt, backbone.max_length)
    subject_cond = backbone.encode_prompts([prompt])
    prior_cond = backbone.encode_prompts(prior_prompts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    log: dict[str, list[float]] = {"step": [], "loss": [], "subject": [], "prior": []}
    for step in tqdm(range(config.steps), desc=f"DreamBooth ({method})", mininterval=5.0, disable=not progress):
        set_lr(optimizer, lr)
        chosen = torch.randint(len(subject_x0), (config.batch_size,), generator=generator)
        prior = torch.randint(len(prior_x0), (config.batch_size,), generator=generator)
        subject = _denoising_loss(model, backbone, subject_x0[chosen], subject_cond.expand(len(chosen), -1, -1),
                                  one_step, generator)
        kept = _denoising_loss(model, backbone, prior_x0[prior], prior_cond[prior], one_step, generator)
        loss = subject + config.prior_weight * kept
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DreamBooth loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for key, value in (("step", step), ("loss", loss.item()), ("subject", subject.item()),
                           ("prior", kept.item())):
            log[key].append(float(value))
    return model.requires_grad_(False).eval(), log


def generate(base_name: str, model: nn.Module, backbone, prompts: list[str], num_inference_steps: int,
             guidance_scale: float, seed: int) -> torch.Tensor:
    """Images in [0, 1] of a (customised) denoiser: DDIM + CFG with ``model`` as the teacher (``"teacher"``), or
    one step (``"student"``, :func:`wadi_core.distill.one_step_generate`)."""
    from ..distill import one_step_generate

    if base_name == "student":
        return one_step_generate(model, backbone, prompts, seed)
    return dataclasses.replace(backbone, denoiser=model).sample(prompts, num_inference_steps, guidance_scale, seed,
                                                                progress=False)


def load_or_train_dreambooth(profile: Profile, backbone, base: nn.Module, base_name: str, method: str, rank: int,
                             exemplars: torch.Tensor, token: str, lr: float, progress: bool = True) -> TrainedModel:
    """The cached customisation of ``base`` (``base_name``: ``"teacher"``, the multi-step recipe, or
    ``"student"``, the one-step loss) by :func:`train_dreambooth`, with the base's own samples of
    :func:`class_prompts` (``profile.sampling``'s DDIM steps and CFG for the teacher) as the prior; keyed by the
    base's weights, the exemplars and the recipe. Only the adapter tensors are stored."""
    if base_name not in BASES:
        raise ValueError(f"unknown base {base_name!r}; choose one of {', '.join(BASES)}")
    config, sampling = profile.dreambooth, profile.sampling
    prior_prompts = class_prompts(config, config.prior_images)
    key = {"base": module_digest(base), "base_name": base_name, "method": method, "rank": rank, "lr": lr,
           "token": token, "exemplars": tensor_digest(exemplars), "prior_prompts": prior_prompts,
           "sampling": (sampling.num_inference_steps, sampling.guidance_scale),
           "dreambooth": fields_except(config, EVALUATION_FIELDS)}

    def build(_metadata):
        model = plain_copy(base)
        inject(model, method, rank)
        return model

    def train():
        prior = generate(base_name, base, backbone, prior_prompts, sampling.num_inference_steps,
                         sampling.guidance_scale, config.seed)
        prior = (prior * 255).round().to(torch.uint8)
        model, log = train_dreambooth(base, backbone, method, rank, exemplars, token, prior, prior_prompts, config,
                                      lr, one_step=base_name == "student", progress=progress)
        for adapter in adapter_modules(model).values():  # the adapter tensors are what the checkpoint stores
            for name, param in adapter.named_parameters():
                param.requires_grad_(not name.startswith("base_layer"))
        return model, log, {"method": method, "base": base_name}

    trained = load_or_train(DREAMBOOTH_KIND, key, build, train, config=config, trainable_only=True,
                            label=f"DreamBooth {method} on the {base_name}")
    trained.model.requires_grad_(False)
    return trained


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def what_features(reader, images: torch.Tensor) -> torch.Tensor:
    """The reader's translation-invariant "what" features (B, C) of images in [0, 1]: which shapes and colours."""
    return reader.what(images.float() * 2 - 1).amax(dim=(2, 3))


def subject_similarity(reader, images: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
    """Per image (B,): mean cosine similarity of its :func:`what_features` to the exemplars' (uint8), the analog of
    DreamBooth's DINO score."""
    generated = F.normalize(what_features(reader, images), dim=1)
    reference = F.normalize(what_features(reader, exemplars.float() / 255), dim=1)
    return (generated @ reference.T).mean(dim=1)


def color_and_position(images: torch.Tensor, threshold: float = 0.25) -> list[tuple[str | None, str | None]]:
    """Per image: (the palette colour nearest the mean of its object pixels, the position region of their
    centroid), the object pixels by :func:`wadi_core.tasks.object_mask`'s rule; (None, None) for an empty image."""
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255
    names = list(COLORS)
    mask = images.amax(dim=1) > threshold
    side = images.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(images.shape[-2]), torch.arange(side), indexing="ij")
    out = []
    for image, m in zip(images, mask):
        if not m.any():
            out.append((None, None))
            continue
        mean = image[:, m].mean(dim=1)
        color = names[int(((palette - mean) ** 2).sum(dim=1).argmin())]
        scale = 32 / side  # positions are defined at the 32-pixel reference
        cx, cy = (xs[m].float().mean().item() + 0.5) * scale, (ys[m].float().mean().item() + 0.5) * scale
        out.append((color, region_of(cx, cy)))
    return out


def cross_cells(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Per image (B, 3, 3): the object pixels' share of each cell of the 3 × 3 grid over the bounding box of the
    largest object (:func:`wadi_core.tasks.object_components`); zeros for an empty image. A plus sign
    fills the centre row and column and leaves the four corner cells empty; a square fills all nine."""
    out = torch.zeros(len(images), 3, 3)
    for i, (labels, sizes) in enumerate(object_components(images, threshold)):
        if not len(sizes):
            continue
        largest = labels == 1 + int(np.argmax(sizes))
        ys, xs = np.nonzero(largest)
        box = torch.from_numpy(largest[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]).float()
        out[i] = F.avg_pool2d(F.interpolate(box[None, None], size=(30, 30), mode="nearest"), 10)[0, 0]
    return out


def cross_rate(images: torch.Tensor, threshold: float = 0.25, corner_max: float = 0.4, arm_min: float = 0.6) -> float:
    """Share of images whose largest object reads as the subject's plus sign by :func:`cross_cells`: every corner
    cell at most ``corner_max`` filled, the centre and the four arm cells at least ``arm_min`` (subject shape)."""
    cells = cross_cells(images, threshold)
    corners = cells[:, [0, 0, 2, 2], [0, 2, 0, 2]]
    arms = cells[:, [0, 1, 1, 1, 2], [1, 0, 1, 2, 1]]
    return float(((corners.amax(dim=1) <= corner_max) & (arms.amin(dim=1) >= arm_min)).float().mean())


def prompt_fidelity(images: torch.Tensor, wanted: list[tuple[str, str]], threshold: float = 0.25) -> dict[str, float]:
    """Share of images whose colour, position, and both, match ``wanted`` (colour, position) by
    :func:`color_and_position`."""
    read = color_and_position(images, threshold)
    color = [r[0] == w[0] for r, w in zip(read, wanted)]
    position = [r[1] == w[1] for r, w in zip(read, wanted)]
    return {"colour": float(np.mean(color)), "position": float(np.mean(position)),
            "colour and position": float(np.mean([c and p for c, p in zip(color, position)]))}


def adapter_weight_change(base: nn.Module, customised: nn.Module) -> dict[str, float]:
    """All-layer mean direction change (1 − cos) and norm change of the adapted Linears, merged, against ``base``
    (notebook 01's :func:`~wadi_core.analysis.weights.weight_changes`), and the trainable parameters."""
    names = {f"{name}.weight" for name in adapter_modules(customised)}
    merged = merged_copy(customised)
    summary = summarize_changes(weight_changes(base, merged, layers=lambda n: n in names, progress=False))
    trainable = sum(p.numel() for m in adapter_modules(customised).values() for n, p in m.named_parameters()
                    if not n.startswith("base_layer"))
    return {"direction change": summary["direction_mean"], "norm change": summary["norm_mean"],
            "trainable parameters": trainable}

