"""The repository stands alone: no tracked file points at documents or folders that a clone does not have, and
every ``docs/<page>.md#<anchor>`` link names a heading that exists.

Every tracked text file (notebooks included) is searched for the names of notes kept outside the repository, for
paths into a ``shared`` folder beside the checkout, and for references to numbered issue-tracker entries.
Cite the paper, the official code by file and function, public protocols by their source, or ``docs/`` instead.
The one exception: ``.ci/run`` may name CI's copy of the COCO caption list beside the checkout.

The patterns spell their literal parts with character classes and the examples below are split into pieces, so
that this file does not match itself.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from wadi_core.artifacts import REPO_ROOT

OUTSIDE_PATH = "path outside the repository"
FORBIDDEN: dict[str, re.Pattern[str]] = {
    "note outside the repository": re.compile(
        r"WADI[_]PAPER|DESIGN[.]md|PEERS[_]AND[_]PROTOCOLS|VSD[_]NOTES|CPU[_]FACTS"
    ),
    # a relative path up into "shared", or a path joined with a "shared" component (also JSON-escaped in notebooks)
    OUTSIDE_PATH: re.compile(r"[.][.]/shared\b|/\s*\\?[\"']shared\\?[\"']"),
    # a numbered or quoted issue, in either case, singular or plural, with or without "#"
    "issue reference": re.compile(r"\b[Ii]ssues?\s+(#?[0-9]+|\")"),
}
# file -> the kinds of hit it may contain
ALLOWED = {".ci/run": {OUTSIDE_PATH}}


DOCS_LINK = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")
RELATIVE_DOCS_LINK = re.compile(r"\]\(([\w-]+\.md)?#([\w-]+)\)")  # [text](page.md#anchor) inside docs/


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: str) -> set[str]:
    lines = (REPO_ROOT / "docs" / page).read_text(encoding="utf-8").splitlines()
    return {heading_anchor(line.lstrip("#")) for line in lines if re.match(r"#{1,6} ", line)}


def _tracked_files() -> list[str]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout, cannot list tracked files ({err})")
    return [name for name in listing.stdout.decode().split("\0") if name]


def _text(path: str) -> str | None:
    """The file's text, or None for a binary file (a NUL byte or not UTF-8) or one deleted in the work tree."""
    try:
        data = (REPO_ROOT / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def find_hits(path: str, text: str) -> list[str]:
    """``path:line: kind: 'match'`` for every forbidden reference in ``text`` that ``path`` may not contain."""
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        for kind, pattern in FORBIDDEN.items():
            if kind in ALLOWED.get(path, set()):
                continue
            hits += [f"{path}:{number}: {kind}: {match.group(0)!r}" for match in pattern.finditer(line)]
    return hits


def test_the_patterns_catch_what_they_should():
    shared_path = ".." + "/shared/data"
    assert find_hits("a.py", f"see {shared_path}") and find_hits("a.py", 'REPO_ROOT.parent / "' + 'shared" / "data"')
    assert find_hits("a.ipynb", r'    "x = REPO_ROOT.parent / \"' + r'shared\" / \"data\"\n",')
    assert find_hits("a.py", "# Issue" + " 3: targets") and find_hits("a.py", "(issue" + " #12)")
    assert find_hits("a.py", "(issue" + ' "VSD trainer")')
    assert find_hits("a.md", "see " + "WADI_" + "PAPER.md §3") and find_hits("a.md", "DESIGN" + ".md §4")
    assert not find_hits("a.md", "docs/design.md, the shared cores, an issue with the scale, 3 issues")
    assert not find_hits(".ci/run", f'captions="{shared_path}/captions.txt"')
    assert find_hits(".ci/run", "# issue" + " 5")


def test_no_tracked_file_points_outside_the_repository():
    hits = []
    for path in _tracked_files():
        text = _text(path)
        if text is not None:
            hits += find_hits(path, text)
    assert not hits, (
        f"{len(hits)} reference(s) to documents, folders or issues that a clone of this repository lacks; cite the "
        "paper, the official code, public protocols or docs/ instead:\n" + "\n".join(hits)
    )


def test_heading_anchor_follows_github():
    assert heading_anchor(" Fig. 1 numbers") == "fig-1-numbers"
    assert heading_anchor("COCO-2014 30k") == "coco-2014-30k"
    assert heading_anchor("Quirks of the official code") == "quirks-of-the-official-code"


def test_every_docs_anchor_exists():
    anchors = {page.name: _anchors(page.name) for page in (REPO_ROOT / "docs").glob("*.md")}
    broken = []
    for path in _tracked_files():
        text = _text(path)
        if text is None:
            continue
        links = [(m.group(1), m.group(2)) for m in DOCS_LINK.finditer(text)]
        if path.startswith("docs/"):
            here = path.removeprefix("docs/")
            links += [(m.group(1) or here, m.group(2)) for m in RELATIVE_DOCS_LINK.finditer(text)]
        broken += [f"{path}: docs/{page}#{anchor}" for page, anchor in links if anchor not in anchors.get(page, set())]
    assert not broken, "links to missing docs headings:\n" + "\n".join(broken)
