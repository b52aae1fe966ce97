"""Paper backbones: architecture configs give the paper's parameter and layer counts (WaDi Table 1).

Everything is built on the ``meta`` device (no weights, no memory) and no test touches the network.
"""

from __future__ import annotations

import socket

import huggingface_hub.constants
import pytest
import torch

from wadi_core.adapters.inject import UNET_BLOCK_PREFIXES
from wadi_core.backbones import PipelineLoadError
from wadi_core.backbones.paper import (
    PAPER_BACKBONES,
    build_meta_model,
    count_linear_layers,
    count_parameters,
    load_config,
    load_paper_backbone,
)

# name -> (parameters, Linears adapted by the official student rule); Table 1's "#Params" column.
EXPECTED = {
    "sd15": (859_520_964, 182),
    "sd21-base": (865_910_724, 214),
    "pixart-alpha-256": (610_856_096, 286),  # 610.86M
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def meta_model(request):
    return request.param, build_meta_model(request.param)


def test_every_backbone_has_an_expectation():
    assert set(PAPER_BACKBONES) == set(EXPECTED)


def test_meta_model_parameter_total(meta_model):
    name, model = meta_model
    assert count_parameters(model) == EXPECTED[name][0]


def test_meta_model_allocates_nothing(meta_model):
    _, model = meta_model
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_student_rule_linear_count(meta_model):
    name, model = meta_model
    prefixes = None if name.startswith("pixart") else UNET_BLOCK_PREFIXES
    assert count_linear_layers(model, prefixes) == EXPECTED[name][1]


def test_unet_has_linears_outside_the_adapted_blocks():
    # time_embedding.linear_1/linear_2 sit outside down/mid/up blocks and are not adapted (§3.2).
    model = build_meta_model("sd15")
    assert count_linear_layers(model) == count_linear_layers(model, UNET_BLOCK_PREFIXES) + 2
    assert count_linear_layers(model, ("time_embedding",)) == 2


def test_pixart_config_is_the_256px_model():
    config = load_config("pixart-alpha-256")
    assert (config["sample_size"], config["patch_size"], config["out_channels"]) == (32, 2, 8)
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (28, 16, 72)
    assert config["norm_type"] == "ada_norm_single"
    assert PAPER_BACKBONES["pixart-alpha-256"].resolution == 8 * config["sample_size"]


def test_paper_ranks():
    assert {n: (s.student_rank, s.fake_rank) for n, s in PAPER_BACKBONES.items()} == {
        "sd15": (256, 32),
        "sd21-base": (256, 32),
        "pixart-alpha-256": (128, 32),
    }


@pytest.mark.parametrize("call", [load_config, build_meta_model, load_paper_backbone])
def test_unknown_name_lists_allowed_names(call):
    with pytest.raises(ValueError, match="unknown paper backbone 'sd3'.*sd15, sd21-base, pixart-alpha-256"):
        call("sd3")


def test_load_offline_without_cache_raises_clear_error(monkeypatch, tmp_path):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)  # recorded: library code may swallow the error raised below
        raise OSError("network blocked in this test")

    # As in a process started with HF_HUB_OFFLINE=1: huggingface_hub reads the variable once, at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(PipelineLoadError, match=r"stable-diffusion-v1-5/stable-diffusion-v1-5 is not in the local "
                                                r"model-hub cache and HF_HUB_OFFLINE=1 forbids") as info:
        load_paper_backbone("sd15", device="cpu", dtype=torch.float32)
    assert isinstance(info.value.__cause__, OSError)
    assert attempts == []  # only the (empty) cache was read


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_load_without_gpu_raises_clear_error():
    with pytest.raises(PipelineLoadError, match=r"device 'cuda' requested but CUDA is not available"):
        load_paper_backbone("pixart-alpha-256", device="cuda")
