"""A short, fixed run of bench/fuzz_compare.py: output commit under mutated input.

The long run (10**6 frames and more, any seed) is ``python3 bench/fuzz_compare.py``; this one
keeps the property in the normal suite: a fixed seed, some 10**5 frames, a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest

FRAMES = 100_000
SEED = 20240611


def _fuzz() -> ModuleType:
    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "fuzz_compare.py")
    spec = importlib.util.spec_from_file_location("fuzz_compare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_compare"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return _fuzz()


def test_mutated_frames_never_break_output_commit(fuzz: ModuleType) -> None:
    result = fuzz.run(FRAMES, SEED)
    assert result.frames >= FRAMES
    assert result.violations == []
    # the run exercised what it is for: matches, checkpoints, and the new reasons
    assert result.matched > 1000
    assert result.by_checkpoint > 1000
    for reason in ("retransmission-differs", "retransmission-unkept", "fate", "overflow"):
        assert result.asked[reason] > 0, reason


def test_the_fuzz_finds_a_comparator_that_releases_resends_unchecked(
    fuzz: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference model catches a comparator that releases a resend with other bytes."""
    from coloproxy.compare import tcp
    from coloproxy.compare.tcp import TcpConnection

    if tcp.__file__ is not None and tcp.__file__.endswith(".so"):
        pytest.skip(
            "compiled: its methods cannot be replaced (tests/test_build_variants.py runs "
            "this file in the pure variant)"
        )
    monkeypatch.setattr(TcpConnection, "_recompare", lambda *args: True)
    result = fuzz.run(30_000, SEED)
    assert any("the secondary never sent" in line for line in result.violations)
