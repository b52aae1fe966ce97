"""The report's index and pages without a browser (tests/test_report_browser.py opens them in Chromium): cards,
claims, figures, manifest facts and links, on a two-notebook miniature and on the committed notebooks."""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from wadi_core import report
from wadi_core.artifacts import REPO_ROOT
from wadi_core.paper_numbers import PAPER_TITLE, PAPER_URL
from wadi_core.reproduce import discover_notebooks

# A 1x1 PNG.
PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Links(HTMLParser):
    """Every href and src of a page, the ids it defines and its <script> tags."""

    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.ids, self.scripts = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "href" in attrs:
            self.hrefs.append(attrs["href"])
        if "src" in attrs:
            self.srcs.append(attrs["src"])
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "script":
            self.scripts.append(attrs)


def _parse(page: str) -> _Links:
    links = _Links()
    links.feed(page)
    return links


def _unresolved(links: _Links, page_dir: Path) -> list[str]:
    """The relative hrefs/srcs that name no file from ``page_dir`` (in-page anchors checked against the ids)."""
    bad = []
    for url in links.hrefs + links.srcs:
        if url.startswith("#"):
            if unquote(url[1:]) not in links.ids:
                bad.append(url)
        elif not url.startswith(("https://", "data:")):
            if url.startswith(("/", "file:")) or not (page_dir / unquote(url.partition("#")[0])).exists():
                bad.append(url)
    return bad


def _write_notebook(path: Path, markdown: str, with_image: bool) -> None:
    cell = new_code_cell("plot()", execution_count=1)
    if with_image:
        cell.outputs = [new_output("display_data", data={"image/png": base64.b64encode(PIXEL_PNG).decode()})]
    nbformat.write(new_notebook(cells=[new_markdown_cell(markdown), cell]), path)


