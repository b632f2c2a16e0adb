"""No file in the repository cites a document outside it (a numbered section of a contract, an issue number): the
docs say what the project does in their own words, and a reader of the repository alone can follow every
reference."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SKIPPED = {".git", ".venv", "runs", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
OUTSIDE_REFERENCES = re.compile(r"contract\s+section|\bissues?\s*#?\d", re.IGNORECASE)


def text_files() -> list[Path]:
    found = []
    for path in REPO.rglob("*"):
        parts = set(path.relative_to(REPO).parts)
        if path.is_file() and not parts & SKIPPED and not any(part.endswith(".egg-info") for part in parts):
            found.append(path)
    return found


def test_no_file_cites_a_document_outside_the_repository():
    offending = []
    for path in text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # compressed data, model weights, plots
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offending, "\n".join(offending)
