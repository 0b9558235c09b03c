"""The documentation's links resolve: every relative link of README.md and of the reference pages beside the code
(``configs/``, ``docker/``, ``tests/``, ``qkv_lightning/``) names a file or folder of the checkout, and every
``#anchor`` names a heading of the page it points to (GitHub's heading ids). README.md stays a front door."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("configs", "docker", "tests", "qkv_lightning")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
README_MAX_LINES = 300


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown file under the documented folders."""
    return [root / "README.md"] + sorted(p for folder in FOLDERS for p in (root / folder).rglob("*.md"))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(CODE_SPAN.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings (repeated headings get ``-1``, ``-2``, ... as on GitHub)."""
    found: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``page`` whose file, folder or anchor does not exist, as ``page: target (why)``."""
    broken = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            where = (page.parent / path_part).resolve() if path_part else page
            name = f"{page.relative_to(root)}: {target}"
            if not where.is_relative_to(root):
                broken.append(f"{name} (outside the checkout)")
            elif not where.exists():
                broken.append(f"{name} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"{name} (no heading with this id)")
    return broken


def test_every_relative_link_of_the_docs_resolves():
    assert len(pages()) >= 10  # README.md, configs/, docker/, tests/ and the package's reference pages
    broken = [problem for page in pages() for problem in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """The checker itself: a missing file, a missing heading and a path out of the checkout are each reported."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.md").write_text("# A page\n\n## Its section: one\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "\n".join([
            "[fine](sub/page.md#its-section-one) [also fine](sub/) [web](https://example.org/x)",
            "[gone](sub/nothere.md) [bad anchor](sub/page.md#its-section) [out](../elsewhere.md)",
            "`[in code](nothere.md)`",
            "```",
            "[in a block](nothere.md)",
            "```",
        ]),
        encoding="utf-8",
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md: sub/nothere.md (no such file)",
        "README.md: sub/page.md#its-section (no heading with this id)",
        "README.md: ../elsewhere.md (outside the checkout)",
    ]


def test_the_readme_is_a_front_door():
    """README.md stays short; the reference lives beside the code."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("Equivalence: \"sharing costs nothing\"", "equivalence-sharing-costs-nothing"),
        ("`init_from` and distillation", "init_from-and-distillation"),
        ("bench-decode: memory headroom, RoPE with K=V", "bench-decode-memory-headroom-rope-with-kv"),
        ("Measured: the paper's synthetic protocol", "measured-the-papers-synthetic-protocol"),
    ],
)
def test_heading_ids_follow_github(heading, expected):
    assert slug(heading) == expected
