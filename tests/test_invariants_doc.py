"""The project carries its own design: the invariants and facts that code and documents cite
are in docs/invariants.md, and nothing points to a design document outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INVARIANTS = ROOT / "docs" / "invariants.md"


def tracked_texts() -> dict[str, str]:
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    texts = {}
    for name in names:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".sh", ".yml", ".yaml", ".toml", ".c") or name in (
            "scripts/setup", "scripts/test", "init", "build.sh",
        ):  # fmt: skip
            if path.is_file():
                texts[name] = path.read_text(errors="replace")
    return texts


def test_nothing_cites_a_design_document_outside_the_repository() -> None:
    this = str(Path(__file__).relative_to(ROOT))
    found = [
        f"{name}:{text[: match.start()].count(chr(10)) + 1}"
        for name, text in tracked_texts().items()
        if name != this
        for match in re.finditer(r"DESIGN(\.md)?\b|\.\./shared/", text)
    ]
    assert not found, found


def test_every_invariant_cited_is_defined() -> None:
    defined = set(re.findall(r"^- \*\*(I[1-9]),", INVARIANTS.read_text(), re.MULTILINE))
    assert defined == {"I1", "I2", "I3", "I4", "I5", "I6"}
    cited = set()
    for text in tracked_texts().values():
        cited.update(re.findall(r"\b(I[0-9])\b", text))
    assert cited <= defined, cited - defined
