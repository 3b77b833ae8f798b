"""The README is a front page and the rest of the documentation a site that builds.

The README contract: a newcomer runs exactly two commands, ``make demo`` and ``make test``, and
``.ci/run`` calls the second. Everything else lives in ``docs/``, built by MkDocs with
``--strict`` (a broken link or anchor, or a page left out of the navigation, fails).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = (
    "getting-started",
    "methods",
    "evaluation",
    "downstream",
    "data",
    "distributed",
    "configuration",
    "benchmarks",
    "architecture",
    "results",
)


def test_readme_is_a_front_page_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README.md is a front page: move detail into docs/"
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    assert "make demo" in commands and "make test" in commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == "make test"  # .ci/run calls the README's test command


def _nav_files(nav) -> list[str]:
    files = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == on_disk
    assert {f"{page}.md" for page in PAGES} <= set(nav)


@pytest.mark.slow
def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "site" / "results" / "index.html").exists()
