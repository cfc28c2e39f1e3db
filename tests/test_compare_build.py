"""The compiled comparator (setup.py, scripts/build-fast) never silently runs stale code.

Python imports ``tcp.cpython-*.so`` before ``tcp.py``: after an edit to a compiled module's
source, tests would otherwise keep running the old compiled code. Without a build there is
nothing to check.
"""

from __future__ import annotations

import importlib
import importlib.machinery

import pytest

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


def test_a_missing_third_party_module_is_told_from_the_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A benchmark run with a bare interpreter (no pyroute2) still learns which variant is on
    # disk; a coloproxy module that does not import is still an error.
    target = "coloproxy.capture.netlink"
    real_import = importlib.import_module

    def without_pyroute2(name: str) -> object:
        if name == target:
            raise ModuleNotFoundError("No module named 'pyroute2'", name="pyroute2")
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", without_pyroute2)
    on_disk = not variant.pure_forced() and variant._extension(target) is not None
    expected = variant.COMPILED if on_disk else variant.PURE
    assert variant.loaded_variants()[target] == expected

    def without_own(name: str) -> object:
        if name == target:
            raise ModuleNotFoundError("No module named 'coloproxy.gone'", name="coloproxy.gone")
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", without_own)
    with pytest.raises(ModuleNotFoundError):
        variant.loaded_variants()
