"""coloproxy.net.netns.run_in, the one way code enters a network namespace, as capture uses it.

Needs root for the namespace test; the namespace is deleted by its fixture's finalizer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloproxy.net import netns
from netfixtures import require_root_and_netns, unique_prefix


@pytest.fixture
def namespace() -> Iterator[str]:
    require_root_and_netns()
    name = f"{unique_prefix()}n"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)
        assert not netns.exists(name)


def test_run_in_no_namespace_calls_in_the_calling_thread() -> None:
    # For callers whose namespace is optional (capture's QueueConfig.netns): no thread, no move.
    def where() -> tuple[int, int]:
        return threading.get_ident(), Path("/proc/thread-self/ns/net").stat().st_ino

    assert netns.run_in(None, where) == where()
    with pytest.raises(ValueError, match="here"):
        netns.run_in(None, int, "here")


@pytest.mark.root
def test_proc_net_is_the_main_threads_namespace_and_thread_self_the_callers(
    namespace: str,
) -> None:
    # Why capture/stats.py reads /proc/thread-self/net: inside run_in, /proc/net still shows
    # the namespace of the process's main thread (pytest runs the tests in it).
    def devices(path: str) -> set[str]:
        lines = Path(path).read_text().splitlines()[2:]
        return {line.split(":")[0].strip() for line in lines}

    outside = devices("/proc/net/dev")
    assert netns.run_in(namespace, devices, "/proc/net/dev") == outside
    inside = netns.run_in(namespace, devices, "/proc/thread-self/net/dev")
    assert inside == {"lo"}  # a fresh namespace has its loopback only
    assert inside != outside
