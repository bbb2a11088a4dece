"""Every relative link in README.md and docs/*.md points to a file that exists and, with a #fragment, to a
heading of that file (GitHub's anchor for it); the README stays one screen plus a map (<= 200 lines)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target "title")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (inline code marks too), spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside code blocks); repeats get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = anchor(m.group(1))
            out.add(a if a not in seen else f"{a}-{seen[a]}")
            seen[a] = seen.get(a, 0) + 1
    return out


def broken_links(md: Path) -> list[str]:
    """'file: target (why)' for each relative link of `md` whose file or heading does not exist."""
    bad = []
    for target in LINK.findall(FENCE.sub("", md.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... are not checked offline
            continue
        path, _, frag = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{md.name}: {target} (no file {dest})")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{md.name}: {target} (no heading '#{frag}' in {dest.name})")
    return bad


DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(md):
    assert broken_links(md) == []


def test_the_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n## A `gs://` workdir\n## Notes\n## Notes\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-gs-workdir) [ok](other.md#notes-1) [ok](#here) ![ok](other.md)\n# Here\n"
                    "[bad](missing.md) [bad](other.md#not-a-heading) [bad](#nowhere) [bad](other.md#notes-2)\n"
                    "```\n[in code](ignored.md)\n```\n[web](https://example.com/x.md)\n")
    assert [b.split(" (")[0] for b in broken_links(page)] == [
        "page.md: missing.md", "page.md: other.md#not-a-heading", "page.md: #nowhere", "page.md: other.md#notes-2"]


def test_readme_is_one_screen_and_a_map():
    assert len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