@pytest.fixture
def mini(tmp_path: Path) -> dict[str, Path]:
    """Two notebooks (00 with claims, figures and a docs link; 01 with nothing), results/ and a manifest."""
    notebooks, results, docs = tmp_path / "notebooks", tmp_path / "results", tmp_path / "docs"
    for folder in (notebooks, results / "tables", results / "figures", docs):
        folder.mkdir(parents=True)
    (docs / "design.md").write_text("# Design\n\n## Profiles\n")
    _write_notebook(
        notebooks / "00_alpha.ipynb",
        "# 00 — Alpha world\n\n**Reproduces:** Fig. 9 of the paper ([notes](../docs/design.md#profiles)).\n\n"
        "More text.",
        with_image=True,
    )
    _write_notebook(notebooks / "01_beta.ipynb", "# 01 — Beta\n\nFirst paragraph.\n\nSecond.", with_image=False)
    with open(results / "tables" / "00_claims.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["claim", "paper", "measured", "holds"])
        writer.writerows([["x beats y", "1 vs 2", "3 vs 4", "True"], ["z < 1", "0.5", "2.0", "False"]])
        writer.writerow(["open question", "?", "n/a", ""])
    (results / "tables" / "00_other.csv").write_text("a\n1\n")
    (results / "tables" / "benchmarks_speed.csv").write_text("a\n1\n")
    for name in ("00_aaa.png", "00_main.png", "00_main.pdf"):
        (results / "figures" / name).write_bytes(PIXEL_PNG)
    manifest = {
        "profile": "tiny",
        "git": {"commit": COMMIT, "dirty": False},
        "python": "3.11.7",
        "platform": "Linux-test",
        "torch_threads": 2,
        "seeds": {"world": 0, "teacher": 2},
        "packages": {"nbconvert": "7.17.2"},
        "updated_at": "2026-01-01T00:00:00+00:00",
        "notebooks": {"00_alpha": {"status": "ok", "profile": "tiny", "git_commit": COMMIT, "wall_time_s": 12.5}},
    }
    (results / "manifest.json").write_text(json.dumps(manifest))
    return {"notebooks": notebooks, "results": results, "out": results / "report"}


def test_index_has_the_paper_a_card_per_notebook_its_claims_figure_and_the_run(mini, monkeypatch):
    monkeypatch.setitem(report.MAIN_FIGURES, "00", "00_main")
    notebooks = list(discover_notebooks(mini["notebooks"]).values())
    mini["out"].mkdir()
    page = report.build_index(notebooks, mini["results"], mini["out"])
    links = _parse(page)

    assert PAPER_TITLE in page and PAPER_URL in links.hrefs and "CVPR 2026" in page
    assert {"nb-00", "nb-01", "run", "files"} <= links.ids
    assert "00 — Alpha world" in page and "01 — Beta" in page
    assert "<strong>Reproduces:</strong> Fig. 9" in page and "More text" not in page
    assert "First paragraph." in page and "Second." not in page  # no Reproduces paragraph: the first one
    assert "1 of 3 claims hold" in page
    assert page.count('class="holds-yes"') == 1 and page.count('class="holds-no"') == 1
    assert "no claims table (01_claims.csv)" in page
    assert links.srcs == ["../figures/00_main.png"]  # MAIN_FIGURES' choice, beside in results/figures
    for fact in (COMMIT, COMMIT[:12], "Linux-test", "3.11.7", "world 0, teacher 2", "12.5", "nbconvert", "7.17.2"):
        assert fact in page
    assert "not recorded" in page  # 01 has no manifest entry
    for name in ("00_claims.csv", "00_other.csv", "benchmarks_speed.csv", "00_aaa.png", "00_main.pdf"):
        assert sum(href.endswith(name) for href in links.hrefs) >= 1, name
    assert "../../docs/design.md#profiles" in links.hrefs  # the notebook's link, rewritten for results/report/
    assert "00_alpha.html" in links.hrefs and "01_beta.html" in links.hrefs
    assert not links.scripts
    (mini["out"] / "00_alpha.html").touch()
    (mini["out"] / "01_beta.html").touch()
    assert _unresolved(links, mini["out"]) == []


def test_main_figure_falls_back_to_the_first_png_by_name(tmp_path):
    figures = [tmp_path / name for name in ("07_b.pdf", "07_c.png", "07_d.png")]
    assert report.main_figure(figures, "07") == tmp_path / "07_c.png"
    assert report.main_figure(figures[:1], "07") is None


def test_render_notebook_embeds_images_drops_cdn_scripts_and_relinks(mini):
    mini["out"].mkdir()
    page_path = report.render_notebook(mini["notebooks"] / "00_alpha.ipynb", mini["out"])
    page = page_path.read_text()
    links = _parse(page)
    assert page_path == mini["out"] / "00_alpha.html"
    assert not [s for s in links.scripts if "src" in s], "a <script src=...> would fetch from a CDN"
    assert not [url for url in links.hrefs + links.srcs if url.startswith(("http:", "//"))]
    assert any(src.startswith("data:image/png;base64,") for src in links.srcs)
    assert "index.html" in links.hrefs and "../../docs/design.md#profiles" in links.hrefs
    assert not [host for host in ("cdnjs", "jsdelivr", "unpkg", "mathjax") if host in page.lower()]


def test_build_report_writes_index_and_pages_and_drops_stale_pages(mini):
    mini["out"].mkdir()
    (mini["out"] / "09_gone.html").write_text("old")
    pages = report.build_report(mini["notebooks"], mini["results"], mini["out"])
    assert [page.name for page in pages] == ["index.html", "00_alpha.html", "01_beta.html"]
    assert not (mini["out"] / "09_gone.html").exists()
    assert _unresolved(_parse(pages[0].read_text()), mini["out"]) == []


def test_relink_html_rewrites_only_relative_links_that_exist(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a b.md").write_text("x")
    source, out = tmp_path / "notebooks", tmp_path / "results" / "report"
    page = (
        '<a href="../docs/a%20b.md#sec">x</a><a href="https://arxiv.org/abs/1">p</a><a href="#top">t</a>'
        '<img src="data:image/png;base64,AA"><a href="../docs/missing.md">m</a>'
    )
    relinked = report.relink_html(page, source, out)
    assert '<a href="../../docs/a%20b.md#sec">' in relinked
    for kept in ('href="https://arxiv.org/abs/1"', 'href="#top"', 'src="data:image/png;base64,AA"',
                 'href="../docs/missing.md"'):
        assert kept in relinked


def test_read_claims_parses_holds_and_rejects_bad_tables(tmp_path):
    good = tmp_path / "03_claims.csv"
    good.write_text("claim,paper,measured,holds\na,1,2,True\nb,1,2,\n")
    assert [c.holds for c in report.read_claims(good)] == [True, None]
    missing = tmp_path / "04_claims.csv"
    missing.write_text("claim,paper,measured\na,1,2\n")
    with pytest.raises(ValueError, match=r"ONLY=04 make reproduce"):
        report.read_claims(missing)
    odd = tmp_path / "05_claims.csv"
    odd.write_text("claim,paper,measured,holds\na,1,2,maybe\n")
    with pytest.raises(ValueError, match="True, False or empty"):
        report.read_claims(odd)


def test_missing_manifest_says_to_run_make_reproduce(mini, capsys):
    (mini["results"] / "manifest.json").unlink()
    argv = ["--notebooks-dir", str(mini["notebooks"]), "--results-dir", str(mini["results"])]
    assert report.main(argv) == 1
    assert "manifest.json not found; run `make reproduce`" in capsys.readouterr().err


def test_index_of_the_committed_notebooks_has_every_card_claim_and_link(tmp_path):
    notebooks = list(discover_notebooks(REPO_ROOT / "notebooks").values())
    results = REPO_ROOT / "results"
    out = tmp_path / "report"
    out.mkdir()
    page = report.build_index(notebooks, results, out)
    links = _parse(page)
    for notebook in notebooks:
        notebook_id = notebook.name[:2]
        assert f"nb-{notebook_id}" in links.ids
        claims = report.read_claims(results / "tables" / f"{notebook_id}_claims.csv")
        assert f"of {len(claims)} claims hold" in page
        (out / f"{notebook.stem}.html").touch()  # the pages build_report renders beside the index
    assert len(links.srcs) == len(notebooks)  # one main figure per card
    csv_links = {Path(unquote(href)).name for href in links.hrefs if href.endswith(".csv")}
    assert csv_links == {path.name for path in (results / "tables").glob("*.csv")}
    png_links = {Path(unquote(href)).name for href in links.hrefs if href.endswith(".png")}
    assert png_links == {path.name for path in (results / "figures").glob("*.png")}
    assert _unresolved(links, out) == []
