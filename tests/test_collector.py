"""The daemon's collector thresholds (coloproxy/daemon/collector.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloproxy.config import load_config
from coloproxy.daemon import collector
from coloproxy.daemon import run as daemon_run
from coloproxy.errors import ColoproxyError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield gc.get_threshold()
    finally:
        gc.set_threshold(*saved)


def test_tune_raises_the_young_threshold_only(thresholds: tuple[int, int, int]) -> None:
    collector.tune()
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, 10, 10)
    assert thresholds[0] < collector.YOUNG_THRESHOLD


def test_coloproxy_run_tunes_before_its_loop_starts(
    thresholds: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int, int]] = []

    class Refused:
        def __init__(self, *args: object, **kwargs: object) -> None:
            seen.append(gc.get_threshold())
            raise ColoproxyError("stop here")

    monkeypatch.setattr(daemon_run, "Daemon", Refused)
    config = load_config(REPO / "configs" / "lab.yaml")
    assert daemon_run.run(config) == 2
    assert seen == [(collector.YOUNG_THRESHOLD, 10, 10)]
