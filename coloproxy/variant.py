"""Which variant of the comparator runs: compiled (mypyc, built by ``pip install``) or pure.

The comparator's pure core is compiled by setup.py with mypyc when the project is installed
(``pip install .``, ``pip install -e .``, scripts/setup): each module in ``COMPILED_MODULES``
gets an extension module next to its ``.py``, which Python imports in its place. Where no C
compiler is present the build skips them and says so, and the same ``.py`` files run: the
pure variant, same behaviour, slower.

``COLOPROXY_PURE=1`` in the environment forces the pure variant even where a build is present
(for testing it, and as a way back should the compiled code misbehave): ``coloproxy/__init__``
then puts a finder first on ``sys.meta_path`` that loads these modules from their source.

``main(["--check"])`` prints which variant runs and returns 1 when a build is stale (a source
newer than its extension) or missing although a C compiler is present (scripts/setup
rebuilds then).

Standard library only: setup.py imports this before anything is installed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

# The modules setup.py compiles (in import order): the packet parser, the comparator, the
# chardev framing, the packet layer's checksums, TCP options and shifts, host S's rewrites and
# the two proxies' per-packet pumps (daemon/primary.py, daemon/secondary.py), and what every
# NFQUEUE wake-up runs: the timer pump, the netlink codec and reader (capture/netlink.py; its
# base QueueBase and the ctypes of capture/recvmmsg.py stay interpreted), and the chardev
# transport's receive and write path (capture/chardev.py; its sockets, capture/chardev_link.py,
# stay interpreted). Compiled code
# checks argument and attribute types at runtime: the parser takes ``bytes | bytearray``
# (packet/parse.py ``PacketData``), never a memoryview. Not compiled: packet/build.py (not
# per packet), events.py and config.py (frozen dataclasses with fields annotated ``object``,
# which mypyc cannot compile; compiled frozen dataclasses neither copy nor pickle).
COMPILED_MODULES: Final = (
    "coloproxy.seq",
    "coloproxy.packet.parse",
    "coloproxy.compare.verdicts",
    "coloproxy.compare.ranges",
    "coloproxy.compare.kept",
    "coloproxy.compare.epoch",
    "coloproxy.compare.state",
    "coloproxy.compare.tcp",
    "coloproxy.compare.datagram",
    "coloproxy.compare.reassembly",
    "coloproxy.compare.lanes",
    "coloproxy.compare.comparator",
    "coloproxy.protocol.colo_frames",
    "coloproxy.compare.relay",
    "coloproxy.packet.checksum",
    "coloproxy.packet.options",
    "coloproxy.packet.shift",
    "coloproxy.rewrite.ingress",
    "coloproxy.rewrite.secondary",
    "coloproxy.daemon.primary",
    "coloproxy.daemon.secondary",
    "coloproxy.pump",
    "coloproxy.capture.netlink_codec",
    "coloproxy.capture.netlink",
    "coloproxy.capture.chardev",
)
# The shared library of the mypyc group (one per build, holds the code of every module).
GROUP_NAME: Final = "coloproxy._compiled"
PURE_ENV: Final = "COLOPROXY_PURE"
PACKAGE: Final = Path(__file__).resolve().parent

COMPILED: Final = "compiled"
PURE: Final = "pure"
MIXED: Final = "mixed"


def pure_forced() -> bool:
    """``COLOPROXY_PURE`` is set to anything but empty or 0."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def source_path(module: str) -> Path:
    """Where ``module``'s source lives in this package."""
    parts = module.split(".")
    return PACKAGE.joinpath(*parts[1:]).with_suffix(".py")


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Load the compiled modules from their ``.py``, not their extension module."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        source = source_path(fullname)
        if not source.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def force_pure() -> None:
    """From now on, import the compiled modules from source (idempotent). Must run before
    any of them is imported: ``coloproxy/__init__`` calls it when ``COLOPROXY_PURE`` is set."""
    if not any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())


def _extension(module: str) -> Path | None:
    """The built extension module next to ``module``'s source, if any."""
    source = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def stale_modules() -> list[str]:
    """Compiled modules whose source is newer than their extension: the extension is what
    Python runs, so an edit of the source would not take effect (rebuild: scripts/build-fast
    or ``pip install -e .``)."""
    stale = []
    for module in COMPILED_MODULES:
        extension = _extension(module)
        if extension is not None and source_path(module).stat().st_mtime > (
            extension.stat().st_mtime
        ):
            stale.append(module)
    return stale


def loaded_variants() -> dict[str, str]:
    """Each compiled module, imported, and whether it runs compiled or pure."""
    found = {}
    for module in COMPILED_MODULES:
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if (exc.name or "coloproxy").partition(".")[0] == "coloproxy":
                raise
            # A third-party module it needs is missing from this Python (a benchmark run with
            # a bare interpreter: capture/ needs pyroute2): the files tell which would run.
            pure = pure_forced() or _extension(module) is None
            found[module] = PURE if pure else COMPILED
            continue
        compiled = (loaded.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        found[module] = COMPILED if compiled else PURE
    return found


def variant() -> str:
    """``compiled``, ``pure`` or ``mixed`` (some modules compiled: a broken build)."""
    kinds = set(loaded_variants().values())
    return kinds.pop() if len(kinds) == 1 else MIXED


def compiler_present() -> bool:
    """A C compiler as Python's build would call it (``CC`` or the one Python was built
    with) is on the PATH."""
    command = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(command.split()[0]) is not None


def describe() -> str:
    """One phrase for ``coloproxy --version`` and the control protocol's software string."""
    kind = variant()
    if kind == COMPILED:
        return "comparator: compiled (mypyc)"
    if kind == MIXED:
        pure = [name for name, found in loaded_variants().items() if found == PURE]
        return f"comparator: MIXED build, pure: {' '.join(pure)} (reinstall coloproxy)"
    if pure_forced():
        return f"comparator: pure Python ({PURE_ENV} set)"
    return "comparator: pure Python (not compiled when installed: no C compiler?)"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--check"]):
        print("usage: coloproxy.variant.main([--check])", file=sys.stderr)
        return 2
    print(describe())
    if args:
        stale = stale_modules()
        if stale:
            print(f"stale compiled modules (source newer than build): {' '.join(stale)}")
            return 1
        if variant() != COMPILED and not pure_forced() and compiler_present():
            print("a C compiler is present but the comparator is not compiled")
            return 1
    return 0
