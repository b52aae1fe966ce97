"""Figures and tables land in ``WADI_RESULTS_DIR`` in every format, whole or not at all."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from wadi_core import reporting


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_RESULTS_DIR", str(tmp_path))
    yield tmp_path
    plt.close("all")


def _table() -> pd.DataFrame:
    return pd.DataFrame({"method": ["lora", "lorad"], "fid": [14.123456, 12.5], "steps": [1000, 1000]})


def test_every_method_has_a_colour_and_a_label():
    assert set(reporting.METHOD_COLORS) == set(reporting.METHOD_LABELS)
    assert {"teacher", "full", "lora", "dora", "dora_frozen_norm", "lorad"} <= set(reporting.METHOD_COLORS)
    assert len(set(reporting.METHOD_COLORS.values())) == len(reporting.METHOD_COLORS)


def test_set_theme_sets_modest_inline_dpi():
    reporting.set_theme()
    assert matplotlib.rcParams["figure.dpi"] == 80
    assert matplotlib.rcParams["savefig.dpi"] == 150


def test_save_figure_writes_png_and_pdf(results):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0], color=reporting.METHOD_COLORS["lorad"])
    paths = reporting.save_figure(fig, "99_demo")
    assert paths == [results / "figures" / "99_demo.png", results / "figures" / "99_demo.pdf"]
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    assert paths[1].read_bytes().startswith(b"%PDF")


def test_save_figure_rejects_paths_and_suffixes(results):
    fig, _ = plt.subplots()
    for bad in ("sub/99_demo", "99_demo.png", ""):
        with pytest.raises(ValueError, match="bare file stem"):
            reporting.save_figure(fig, bad)


def test_save_table_round_trips_csv_and_formats_md_and_tex(results):
    df = _table()
    paths = reporting.save_table(df, "demo", caption="FID on coco14-like", float_format=".2f")
    assert [p.name for p in paths] == ["demo.csv", "demo.md", "demo.tex"]
    pd.testing.assert_frame_equal(pd.read_csv(paths[0]), df)  # full precision in the CSV
    markdown, latex = paths[1].read_text(), paths[2].read_text()
    assert "14.12" in markdown and "12.50" in markdown and "Table: FID on coco14-like" in markdown
    assert "14.12" in latex and r"\caption{FID on coco14-like}" in latex and r"\label{tab:demo}" in latex


def test_save_table_escapes_latex_and_keeps_a_named_index(results):
    df = _table().set_index("method").rename(index={"lora": "dora_frozen_norm"})
    csv, _, tex = reporting.save_table(df, "indexed")
    pd.testing.assert_frame_equal(pd.read_csv(csv, index_col="method"), df)
    assert r"dora\_frozen\_norm" in tex.read_text()


def test_failed_save_leaves_no_partial_file(results, monkeypatch):
    reporting.save_table(_table(), "kept")  # an earlier good version must survive
    before = (results / "tables" / "kept.csv").read_text()
    write_text = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="disk full"):
        patch.setattr(Path, "write_text", write_half_then_fail)
        reporting.save_table(_table().assign(fid=0.0), "kept")
    assert (results / "tables" / "kept.csv").read_text() == before
    assert sorted(p.name for p in (results / "tables").iterdir()) == ["kept.csv", "kept.md", "kept.tex"]

    def savefig_half_then_fail(path, **kwargs):
        Path(path).write_bytes(b"%PDF-trunc")
        raise OSError("disk full")

    fig, _ = plt.subplots()
    monkeypatch.setattr(fig, "savefig", savefig_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        reporting.save_figure(fig, "broken")
    assert not list((results / "figures").iterdir())


def test_image_grid_figure_tiles_with_labels():
    images = torch.rand(5, 3, 32, 32)
    fig = reporting.image_grid_figure(images, nrow=2, row_labels=["lora", "lorad"], col_labels=["a", "b", "c"])
    ax = fig.axes[0]
    canvas = ax.get_images()[0].get_array()
    assert canvas.shape == ((2 * 33 - 1) * 3, (3 * 33 - 1) * 3, 3)  # 2x3 tiles of 32 px + 1 px gaps, upscaled 3x
    assert np.allclose(canvas[-3:, -3:], 1.0)  # the sixth cell is empty (white)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["lora", "lorad"]
    with pytest.raises(ValueError, match="column labels"):
        reporting.image_grid_figure(images, nrow=2, col_labels=["a"])
    with pytest.raises(ValueError, match="shape"):
        reporting.image_grid_figure(np.zeros((2, 32, 32)), nrow=1)


def test_claims_table_saves_nn_claims_with_paper_measured_holds(results):
    claims = reporting.claims_table([
        reporting.Claim("LoRaD beats LoRA", "20.86 vs 25.27", "60.0 vs 76.1", np.bool_(True)),
        ("GPU kernel speed", "≥ 2×", "not measured on a CPU", None),
    ], "03")
    assert list(claims.columns) == ["paper", "measured", "holds"] and claims.index.name == "claim"
    assert claims["holds"].tolist() == [True, None]
    saved = pd.read_csv(results / "tables" / "03_claims.csv", index_col=0)
    assert saved.loc["LoRaD beats LoRA", "measured"] == "60.0 vs 76.1"
    assert (results / "tables" / "03_claims.md").read_text().startswith("| claim")


def test_claims_table_rejects_bad_input(results):
    with pytest.raises(ValueError, match="two-digit notebook number"):
        reporting.claims_table([("a", "b", "c", True)], "3")
    with pytest.raises(TypeError, match="'holds' must be a bool or None"):
        reporting.claims_table([("a", "b", "c", "yes")], "03")
    with pytest.raises(ValueError, match="duplicate claims"):
        reporting.claims_table([("a", "b", "c", True), ("a", "b", "d", False)], "03")
    with pytest.raises(ValueError, match="at least one claim"):
        reporting.claims_table([], "03")
