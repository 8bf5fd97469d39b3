"""Module docstrings keep a summary and their invariants and point to docs/ for the rest
("docs/search.md#workers-and-stale-trials"): every such pointer in the code names a page that
exists and, when it names a heading, a heading of that page."""

from __future__ import annotations

import re
from pathlib import Path

from test_docs import anchors

ROOT = Path(__file__).resolve().parents[1]
POINTER = re.compile(r"docs/([\w/.-]+\.md)(?:#([\w-]+))?")
SOURCES = [p for d in ("budget", "search", "analysis") for p in sorted((ROOT / d).rglob("*.py"))]


def test_every_docs_pointer_in_the_code_resolves():
    found, broken = 0, []
    for source in SOURCES:
        for page, anchor in POINTER.findall(source.read_text()):
            found += 1
            dest = ROOT / "docs" / page
            if not dest.exists() or (anchor and anchor not in anchors(dest)):
                broken.append(f"{source.relative_to(ROOT)}: docs/{page}{'#' + anchor if anchor else ''}")
    assert found > 10  # the module docstrings point to their guides
    assert not broken, broken
