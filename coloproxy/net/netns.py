"""Named network namespaces: create, delete, run code and commands inside one (shell).

Namespaces are the ``ip netns`` kind: a bind mount under ``/run/netns/<name>``, so
``ip netns exec`` and pyroute2's ``IPRoute(netns=...)`` see the ones we create and the
other way round.

How code runs inside a namespace. :func:`run_in` starts a fresh thread, moves that one thread
into the namespace with ``setns(2)`` and calls the function there. A network namespace is an
attribute of a thread (task), not of the process, so nothing else in the process moves, and
the thread ends with the call, so it never runs anything else in the wrong namespace. What
the function creates belongs to the namespace for good: a socket created in the thread stays
in the namespace when it is used from another thread later, so tests create a socket with
``run_in(ns, socket.socket, ...)`` and use it from the main thread. ``/proc/sys/net`` is
resolved per thread as well, so :func:`read_sysctl` and :func:`write_sysctl` inside
``run_in`` see the namespace's values. ``/proc/net`` is not: it is a link to
``/proc/self/net``, the namespace of the process's main thread, so code inside ``run_in``
reads ``/proc/thread-self/net`` instead (``capture/stats.py`` does). Subprocesses started in
the thread would inherit it, but :func:`popen` and :func:`run` use ``ip netns exec`` instead,
which also remounts ``/sys`` for the namespace (``/sys/class/net`` then lists its links).

We chose a thread over a child process because results and exceptions come back as they
are (no pickling: sockets, pyroute2 objects) and starting one costs microseconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pyroute2 import netns as _pyroute2_netns

from coloproxy.errors import UsageError
from coloproxy.net import NetError

NETNS_DIR = Path("/run/netns")

P = ParamSpec("P")
T = TypeVar("T")


def _path(name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"not a namespace name: {name!r}")
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return _path(name).exists()


def names() -> list[str]:
    """The named namespaces on this machine, sorted."""
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create namespace ``name``; do nothing if it exists."""
    if exists(name):
        return
    try:
        _pyroute2_netns.create(name)
    except Exception as exc:  # pyroute2 raises OSError, or anything from its child process
        raise NetError(f"creating network namespace {name}: {exc}") from exc


def delete(name: str) -> None:
    """Delete namespace ``name``; do nothing if it does not exist.

    The namespace itself lives on while a process is still inside it (with its links);
    call :func:`kill_processes` first to end those.
    """
    if not exists(name):
        return
    try:
        _pyroute2_netns.remove(name)
    except FileNotFoundError:
        pass  # removed meanwhile
    except OSError as exc:
        raise NetError(f"deleting network namespace {name}: {exc}") from exc


def pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    try:
        target = _path(name).stat()
    except FileNotFoundError:
        return []
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            info = (entry / "ns" / "net").stat()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if (info.st_ino, info.st_dev) == (target.st_ino, target.st_dev):
            found.append(int(entry.name))
    return sorted(found)


def kill_processes(name: str, grace: float = 1.0) -> list[int]:
    """End every process inside namespace ``name``: SIGTERM, then SIGKILL after ``grace``.

    Returns the pids it signalled. Meant for namespaces we created, whose processes we
    started (a lab's servers, a test's consumer).
    """
    victims = [pid for pid in pids(name) if pid != os.getpid()]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    remaining = victims
    while remaining and time.monotonic() < deadline:
        time.sleep(0.02)
        remaining = [pid for pid in remaining if _alive(pid)]
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return victims


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead; its parent has not reaped it yet


def run_in(name: str | None, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``function(*args, **kwargs)`` in a new thread inside namespace ``name``.

    Returns what it returns and raises what it raises (in the caller's thread). With ``name``
    None the call happens here, in the calling thread and its namespace: for callers whose
    namespace is optional (a queue bound in the lab's router, or in the daemon's own).
    """
    if name is None:
        return function(*args, **kwargs)
    path = _path(name)
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            _enter(name, path)
            result.append(function(*args, **kwargs))
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _enter(name: str, path: Path) -> None:
    """Move the calling thread into the namespace at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise NetError(f"opening network namespace {name}: {exc}") from exc
    try:
        # fork=False: setns(2) in this thread; flags=0: never create the namespace
        _pyroute2_netns.setns(fd, flags=0, fork=False)
    except OSError as exc:
        raise NetError(f"entering network namespace {name}: {exc}") from exc
    finally:
        os.close(fd)


def command(name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs inside namespace ``name``."""
    _path(name)
    return ["ip", "netns", "exec", name, *argv]


def popen(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside namespace ``name`` (``ip netns exec``)."""
    try:
        return subprocess.Popen(command(name, argv), **kwargs)
    except OSError as exc:
        raise NetError(f"starting {' '.join(argv)} in namespace {name}: {exc}") from exc


def run(
    name: str,
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float | None = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``name`` and wait; text in, text out.

    With ``check`` a non-zero exit raises NetError carrying the command and its stderr.
    """
    return run_command(command(name, argv), input=input, check=check, timeout=timeout)


def run_command(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float | None = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the current namespace (of the calling thread); see :func:`run`."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip() or "no output"
        raise NetError(f"{' '.join(argv)} failed with exit status {done.returncode}: {detail}")
    return done


def _sysctl_path(key: str) -> Path:
    """``net.ipv4.ip_forward`` or ``net/ipv4/ip_forward`` -> its file under /proc/sys.

    Use the slash form when a component has dots (an interface named ``eth0.100``).
    """
    parts = key.split("/") if "/" in key else key.split(".")
    if not all(parts) or ".." in parts:
        raise UsageError(f"not a sysctl name: {key!r}")
    return Path("/proc/sys", *parts)


def read_sysctl(key: str, namespace: str | None = None) -> str:
    """A sysctl's value (stripped) in the calling thread's namespace or in ``namespace``."""
    if namespace is not None:
        return run_in(namespace, read_sysctl, key)
    path = _sysctl_path(key)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise NetError(f"reading sysctl {key}: {exc}") from exc


def write_sysctl(key: str, value: str | int, namespace: str | None = None) -> None:
    """Set a sysctl in the calling thread's namespace or in ``namespace``."""
    if namespace is not None:
        run_in(namespace, write_sysctl, key, value)
        return
    path = _sysctl_path(key)
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise NetError(f"writing {value} to sysctl {key}: {exc}") from exc
