"""Shared fixtures."""

import pytest
import torch

from wadi_core.profiles import get_profile


@pytest.fixture(scope="module")
def smoke_profile(tmp_path_factory):
    """The smoke profile, its artifacts trained into (and loaded from) a temporary data directory for the whole
    module, never the repository's ``data/``, and its scratch files in a temporary cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        mp.setenv("WADI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("WADI_FRESH", raising=False)
        mp.delenv("WADI_NO_TRAIN", raising=False)
        yield get_profile("smoke")


@pytest.fixture(scope="module")
def sd15_smoke_student(smoke_profile, tmp_path_factory):
    """(the smoke profile, the random-weight SD1.5-structured backbone, a LoRaD student of it whose adapters are
    non-zero, so that it differs from the teacher); built in a temporary cache directory."""
    from wadi_core.adapters import inject
    from wadi_core.backbones import load_backbone

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        backbone = load_backbone("smoke-sd15")
        student = load_backbone("smoke-sd15").denoiser
    inject(student, "lorad", rank=2)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if param.requires_grad:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return smoke_profile, backbone, student
