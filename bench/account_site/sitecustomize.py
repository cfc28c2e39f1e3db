"""Loaded by every Python process whose PYTHONPATH holds this directory (bench/lab_account.py
puts it there for the lab's daemons only). In a ``coloproxy run`` process with
COLOPROXY_BENCH_ACCOUNT set, it wraps the per-packet and background entry points with
thread-CPU clocks: SIGUSR1 starts counting, SIGUSR2 writes ``$COLOPROXY_BENCH_ACCOUNT-ROLE.json``
(CPU seconds and calls per entry point, the main thread's and the process's CPU). A name the
code no longer has is left out. Never on a production host: a bench tool."""

from __future__ import annotations

import os

_command = open("/proc/self/cmdline", "rb").read().split(b"\0")  # noqa: SIM115
_target = os.environ.get("COLOPROXY_BENCH_ACCOUNT")
if _target and b"coloproxy" in _command and b"run" in _command:
    import collections
    import importlib
    import json
    import signal
    import time
    from typing import Any

    _role = "secondary" if any(b"secondary" in part for part in _command) else "primary"
    _seconds: collections.Counter[str] = collections.Counter()
    _calls: collections.Counter[str] = collections.Counter()
    _on = [False]
    _clock = time.thread_time
    _start: dict[str, float] = {}

    def _counted(function: Any, label: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _on[0]:
                return function(*args, **kwargs)
            started = _clock()
            try:
                return function(*args, **kwargs)
            finally:
                _seconds[label] += _clock() - started
                _calls[label] += 1

        return wrapper

    _POINTS = (
        ("coloproxy.capture.netlink", "NetlinkQueue", "_on_readable", "queue wake-up (all)"),
        ("coloproxy.capture.netlink", "NetlinkQueue", "_flush", "verdict send"),
        ("coloproxy.compare.comparator", "Comparator", "feed", "comparator.feed"),
        ("coloproxy.compare.comparator", "Comparator", "checkpoint_completed", "comparator ckpt"),
        ("coloproxy.daemon.primary", "PrimaryProxy", "_act", "proxy events"),
        ("coloproxy.daemon.secondary", "SecondaryProxy", "on_to_guest", "host S S-in rewrite"),
        ("coloproxy.daemon.secondary", "SecondaryProxy", "on_from_guest", "host S egress"),
        ("coloproxy.pump", "TimerPump", "_rearm", "comparator timer rearm"),
        (
            "coloproxy.engine.runner",
            "EngineRunner",
            "handle_timer",
            "engine timers (heartbeat send)",
        ),
        ("coloproxy.engine.peer", "HeartbeatPeer", "_received", "heartbeat received"),
        ("coloproxy.net.leasegate", "LeaseGate", "_run", "lease gate (nftables)"),
        # Per checkpoint (the synchronous parts: the JSON and QMP reading around them run in
        # coroutines, which these clocks cannot isolate).
        ("coloproxy.engine.runner", "EngineRunner", "_on_event", "engine: QMP event"),
        ("coloproxy.engine.runner", "EngineRunner", "_on_push", "engine: proxy push"),
        ("coloproxy.daemon.primary", "PrimaryProxy", "report_started", "proxy: ckpt started"),
    )
    for module_name, class_name, attribute, label in _POINTS:
        try:
            owner = getattr(importlib.import_module(module_name), class_name)
            setattr(owner, attribute, _counted(getattr(owner, attribute), label))
        except (ImportError, AttributeError):
            pass
    try:
        from coloproxy.capture import recvmmsg as _recvmmsg_module

        _real_recvmmsg = _recvmmsg_module.libc_recvmmsg

        def _recvmmsg() -> Any:
            return _counted(_real_recvmmsg(), "recvmmsg")

        _recvmmsg_module.libc_recvmmsg = _recvmmsg
    except (ImportError, AttributeError):
        pass

    import gc

    _gc_started = [0.0]

    def _gc_clock(phase: str, info: dict[str, int]) -> None:
        # The garbage collector, by generation: it runs inside whatever allocated last, so
        # its time is also in that entry point's.
        if not _on[0]:
            return
        if phase == "start":
            _gc_started[0] = _clock()
        else:
            label = f"gc generation {info.get('generation', '?')}"
            _seconds[label] += _clock() - _gc_started[0]
            _calls[label] += 1

    gc.callbacks.append(_gc_clock)

    def _begin(*_args: object) -> None:
        _seconds.clear()
        _calls.clear()
        _start["thread"], _start["process"] = _clock(), time.process_time()
        _on[0] = True

    def _end(*_args: object) -> None:
        _on[0] = False
        figures = {
            "main_thread": _clock() - _start["thread"],
            "process": time.process_time() - _start["process"],
            "seconds": dict(_seconds),
            "calls": dict(_calls),
        }
        with open(f"{_target}-{_role}.json", "w") as out:
            json.dump(figures, out)

    signal.signal(signal.SIGUSR1, _begin)
    signal.signal(signal.SIGUSR2, _end)
