"""The report in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright without a browser
download of its own) opens ``index.html`` and every notebook page, built from the committed notebooks and results
into a temporary folder, and checks that every image loads, that nothing but ``file://`` URLs is requested, that
every link names an existing file and that no console error is printed. The index's screenshots go to
``results/report/`` (the README shows one)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image

from wadi_core.artifacts import REPO_ROOT
from wadi_core.report import build_report
from wadi_core.reproduce import NOTEBOOKS_DIR, discover_notebooks

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = os.environ.get("WADI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="the Python driver is absent: pip install -r requirements.txt"),
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium not found: apt-get install chromium (or set WADI_CHROMIUM=/path/to/it)"
    ),
]

SCREENSHOTS = REPO_ROOT / "results" / "report"
SCREENSHOT_CARD = "04"  # the card of Table 1, shown beside the top of the index
VIEWPORT = {"width": 1200, "height": 900}
PAGES = ["index.html"] + [f"{path.stem}.html" for path in discover_notebooks(NOTEBOOKS_DIR).values()]

# What a loaded page reports: each image's state, each link's resolved and written URL, the ids it defines.
PAGE_STATE_JS = """() => ({
    images: Array.from(document.images, i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0})),
    links: Array.from(document.querySelectorAll('a[href]'), a => ({href: a.href, raw: a.getAttribute('href')})),
    ids: Array.from(document.querySelectorAll('[id]'), el => el.id),
})"""


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    build_report(NOTEBOOKS_DIR, REPO_ROOT / "results", out)
    return out


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def _save_small_png(png: bytes, path: Path) -> None:
    """A screenshot as a 256-colour PNG (a fraction of the bytes; the page has few colours besides its figures)."""
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


def _link_problem(href: str, raw: str, page: Path, ids: set[str]) -> str | None:
    """Why a link fails (None when it is fine): a relative link naming an existing file or an id on the page, or an
    https reference (never requested: the request log shows that)."""
    if href.startswith("https://"):
        return None
    if not href.startswith("file://") or raw.startswith(("/", "file:")):
        return "not a relative link"
    url = urlparse(href)
    target = Path(unquote(url.path))
    if target == page and url.fragment:
        # As a browser scrolls: to the id as written or percent-decoded (nbconvert's heading ids are encoded).
        return None if {url.fragment, unquote(url.fragment)} & ids else "no element with this id"
    return None if target.exists() else "no such file"


@pytest.mark.parametrize("name", PAGES)
def test_page_loads_offline_with_its_images_links_and_no_console_error(report_dir, browser, name):
    page_path = report_dir / name
    context = browser.new_context(viewport=VIEWPORT)
    requests, errors = [], []
    context.on("request", lambda request: requests.append(request.url))
    # Anything but a file is refused before it leaves the machine; the request log still records it.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    page = context.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url[:80]}"))
    page.goto(page_path.as_uri(), wait_until="load")
    state = page.evaluate(PAGE_STATE_JS)

    assert state["images"], f"{name} shows no image"
    assert [image["src"] for image in state["images"] if not image["ok"]] == []
    assert [url[:80] for url in requests if not url.startswith("file://")] == []
    ids = set(state["ids"])
    problems = [(link["raw"], _link_problem(link["href"], link["raw"], page_path, ids)) for link in state["links"]]
    assert [problem for problem in problems if problem[1]] == []
    assert errors == []

    if name == "index.html":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        _save_small_png(page.screenshot(), SCREENSHOTS / "index.png")
        card = page.locator(f"#nb-{SCREENSHOT_CARD}")
        if card.count():
            _save_small_png(card.screenshot(), SCREENSHOTS / f"index_card_{SCREENSHOT_CARD}.png")
    context.close()
