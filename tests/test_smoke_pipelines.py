"""Smoke pipelines: stock diffusers loads and runs them offline; the SD1.5 / SD2.1-base / PixArt-α structure; the
layer rules of the official ``register_hooks`` / ``register_hooks_teacher``; deterministic, cached builds."""

import copy
import socket
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PixArtAlphaPipeline, StableDiffusionPipeline
from torch import nn

from wadi_core.adapters import inject
from wadi_core.backbones import smoke
from wadi_core.backbones.paper import load_config
from wadi_core.backbones.smoke import SMOKE_KINDS, build_smoke_pipeline, smoke_pipeline
from wadi_core.backbones.tiny import SD15_SCHEDULER_CONFIG

PIPELINE_CLASS = {"sd15": StableDiffusionPipeline, "sd21-base": StableDiffusionPipeline,
                  "pixart-alpha-256": PixArtAlphaPipeline}
UNET_KINDS = ("sd15", "sd21-base")
SIZE_KEYS = {"block_out_channels", "layers_per_block", "norm_num_groups", "sample_size", "cross_attention_dim",
             "attention_head_dim", "num_attention_heads", "num_layers", "caption_channels"}
OFFICIAL_SKIP = ("proj_in", "proj_out", "time_emb_proj")  # register_hooks_teacher leaves these out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    return {kind: build_smoke_pipeline(kind, root / kind) for kind in SMOKE_KINDS}


@pytest.fixture(scope="module")
def pipelines(folders):
    return {kind: DiffusionPipeline.from_pretrained(folder) for kind, folder in folders.items()}


def denoiser_of(pipeline) -> nn.Module:
    return pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", SMOKE_KINDS)
def test_stock_diffusers_loads_and_generates_offline(folders, kind, monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    pipeline = DiffusionPipeline.from_pretrained(folders[kind])
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline) is PIPELINE_CLASS[kind]
    extra = dict(use_resolution_binning=False, clean_caption=False) if kind == "pixart-alpha-256" else {}
    images = pipeline("a red circle left of a blue square", num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **extra).images
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert attempts == []


