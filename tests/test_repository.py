"""A clone of this repository stands on its own: nothing reads a folder beside it, and every
document the code points a reader to is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*(ROOT / name for name in ("README.md", "Makefile")),
           *(p for d in ("firmware", "control_center", "protocol", "simulator", "bench", "tests",
                         "scripts", "docs", "hw") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in {".py", ".md", ".mjs", ".toml", ".service", ""}
             and "data" not in p.relative_to(ROOT).parts and "node_modules" not in p.parts
             and "__pycache__" not in p.parts)]
OUTSIDE = re.compile(r"\.\./shared|/work/shared|parent / \"shared\"|SOS_SHARED_DIR")
DOC_REFERENCE = re.compile(r"\bdocs/([A-Z][A-Z0-9_-]+\.md)")


def test_nothing_reads_or_cites_a_folder_beside_the_repository() -> None:
    this = Path(__file__).resolve()
    found = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES if p != this
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if OUTSIDE.search(line)]
    assert found == []


def test_every_document_the_code_cites_is_in_the_repository() -> None:
    cited = {m.group(1) for p in SOURCES for m in DOC_REFERENCE.finditer(
        p.read_text(errors="replace"))}
    assert "FIELD-NOTES.md" in cited
    assert sorted(name for name in cited if not (ROOT / "docs" / name).exists()) == []
