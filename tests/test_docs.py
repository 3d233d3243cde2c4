"""README and docs/ pages: every relative link and image points at a file that exists (pages moved out of README
keep their links working)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [(p.name, target) for p in pages for target in re.findall(r"\]\(([^)#\s]+)", p.read_text())
              if not target.startswith(("http://", "https://")) and not (p.parent / target).exists()]
    assert len(pages) > 1 and not broken, broken
