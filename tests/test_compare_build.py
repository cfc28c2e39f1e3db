"""The optional compiled build (scripts/build-fast) never silently runs stale code.

Python imports ``tcp.cpython-*.so`` before ``tcp.py``: after an edit to a compiled module's
source, tests would otherwise keep running the old compiled code. Without a build (the
default) there is nothing to check.
"""

from __future__ import annotations

from pathlib import Path

import coloproxy.compare.comparator

PACKAGE = Path(__file__).resolve().parent.parent / "coloproxy"


def _compiled() -> list[tuple[Path, Path]]:
    pairs = []
    for extension in sorted(PACKAGE.rglob("*.cpython-*.so")):
        source = extension.with_name(extension.name.split(".", 1)[0] + ".py")
        if source.exists():  # the group's shared library has no source of its own
            pairs.append((extension, source))
    return pairs


def test_compiled_modules_are_not_older_than_their_sources() -> None:
    stale = [
        str(source.relative_to(PACKAGE.parent))
        for extension, source in _compiled()
        if source.stat().st_mtime > extension.stat().st_mtime
    ]
    assert not stale, (
        f"compiled modules older than their source: {stale}; "
        "rebuild with scripts/build-fast or remove them with scripts/build-fast --clean"
    )


def test_the_comparator_runs_the_variant_on_disk() -> None:
    """Compiled if and only if a build is present next to the source."""
    compiled = any(source.name == "comparator.py" for _, source in _compiled())
    assert coloproxy.compare.comparator.__file__ is not None
    assert coloproxy.compare.comparator.__file__.endswith(".so") is compiled
