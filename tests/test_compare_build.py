"""The compiled comparator (setup.py, scripts/build-fast) never silently runs stale code.

Python imports ``tcp.cpython-*.so`` before ``tcp.py``: after an edit to a compiled module's
source, tests would otherwise keep running the old compiled code. Without a build there is
nothing to check.
"""

from __future__ import annotations

import importlib.machinery

from coloproxy import variant


def test_compiled_modules_are_not_older_than_their_sources() -> None:
    stale = variant.stale_modules()
    assert not stale, (
        f"compiled modules older than their source: {stale}; "
        "rebuild with scripts/build-fast (or pip install -e .) or remove them with "
        "scripts/build-fast --clean"
    )


def test_each_module_runs_the_variant_on_disk() -> None:
    """Compiled if and only if a build is present next to the source and COLOPROXY_PURE is
    not set; never a mix."""
    forced = variant.pure_forced()
    for module, found in variant.loaded_variants().items():
        source = variant.source_path(module)
        built = any(
            source.with_name(source.stem + suffix).exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )
        expected = variant.COMPILED if built and not forced else variant.PURE
        assert found == expected, (module, found, "built" if built else "no build")
