"""The repository explains itself: no tracked file cites a document that lives outside it.

The design and the integration notes the project was built from are not in this repository; a
comment, doc or test that sends the reader there ("see the design, section 7a") explains nothing
to someone with only a clone. What is needed is said here, in the project's own words. The
migrations already applied (0001-0006) keep their text: their checksums are recorded in every
database that ran them.
"""

from __future__ import annotations

import re
import subprocess

from tests.support import REPO_ROOT

# Written so that this file does not match itself.
_OUTSIDE = "|".join(
    [
        r"\bDESIGN(?:\.md)?\s*§",
        r"\bDESIGN\.md\b",
        "SEED" + "_GUIDE",
        "GATEWAY" + "_NOTES",
        r"\.\./" + "shared",
    ]
)
CITATION = re.compile(_OUTSIDE)
APPLIED_MIGRATIONS = re.compile(r"^db/migrations/000[1-6]_[^/]*\.sql$")


def citations(path: str, text: str) -> list[str]:
    return [
        f"{path}:{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if CITATION.search(line)
    ]


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout
    return [name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_cites_a_document_outside_the_repository() -> None:
    found: list[str] = []
    files = tracked_files()
    assert "README.md" in files and "pyproject.toml" in files, "not the repository's listing?"
    for path in files:
        if APPLIED_MIGRATIONS.match(path):
            continue
        try:
            text = (REPO_ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary (a chart), or deleted in the working tree
        found += citations(path, text)

    assert found == [], "say it in the repository's own words:\n" + "\n".join(found)


def test_the_check_finds_each_kind_of_citation() -> None:
    lines = [
        "# Endpoint health (DES" + "IGN §7a) is health.py",
        "see DES" + "IGN.md for the schedule",
        "as " + "SEED" + "_GUIDE.md says",
        "GATEWAY" + "_NOTES.md, section 2",
        "../" + "shared/CONVENTIONS.md",
    ]
    assert len(citations("x", "\n".join(lines))) == len(lines)
    assert citations("x", "RFC 9110 §11.6.1; docs/operations.md §5.1; README_SCHEDULE") == []
