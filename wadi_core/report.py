"""The browsable report of the executed companion: ``results/report/`` (``make report``).

One HTML page per numbered notebook, rendered from the committed, executed ``notebooks/NN_name.ipynb`` with
nbconvert's ``lab`` template minus every script that template fetches from a CDN (require.js, MathJax, mermaid,
widgets; LaTeX stays readable as text), and ``index.html``: the paper's title and arXiv link, the run facts of
``results/manifest.json``, one card per notebook (what it reproduces, from its first markdown cell; its claims table
``results/tables/NN_claims.csv``, written by :func:`wadi_core.reporting.claims_table`; its main figure) and links
to every table and figure. Pages embed their images; the index links the figures and tables where they lie, by
relative paths, so the report opens from disk with no network::

    python -m wadi_core.report                    # notebooks/ and results/ -> results/report/
    python -m wadi_core.report --out-dir DIR      # the same report elsewhere (links stay relative)

``make reproduce`` refreshes it after the notebooks ran. Nothing here executes a notebook.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

import jinja2
import nbformat
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import markdown2html_mistune

from wadi_core.artifacts import atomic_write_text, results_dir
from wadi_core.paper_numbers import PAPER_TITLE, PAPER_URL
from wadi_core.reporting import Claim
from wadi_core.reproduce import NOTEBOOKS_DIR, discover_notebooks

PAPER_VENUE = "CVPR 2026"
# The figure each card shows: the one that carries the notebook's main result. A notebook not listed gets its
# first figure by name.
MAIN_FIGURES = {
    "00": "00_teacher_vs_one_step",
    "01": "01_fig1a_norm_vs_direction",
    "02": "02_expressivity",
    "03": "03_student_samples",
    "04": "04_table1_bars",
    "05": "05_controlnet_mask_samples",
    "06": "06_kernel_bench_vs_floor",
}
OTHER_GROUP = "other"  # tables and figures that no notebook wrote (benchmarks_*)

# nbconvert's lab page without the scripts it loads from CDNs.
PAGE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
PAGE_TEMPLATE_NAME = "wadi_report_page.html.j2"
BACK_TO_INDEX = '<p style="margin: 1em 2em"><a href="index.html">&larr; report index</a></p>'
LINK_ATTRIBUTE = re.compile(r'(?P<attr>\b(?:href|src))="(?P<url>[^"]*)"')
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class NotebookSummary(NamedTuple):
    """What a card says about a notebook: its title and the paragraph saying what it reproduces (markdown)."""

    title: str
    reproduces: str


# --- reading the notebooks and results ---------------------------------------------------------------------


def notebook_summary(notebook: Path) -> NotebookSummary:
    """Title (the first ``# `` heading) and the "**Reproduces:**" paragraph of the notebook's first markdown cell
    (its first paragraph after the title when there is none), as the design's notebook shape puts them."""
    nb = nbformat.read(notebook, as_version=4)
    markdown = next((cell.source for cell in nb.cells if cell.cell_type == "markdown"), None)
    if markdown is None:
        raise ValueError(f"{notebook} has no markdown cell; its first cell should say what it reproduces")
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("#"):
        title, lines = lines[0].lstrip("#").strip(), lines[1:]
    else:
        title = notebook.stem
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
    reproduces = next((p for p in paragraphs if p.startswith("**Reproduces")), paragraphs[0] if paragraphs else "")
    return NotebookSummary(title, reproduces)


def read_claims(path: Path) -> list[Claim]:
    """The rows of a claims table written by :func:`wadi_core.reporting.claims_table` (``holds`` None where the
    table leaves it empty: a claim this run cannot measure)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"claim", "paper", "measured", "holds"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path} lacks the column(s) {sorted(missing)}; rerun its notebook "
                f"(ONLY={path.name[:2]} make reproduce) so that claims_table rewrites it"
            )
        holds = {"True": True, "False": False, "": None}
        rows = []
        for row in reader:
            if row["holds"] not in holds:
                raise ValueError(f"{path}: 'holds' must be True, False or empty, got {row['holds']!r}")
            rows.append(Claim(row["claim"], row["paper"], row["measured"], holds[row["holds"]]))
    return rows


def read_manifest(path: Path) -> dict:
    """``results/manifest.json`` as written by :mod:`wadi_core.reproduce`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        message = f"{path} not found; run `make reproduce` to execute the notebooks and record the run"
        raise FileNotFoundError(message) from None
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); run `make reproduce` to rewrite it") from err


