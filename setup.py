"""Build coloproxy: the comparator's pure core compiled with mypyc, pure Python as fallback.

Everything else is in pyproject.toml. ``pip install .`` (and ``pip install -e .``, and
scripts/setup) compile the modules listed in coloproxy/variant.py's ``COMPILED_MODULES``
with mypyc (from PyPI, through pip's build isolation: pyproject.toml's build requirements)
and a C compiler with the Python headers (Debian: gcc, python3-dev; scripts/setup installs
them). Where that fails (no compiler, no headers) the install still succeeds, without the
extension modules, and says so on stderr ("coloproxy: building the pure-Python comparator");
the same ``.py`` files then run. ``COLOPROXY_PURE=1`` at build time skips compiling too.
``coloproxy --version`` says which variant runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from coloproxy.variant import COMPILED_MODULES, GROUP_NAME, PURE_ENV  # noqa: E402

del sys.path[0]


def _say(message: str) -> None:
    # pip shows a build's stderr only with -v or on failure; a warning line still makes it
    # into logs that keep stderr, and `coloproxy --version` tells the variant either way.
    print(f"coloproxy: {message}", file=sys.stderr, flush=True)


# GCC's early inliner leaves mypyc's `static inline` helpers for tagged integers
# (CPyTagged_Add, CPyTagged_Lshift, ...) out of line in the large functions mypyc generates:
# a call for every integer operation. Past this threshold they are inlined: 3-4 % fewer
# instructions per packet (docs/benchmarks.md, "Inlined and unboxed"). A compiler that
# rejects the option gets the build retried without it.
_TUNING: tuple[str, ...] = ("--param=early-inlining-insns=200",)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python (no extension at all) when compiling fails.

    All or nothing: mypyc's per-module extensions need the group's shared library, so a
    partial build would not import. On any failure every extension built so far is removed.
    """

    def run(self) -> None:
        # run() replaces the compiler option with the compiler object it makes, and setuptools'
        # clears --inplace until its build is done: both restored for the retry
        compiler_option, inplace = self.compiler, self.inplace
        while True:
            try:
                super().run()
                return
            except Exception as exc:  # CompileError, LinkError, a missing compiler: all the same
                self._remove_outputs()
                failure = exc
            if not self._untune():
                break
            _say(f"compiling with {' '.join(_TUNING)} failed; again without it")
            self.compiler, self.inplace = compiler_option, inplace
        _say(f"compiling failed ({type(failure).__name__}: {failure})")
        _say("building the pure-Python comparator (slower; same behaviour)")
        self.extensions = []

    def _untune(self) -> bool:
        """Take ``_TUNING`` out of every extension's options; whether any had it."""
        tuned = False
        for ext in self.extensions:
            kept = [arg for arg in ext.extra_compile_args if arg not in _TUNING]
            tuned = tuned or len(kept) < len(ext.extra_compile_args)
            ext.extra_compile_args = kept
        return tuned

    def _remove_outputs(self) -> None:
        """Every extension module built so far, in the build directory and in place."""
        for output in map(Path, self.get_outputs()):
            paths = [output]
            if output.is_relative_to(self.build_lib):
                paths.append(ROOT / output.relative_to(self.build_lib))
            for path in paths:
                if path.exists() and path.suffix in (".so", ".pyd"):
                    path.unlink()


def _extensions() -> list[Any]:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        _say(f"{PURE_ENV} set: building the pure-Python comparator")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:  # a build without isolation and without mypy
        _say(f"mypyc not found ({exc}): building the pure-Python comparator")
        return []
    sources = [str(Path(*module.split(".")).with_suffix(".py")) for module in COMPILED_MODULES]
    # One group named inside the package, so that its shared library sits in coloproxy/
    # and imports wherever coloproxy does (the default name is a hash at the top level).
    try:
        extensions: list[Any] = mypycify(
            sources, group_name=GROUP_NAME, target_dir="build/mypyc", opt_level="3"
        )
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error it finds
        _say(f"mypyc could not compile ({exc!r}): building the pure-Python comparator")
        return []
    for extension in extensions:
        extension.extra_compile_args = [*extension.extra_compile_args, *_TUNING]
    return extensions


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
