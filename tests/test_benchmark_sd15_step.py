"""The SD1.5 step benchmark (``python -m wadi_core.benchmarks sd15-step``) on a scaled-down SD1.5 U-Net: each variant
trains what it says, the saved-for-backward bytes order as expected, the GPU check's settings (batch, fp16 autocast)
run the same code path on the CPU, CUDA is refused clearly without a GPU, and the command line writes its table from
fresh processes. Timings are never asserted."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

from wadi_core.adapters import count_trainable, inject
from wadi_core.benchmarks import sd15_step
from wadi_core.benchmarks.__main__ import main

RANK = 4
QUICK = dict(rank=RANK, text_tokens=sd15_step.QUICK_TEXT_TOKENS, repeats=1,
             unet_overrides=sd15_step.QUICK_UNET_OVERRIDES)
RESULT_NAME = re.compile(r"^(\d\d|benchmarks)_[a-z0-9_.-]+$")  # as tests/test_results_layout.py requires


@pytest.fixture(scope="module")
def rows():
    threads = torch.get_num_threads()
    try:
        return {variant: sd15_step.measure_variant(variant, **QUICK) for variant in sd15_step.VARIANTS}
    finally:
        torch.set_num_threads(threads)


def test_the_unet_is_the_bundled_sd15_architecture():
    unet = sd15_step.sd15_unet(sd15_step.QUICK_UNET_OVERRIDES)
    assert unet.config.in_channels == 4 and list(unet.config.down_block_types) == [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]


def test_each_variant_trains_what_it_says(rows):
    lorad = sd15_step.sd15_unet(sd15_step.QUICK_UNET_OVERRIDES)
    total = sum(p.numel() for p in lorad.parameters())
    inject(lorad, "lorad", RANK, "student")
    assert rows["lorad"]["trainable_params"] == rows["official_hook"]["trainable_params"] == count_trainable(lorad)
    assert rows["full"]["trainable_params"] == total
    assert rows["frozen"]["trainable_params"] == 0


def test_lorad_runs_the_reference_backend_on_the_cpu(rows):
    assert rows["lorad"]["lorad_backend"] == "reference"
    assert all(rows[variant]["lorad_backend"] is None for variant in ("official_hook", "full", "frozen"))
    assert not any("cuda_peak_GiB" in row for row in rows.values())  # CUDA memory only where measured


def test_saved_bytes_frozen_none_lorad_at_most_full_hook_more(rows):
    saved = {variant: row["saved_for_backward_GiB"] for variant, row in rows.items()}
    assert saved["frozen"] == 0
    assert 0 < saved["lorad"] <= saved["full"] < saved["official_hook"]
    assert all(row["time_s"] > 0 and row["peak_rss_GiB"] > 0 and row["rss_after_build_GiB"] > 0
               for row in rows.values())


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown variant"):
        sd15_step.adapt(sd15_step.sd15_unet(sd15_step.QUICK_UNET_OVERRIDES), "lora", RANK)
    assert main(["sd15-step", "--variants", "lorad,lora"]) == 2


def test_the_gpu_checks_settings_run_on_the_cpu(rows):
    """Batch 2 under fp16 autocast (the GPU check's step at batch 16), the same code path on CPU tensors."""
    threads = torch.get_num_threads()
    try:
        row = sd15_step.measure_variant("lorad", **QUICK, batch_size=2, autocast="fp16", warmup=1)
    finally:
        torch.set_num_threads(threads)
    assert row["lorad_backend"] == "reference" and row["time_s"] > 0
    assert row["trainable_params"] == rows["lorad"]["trainable_params"]
    assert 0 < row["saved_for_backward_GiB"]


def test_bad_device_or_autocast_is_rejected():
    with pytest.raises(ValueError, match="autocast"):
        sd15_step.measure_variant("lorad", **QUICK, autocast="fp8")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        sd15_step.run_sd15_step_benchmark(("lorad",), quick=True, device="cuda")
    assert main(["sd15-step", "--quick", "--device", "cuda"]) == 2


def test_summary_is_relative_to_full_fine_tuning():
    table = pd.DataFrame({"time_s": [2.0, 4.0], "saved_for_backward_GiB": [1.0, 2.0], "peak_rss_GiB": [3.0, 6.0]},
                         index=pd.Index(["full", "lorad"], name="variant"))
    summary = sd15_step.summarise_sd15_step(table)
    assert list(summary.columns) == ["time_vs_full", "saved_vs_full", "peak_rss_vs_full"]
    assert summary.loc["lorad"].tolist() == [2.0, 2.0, 2.0] and summary.loc["full"].tolist() == [1.0, 1.0, 1.0]


def test_summary_against_the_official_hook_includes_cuda_memory():
    table = pd.DataFrame({"time_s": [1.0, 4.0], "cuda_peak_GiB": [10.0, 20.0]},
                         index=pd.Index(["lorad", "official_hook"], name="variant"))
    summary = sd15_step.summarise_sd15_step(table, "official_hook")
    assert summary.loc["lorad"].to_dict() == {"time_vs_official_hook": 0.25, "cuda_peak_vs_official_hook": 0.5}
    with pytest.raises(ValueError, match="'full' row"):
        sd15_step.summarise_sd15_step(table)


def test_table_names_follow_the_results_layout():
    stems = {sd15_step.table_stem(device, quick) for device in ("cpu", "cuda") for quick in (False, True)}
    assert stems == {"benchmarks_sd15_step", "benchmarks_sd15_step_quick", "benchmarks_gpu_sd15_step",
                     "benchmarks_gpu_sd15_step_quick"}
    assert all(RESULT_NAME.match(stem) for stem in stems)


def test_cli_quick_measures_each_variant_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_RESULTS_DIR", str(tmp_path))
    assert main(["sd15-step", "--quick", "--variants", "full", "--repeats", "1"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "benchmarks_sd15_step_quick.csv", index_col="variant")
    assert table.index.tolist() == ["full"]
    assert table.loc["full", "time_vs_full"] == 1.0
    assert table.loc["full", "peak_rss_GiB"] >= table.loc["full", "rss_after_build_GiB"] > 0