def results_files(results: Path) -> dict[str, dict[str, list[Path]]]:
    """Every table (CSV) and figure (PNG, PDF) under ``results/``, grouped by the notebook number that starts its
    name (``OTHER_GROUP`` for the rest): ``{"00": {"tables": [...], "figures": [...]}, ...}``, sorted by name."""
    groups: dict[str, dict[str, list[Path]]] = {}
    for kind, suffixes in (("tables", {".csv"}), ("figures", {".png", ".pdf"})):
        folder = results / kind
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.suffix in suffixes:
                group = path.name[:2] if re.match(r"\d\d_", path.name) else OTHER_GROUP
                groups.setdefault(group, {"tables": [], "figures": []})[kind].append(path)
    return dict(sorted(groups.items()))


def main_figure(figures: list[Path], notebook_id: str) -> Path | None:
    """The PNG of ``MAIN_FIGURES[notebook_id]`` among ``figures``, else the first PNG by name, else None."""
    pngs = [path for path in figures if path.suffix == ".png"]
    wanted = MAIN_FIGURES.get(notebook_id)
    return next((path for path in pngs if path.stem == wanted), pngs[0] if pngs else None)


# --- links --------------------------------------------------------------------------------------------------


def relative_url(target: Path, page_dir: Path) -> str:
    """The relative URL from a page in ``page_dir`` to ``target`` (quoted, forward slashes)."""
    return quote(Path(os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())).as_posix())


def relink_html(page: str, source_dir: Path, page_dir: Path) -> str:
    """Rewrite the relative ``href``/``src`` URLs of HTML written for ``source_dir`` (a notebook's
    ``../docs/paper_notes.md#...``) so that they resolve from ``page_dir``; absolute URLs, data URIs and in-page
    anchors stay. A target that does not exist is left as written and reported on stderr."""

    def rewrite(match: re.Match) -> str:
        url = html.unescape(match["url"])
        if not url or url.startswith(("#", "/")) or URL_SCHEME.match(url):
            return match[0]
        path, _, fragment = url.partition("#")
        target = Path(os.path.normpath(Path(source_dir) / unquote(path)))
        if not target.exists():
            print(f"warning: {url} (linked from {source_dir}) does not exist", file=sys.stderr)
            return match[0]
        new_url = relative_url(target, page_dir) + (f"#{fragment}" if fragment else "")
        return f'{match["attr"]}="{html.escape(new_url)}"'

    return LINK_ATTRIBUTE.sub(rewrite, page)


# --- the pages ----------------------------------------------------------------------------------------------


def page_exporter() -> HTMLExporter:
    """nbconvert's HTML exporter on the lab template without CDN scripts (``PAGE_TEMPLATE``), images embedded."""
    return HTMLExporter(
        template_name="lab",
        template_file=PAGE_TEMPLATE_NAME,
        extra_loaders=[jinja2.DictLoader({PAGE_TEMPLATE_NAME: PAGE_TEMPLATE})],
        embed_images=True,
    )


