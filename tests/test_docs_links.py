"""Every link to a section (``[text](file.md#anchor)``) in the README and docs/ names a heading that exists: sections
of docs/benchmarks.md are retitled as a benchmark goes on, and a link to the old title silently lands at the top."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, backticks, links and punctuation other
    than ``-`` dropped, spaces as ``-``; a repeated heading gets ``-1``, ``-2``... Fenced code is skipped."""
    found, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1).replace("`", ""))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Fashion-MNIST, 224 px (under way)\n## `--restore` and [links](x.md)\n```\n# not a heading\n```\n"
                    "## Setup\n## Setup\n")
    assert anchors(page) == {"fashion-mnist-224-px-under-way", "--restore-and-links", "setup", "setup-1"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_section_link_names_a_heading_that_exists(doc):
    broken = []
    for link in LINK.finditer(doc.read_text()):
        file, anchor = link.groups()
        if file.startswith(("http://", "https://")):
            continue
        target = (doc.parent / file) if file else doc
        if not target.is_file() or anchor not in anchors(target):
            broken.append(link.group(0)[2:-1])
    assert not broken, f"{doc.relative_to(REPO)}: links to headings that do not exist: {broken}"