@pytest.mark.parametrize("kind", SMOKE_KINDS)
def test_denoiser_config_is_the_hub_config_but_for_sizes(pipelines, kind):
    config = denoiser_of(pipelines[kind]).config
    hub = {k: v for k, v in load_config(kind).items() if k in config and k not in SIZE_KEYS and k[0] != "_"}
    assert len(hub) >= 10
    assert {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in hub.items()} == {
        k: list(config[k]) if isinstance(config[k], (list, tuple)) else config[k] for k in hub
    }


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_sd_unet_structure(pipelines, kind):
    pipeline = pipelines[kind]
    unet = pipeline.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (4, 4, 16)
    assert unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    projections = [m for n, m in unet.named_modules() if n.endswith((".proj_in", ".proj_out"))]
    assert len(projections) == 2 * (3 + 1 + 3 * 2)  # a transformer per down resnet, mid, up resnet (2 per block)
    if kind == "sd15":  # SD1.5: 1×1 convolutions, 2 heads at every level (SD1.5: 8)
        assert all(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in projections)
        assert {a.heads for n, a in unet.named_modules() if n.endswith(".attn1")} == {2}
    else:  # SD2.1: Linear projections, heads grow with width so every head is equally wide (SD2.1: 64)
        assert all(isinstance(m, nn.Linear) for m in projections)
        attentions = [a for n, a in unet.named_modules() if n.endswith(".attn1")]
        assert {a.heads for a in attentions} == {1, 2, 4}
        assert {a.to_q.out_features // a.heads for a in attentions} == {16}
    assert pipeline.tokenizer.model_max_length == pipeline.text_encoder.config.max_position_embeddings == 77
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_sd_scheduler_is_sd15s(pipelines, kind):
    scheduler = pipelines[kind].scheduler
    assert type(scheduler).__name__ == "PNDMScheduler"
    assert {k: scheduler.config[k] for k in SD15_SCHEDULER_CONFIG if k in scheduler.config} == {
        k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k in scheduler.config
    }
    assert scheduler.alphas_cumprod[999].item() == pytest.approx(0.0047, abs=5e-5)


def test_vae_is_a_two_level_sd_autoencoder(pipelines):
    for pipeline in pipelines.values():
        vae = pipeline.vae
        assert pipeline.vae_scale_factor == 2 and vae.config.sample_size == 32
        assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215


def test_pixart_structure(pipelines):
    pipeline = pipelines["pixart-alpha-256"]
    transformer = pipeline.transformer
    assert transformer.config.norm_type == "ada_norm_single"
    assert transformer.config.out_channels == 2 * transformer.config.in_channels == 8  # learned sigma
    assert (transformer.config.patch_size, transformer.config.sample_size) == (2, 16)
    assert transformer.config.caption_channels == pipeline.text_encoder.config.d_model
    assert not transformer.use_additional_conditions  # PixArt-α 256 has none either (only sample_size 128)
    assert len(transformer.transformer_blocks) == 2
    assert isinstance(pipeline.scheduler, DPMSolverMultistepScheduler)
    assert pipeline.scheduler.config.beta_schedule == "linear"
    assert pipeline.scheduler.betas[0].item() == pytest.approx(1e-4)
    assert pipeline.scheduler.betas[-1].item() == pytest.approx(0.02)
    tokenizer = pipeline.tokenizer
    assert tokenizer.model_max_length == 120
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer("a red circle").input_ids[-1] == tokenizer.eos_token_id


def official_layers(denoiser: nn.Module, kind: str, rule: str) -> list[str]:
    """The Linears the official hooks select: ``register_hooks`` (student) / ``register_hooks_teacher`` (fake)
    of ``train_dkd_sd.py`` and ``train_dkd_dit.py``."""
    linears = [name for name, module in denoiser.named_modules() if isinstance(module, nn.Linear)]
    if kind in UNET_KINDS:
        chosen = [n for n in linears if n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]
    else:
        chosen = linears if rule == "student" else [n for n in linears if n.startswith("transformer_blocks.")]
    if rule == "fake":
        chosen = [n for n in chosen if not any(skip in n for skip in OFFICIAL_SKIP)]
    return sorted(chosen)


def denoiser_output(denoiser: nn.Module, kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    timestep = torch.tensor([999])
    with torch.no_grad():
        if kind in UNET_KINDS:
            return denoiser(latents, timestep, encoder_hidden_states=text).sample
        return denoiser(latents, encoder_hidden_states=text, timestep=timestep,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


@pytest.mark.parametrize("rule", ["student", "fake"])
@pytest.mark.parametrize("kind", SMOKE_KINDS)
def test_lorad_adapts_the_official_hook_layers(pipelines, kind, rule):
    denoiser = denoiser_of(pipelines[kind])
    expected = official_layers(denoiser, kind, rule)
    adapted = copy.deepcopy(denoiser)
    assert inject(adapted, "lorad", rank=2, rule=rule) == expected
    assert torch.allclose(denoiser_output(adapted, kind), denoiser_output(denoiser, kind), atol=1e-5)  # W' = W


def test_layer_rules_differ_where_the_backbones_do(pipelines):
    sd15, sd21, pixart = (denoiser_of(pipelines[kind]) for kind in SMOKE_KINDS)
    assert not any("proj_in" in n for n in official_layers(sd15, "sd15", "student"))  # convolutions
    assert any(n.endswith(".proj_in") for n in official_layers(sd21, "sd21-base", "student"))
    assert not any("proj_in" in n for n in official_layers(sd21, "sd21-base", "fake"))
    assert any(n.endswith("time_emb_proj") for n in official_layers(sd15, "sd15", "student"))
    pixart_student = official_layers(pixart, "pixart-alpha-256", "student")
    assert "proj_out" in pixart_student and any(n.startswith("adaln_single.") for n in pixart_student)
    assert all(n.startswith("transformer_blocks.") for n in official_layers(pixart, "pixart-alpha-256", "fake"))


@pytest.mark.parametrize("kind", SMOKE_KINDS)
def test_same_seed_same_bytes(folders, kind, tmp_path):
    assert folder_bytes(build_smoke_pipeline(kind, tmp_path / "again")) == folder_bytes(folders[kind])
    other = folder_bytes(build_smoke_pipeline(kind, tmp_path / "seed1", seed=1))
    weights = "transformer" if kind == "pixart-alpha-256" else "unet"
    name = f"{weights}/diffusion_pytorch_model.safetensors"
    assert other[name] != folder_bytes(folders[kind])[name]


def counting_builds(monkeypatch) -> list[str]:
    calls = []

    def counted(kind, folder, seed=0):
        calls.append(kind)
        return build(kind, folder, seed)

    build = smoke.build_smoke_pipeline
    monkeypatch.setattr(smoke, "build_smoke_pipeline", counted)
    return calls


def test_smoke_pipeline_is_built_once_into_the_cache(folders, monkeypatch, tmp_path):
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path))
    calls = counting_builds(monkeypatch)
    folder = smoke_pipeline("pixart-alpha-256")
    assert folder == tmp_path / "smoke_pipelines" / "pixart-alpha-256-v2"
    assert calls == ["pixart-alpha-256"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the staging folder was renamed
    assert folder_bytes(folder) == folder_bytes(folders["pixart-alpha-256"])
    assert smoke_pipeline("pixart-alpha-256") == folder
    assert calls == ["pixart-alpha-256"]


def test_interrupted_build_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    def interrupted(kind, folder, seed=0):
        (Path(folder) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(smoke, "build_smoke_pipeline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smoke_pipeline("sd15")
    assert list((tmp_path / "smoke_pipelines").iterdir()) == []


def test_a_cache_folder_without_a_pipeline_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path))
    target = tmp_path / "smoke_pipelines" / "pixart-alpha-256-v2"
    target.mkdir(parents=True)
    (target / "junk.txt").write_text("not a pipeline")
    with pytest.raises(RuntimeError, match="holds no pipeline .* delete it"):
        smoke_pipeline("pixart-alpha-256")
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert [p.name for p in target.iterdir()] == ["junk.txt"]


def test_unknown_kind_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path))
    for call in (lambda: build_smoke_pipeline("sdxl", tmp_path / "x"), lambda: smoke_pipeline("sdxl")):
        with pytest.raises(ValueError, match="'sdxl'; choose one of sd15, sd21-base, pixart-alpha-256"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_occupied_folder_is_rejected_untouched(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    (tmp_path / "a_file").write_text("keep")
    for occupied in (tmp_path / "taken", tmp_path / "a_file"):
        with pytest.raises(ValueError, match="is not an empty folder; give a new or empty folder"):
            build_smoke_pipeline("pixart-alpha-256", occupied)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a_file", "taken", "taken/notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_smoke_pipeline("pixart-alpha-256", empty) / "model_index.json").is_file()