def render_notebook(notebook: Path, out_dir: Path, exporter: HTMLExporter | None = None) -> Path:
    """Render the executed ``notebook`` as it is (nothing runs) to ``out_dir/NN_name.html``, its relative links
    rewritten for ``out_dir`` and a link back to the index on top; return that path."""
    exporter = exporter or page_exporter()
    nb = nbformat.read(notebook, as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    page = out_dir / f"{notebook.stem}.html"
    body = relink_html(body, notebook.parent, out_dir).replace("<main>", "<main>" + BACK_TO_INDEX, 1)
    atomic_write_text(page, body)
    return page


# --- the index ----------------------------------------------------------------------------------------------

INDEX_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
a { color: #0b5cad; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.2em 1.2em 0.8em; margin: 1.2em 0; }
.card h2 { font-size: 1.15em; }
.card-body { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 1.2em; }
@media (max-width: 900px) { .card-body { grid-template-columns: minmax(0, 1fr); } }
.card img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
.holds-yes { color: #1a7f37; font-weight: bold; }
.holds-no { color: #b42318; font-weight: bold; }
.note { color: #666; font-style: italic; }
code { font-size: 0.9em; }
"""


def _text(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _link(target: Path, page_dir: Path, label: str | None = None) -> str:
    return f'<a href="{html.escape(relative_url(target, page_dir))}">{_text(label or target.name)}</a>'


def claims_html(claims: list[Claim]) -> str:
    """A claims table: claim, paper, measured, holds? (yes / no / open), and how many hold."""
    marks = {True: ("holds-yes", "yes"), False: ("holds-no", "no"), None: ("note", "open")}
    rows = "".join(
        f'<tr><td>{_text(c.claim)}</td><td>{_text(c.paper)}</td><td>{_text(c.measured)}</td>'
        f'<td class="{marks[c.holds][0]}">{marks[c.holds][1]}</td></tr>'
        for c in claims
    )
    held = sum(c.holds is True for c in claims)
    return (
        f'<p>{held} of {len(claims)} claims hold in this run.</p><table class="claims">'
        f"<tr><th>claim</th><th>paper</th><th>measured</th><th>holds?</th></tr>{rows}</table>"
    )


def card_html(notebook: Path, results: Path, files: dict[str, list[Path]], out_dir: Path) -> str:
    """One notebook's card: title linking to its page, what it reproduces, its claims table and main figure."""
    notebook_id = notebook.name[:2]
    summary = notebook_summary(notebook)
    reproduces = relink_html(markdown2html_mistune(summary.reproduces), notebook.parent, out_dir)
    claims_path = results / "tables" / f"{notebook_id}_claims.csv"
    if claims_path.exists():
        claims = claims_html(read_claims(claims_path)) + f"<p>{_link(claims_path, out_dir)}</p>"
    else:
        claims = f'<p class="note">no claims table ({claims_path.name}); run ONLY={notebook_id} make reproduce</p>'
    figure = main_figure(files.get("figures", []), notebook_id)
    if figure:
        url = html.escape(relative_url(figure, out_dir))
        figure_html = (
            f'<figure><a href="{url}"><img src="{url}" alt="{_text(figure.stem)}"></a>'
            f"<figcaption>{_text(figure.name)}</figcaption></figure>"
        )
    else:
        figure_html = '<p class="note">no figure</p>'
    return (
        f'<section class="card" id="nb-{notebook_id}"><h2><a href="{quote(notebook.stem)}.html">'
        f'{_text(summary.title)}</a></h2><div class="card-body"><div>{reproduces}{claims}</div>'
        f'<div>{figure_html}<p><a href="{quote(notebook.stem)}.html">the executed notebook</a> &middot; '
        f"{_link(notebook, out_dir, notebook.name)}</p></div></div></section>"
    )


def _run_commit(manifest: dict, digits: int = 40) -> str:
    """The commit the manifest's last run started from, and whether the tree had uncommitted changes."""
    git = manifest.get("git") or {}
    return (git.get("commit") or "unknown")[:digits] + (" (with uncommitted changes)" if git.get("dirty") else "")


def manifest_html(manifest: dict, manifest_path: Path, notebooks: list[Path], out_dir: Path) -> str:
    """The run facts: profile, commit, when, interpreter, platform, seeds, package versions, wall time per notebook."""
    seeds = manifest.get("seeds") or {}
    facts = [
        ("profile", manifest.get("profile")),
        ("commit of the last run", _run_commit(manifest)),
        ("updated", manifest.get("updated_at")),
        ("python", manifest.get("python")),
        ("platform", manifest.get("platform")),
        ("torch threads", manifest.get("torch_threads")),
        ("seeds", ", ".join(f"{name} {value}" for name, value in seeds.items()) if seeds else None),
    ]
    fact_rows = "".join(f"<tr><th>{_text(name)}</th><td>{_text(value)}</td></tr>" for name, value in facts)
    packages = manifest.get("packages") or {}
    package_rows = "".join(f"<tr><td>{_text(name)}</td><td>{_text(v)}</td></tr>" for name, v in packages.items())
    entries = manifest.get("notebooks") or {}
    run_rows, total = [], 0.0
    for notebook in notebooks:
        entry = entries.get(notebook.stem)
        if entry is None:
            run_rows.append(f'<tr><td>{_text(notebook.stem)}</td><td colspan="5" class="note">not recorded</td></tr>')
            continue
        total += float(entry.get("wall_time_s") or 0.0)
        run_rows.append(
            f'<tr><td><a href="{quote(notebook.stem)}.html">{_text(notebook.stem)}</a></td>'
            f'<td>{_text(entry.get("status"))}</td><td>{_text(entry.get("profile"))}</td>'
            f'<td><code>{_text((entry.get("git_commit") or "")[:12])}</code></td>'
            f'<td>{_text(entry.get("wall_time_s"))}</td><td>{_text(entry.get("finished_at"))}</td></tr>'
        )
    return (
        f'<h2 id="run">The run</h2><p>{_link(manifest_path, out_dir)}, written by <code>make reproduce</code>:</p>'
        f"<table>{fact_rows}</table>"
        "<table><tr><th>notebook</th><th>status</th><th>profile</th><th>commit</th><th>wall time (s)</th>"
        f"<th>finished</th></tr>{''.join(run_rows)}"
        f"<tr><th>total</th><td></td><td></td><td></td><th>{total:.1f}</th><td></td></tr></table>"
        f"<details><summary>package versions ({len(packages)})</summary><table>{package_rows}</table></details>"
    )


def files_html(groups: dict[str, dict[str, list[Path]]], notebooks: list[Path], out_dir: Path) -> str:
    """Links to every table (CSV) and figure (PNG, PDF), one row per notebook and one for the rest."""
    names = {notebook.name[:2]: notebook.stem for notebook in notebooks}
    rows = []
    for group, files in groups.items():
        label = names.get(group, "other (make bench)" if group == OTHER_GROUP else f"notebook {group}")
        tables = ", ".join(_link(path, out_dir) for path in files["tables"]) or "none"
        figures = ", ".join(_link(path, out_dir) for path in files["figures"]) or "none"
        rows.append(f"<tr><th>{_text(label)}</th><td>{tables}</td><td>{figures}</td></tr>")
    header = '<h2 id="files">Every table and figure</h2><table><tr><th></th><th>tables</th><th>figures</th></tr>'
    return f"{header}{''.join(rows)}</table>"


def build_index(notebooks: list[Path], results: Path, out_dir: Path) -> str:
    """``index.html``: the paper, the run facts of ``results/manifest.json``, one card per notebook, every file."""
    manifest_path = results / "manifest.json"
    manifest = read_manifest(manifest_path)
    groups = results_files(results)
    cards = "".join(card_html(nb, results, groups.get(nb.name[:2], {}), out_dir) for nb in notebooks)
    contents = ", ".join(f'<a href="#nb-{nb.name[:2]}">{nb.name[:2]}</a>' for nb in notebooks)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(PAPER_TITLE)}: the executed companion</title><style>{INDEX_CSS}</style></head><body>"
        f"<h1>{_text(PAPER_TITLE)}</h1>"
        f'<p>{PAPER_VENUE}, <a href="{PAPER_URL}">arXiv {PAPER_URL.rsplit("/", 1)[-1]}</a>. The numbered notebooks '
        f"of this companion, executed at profile <code>{_text(manifest.get('profile'))}</code>: what each reproduces, "
        "its claims (paper value, measured value, holds?) and its main figure; each title opens the executed "
        "notebook.</p>"
        f"<p>Last run: commit {_text(_run_commit(manifest, 12))}, updated {_text(manifest.get('updated_at'))} "
        f'(<a href="#run">the run</a>, <a href="#files">every table and figure</a>). Notebooks: {contents}.</p>'
        f"{cards}"
        f"{manifest_html(manifest, manifest_path, notebooks, out_dir)}"
        f"{files_html(groups, notebooks, out_dir)}"
        "</body></html>\n"
    )


def build_report(notebooks_dir: Path, results: Path, out_dir: Path) -> list[Path]:
    """Render every numbered notebook and write ``index.html`` into ``out_dir``; pages of notebooks that no longer
    exist are removed. Returns the pages written, index first."""
    notebooks = list(discover_notebooks(notebooks_dir).values())
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    index = out_dir / "index.html"
    atomic_write_text(index, build_index(notebooks, results, out_dir))
    exporter = page_exporter()
    pages = [render_notebook(notebook, out_dir, exporter) for notebook in notebooks]
    for stale in set(out_dir.glob("[0-9][0-9]_*.html")) - set(pages):
        stale.unlink()
    return [index, *pages]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m wadi_core.report``."""
    parser = argparse.ArgumentParser(
        prog="python -m wadi_core.report",
        description="Render the executed notebooks and an index of their claims, figures and tables to HTML.",
    )
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help="default: notebooks/")
    parser.add_argument("--results-dir", type=Path, help="tables/, figures/, manifest.json (default: results/)")
    parser.add_argument("--out-dir", type=Path, help="where the report goes (default: <results-dir>/report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    results = args.results_dir or results_dir()
    out_dir = args.out_dir or results / "report"
    try:
        pages = build_report(args.notebooks_dir, results, out_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size_mb = sum(page.stat().st_size for page in pages) / 1e6
    print(f"report: {pages[0]} and {len(pages) - 1} notebook pages ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
