#!/usr/bin/env python3
"""The lab's COLO pair through our proxy and through QEMU's colo-compare, side by side.

One run: ``coloproxy lab up`` (our proxy, engine-driven), HTTP load from the client namespace
against the guest's deterministic ``/index.html`` (a sequential phase over new connections,
then a phase with a few concurrent clients), checkpoints per minute (QEMU's STOP -> RESUME on
the lab's monitor, and the engine's metrics), request -> STOP from the engine's histogram,
then down; then the same with ``--qemu-filters``. Prints one table with both paths and the
ratios. It prints, it never asserts. Needs root (namespaces). Traffic only goes from the
lab's client namespace to the lab's guest.

    python3 bench/lab_bench.py [--seconds 20] [--clients 4]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coloproxy.lab import client
from coloproxy.lab import lab as labmod
from coloproxy.lab.demo import CheckpointWatch

PAGE = "/index.html"
PREFIX = "cpbench"
RUN_DIR = Path("/run/coloproxy-lab-bench")


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class PathResult:
    name: str
    up_s: float | None = None
    error: str = ""
    phases: dict[str, Phase] = field(default_factory=dict)
    checkpoints: int = 0
    window_s: float = 0.0
    pause_p50_ms: float | None = None
    engine: dict[str, int] = field(default_factory=dict)
    req_to_stop: str = "n/a"

    @property
    def per_minute(self) -> float | None:
        return self.checkpoints * 60 / self.window_s if self.window_s else None


def _client_worker(end: float, expected: bytes, phase: Phase, lock: threading.Lock) -> None:
    """Runs inside the client namespace: GET over a fresh connection until ``end``."""
    while time.monotonic() < end:
        one = client.attempt(PAGE, expected)
        with lock:
            if one.ok:
                phase.latencies_ms.append((one.ended - one.started) * 1000)
            else:
                phase.failed += 1


def run_phase(lab: labmod.Lab, name: str, clients: int, seconds: float) -> Phase:
    phase = Phase(name)
    expected = client.index_html()
    lock = threading.Lock()
    started = time.monotonic()
    end = started + seconds
    threads = [
        threading.Thread(
            target=lab.topology.run_in,
            args=("client", _client_worker, end, expected, phase, lock),
            daemon=True,
        )
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + client.REQUEST_TIMEOUT_S + 10)
    phase.seconds = time.monotonic() - started
    return phase


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets, sum, count) of one histogram in a Prometheus scrape."""
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            match = re.search(r'le="([^"]+)"', line)
            if match:
                buckets.append((float(match.group(1)), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(name + "_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            count = float(line.rsplit(" ", 1)[1])
    return buckets, total, count


def req_to_stop(before: str, after: str) -> str:
    """Request -> primary STOP over the window: mean and bucket bounds of p50/p90."""
    name = "coloproxy_engine_request_to_stop_seconds"
    b0, s0, c0 = histogram(before, name)
    b1, s1, c1 = histogram(after, name)
    count = c1 - c0
    if not b1 or count <= 0:
        return "none in the window" if b1 else "n/a"
    start = dict(b0)
    delta = [(le, cum - start.get(le, 0.0)) for le, cum in b1]

    def bound(q: float) -> str:
        for le, cum in delta:
            if cum >= q * count:
                return "inf" if le == float("inf") else f"<={le * 1000:g}"
        return "?"

    mean = (s1 - s0) / count * 1000
    return f"n {count:.0f}, mean {mean:.1f} ms, p50 {bound(0.5)}, p90 {bound(0.9)} ms"


def measure(qemu_filters: bool, seconds: float, clients: int) -> PathResult:
    name = "QEMU colo-compare" if qemu_filters else "coloproxy"
    result = PathResult(name)
    lab = labmod.Lab(PREFIX, RUN_DIR, qemu_filters=qemu_filters)
    print(f"\n== {name}: lab up (namespaces {PREFIX}-*, run dir {RUN_DIR})", flush=True)
    try:
        started = time.monotonic()
        lab.up()
        result.up_s = time.monotonic() - started
        watch = CheckpointWatch(lab.paths).start()
        try:
            scrape0 = "" if qemu_filters else lab.scrape()
            engine0 = {} if qemu_filters else lab.engine_checkpoints()
            n0 = len(watch.pauses_ms())
            t0 = time.monotonic()
            lab.progress(f"sequential: 1 client, new connection per GET {PAGE}, {seconds:.0f} s")
            result.phases["seq"] = run_phase(lab, "seq", 1, seconds)
            lab.progress(f"concurrent: {clients} clients, {seconds:.0f} s")
            result.phases["conc"] = run_phase(lab, "conc", clients, seconds)
            result.window_s = time.monotonic() - t0
            pauses = watch.pauses_ms()
            result.checkpoints = len(pauses) - n0
            window = sorted(pauses[n0:])
            if window:
                result.pause_p50_ms = window[len(window) // 2]
            if not qemu_filters:
                engine1 = lab.engine_checkpoints()
                result.engine = {k: v - engine0.get(k, 0) for k, v in engine1.items()}
                result.req_to_stop = req_to_stop(scrape0, lab.scrape())
        finally:
            watch.stop()
    except Exception as exc:  # printed, never raised: the other path still runs
        result.error = f"{type(exc).__name__}: {exc}"
        print(f"   FAILED: {result.error}", flush=True)
    finally:
        lab.progress("taking the lab down")
        try:
            lab.down()
        except Exception as exc:
            print(f"   down failed: {type(exc).__name__}: {exc}", flush=True)
    return result


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(ours: float | None, qemu: float | None) -> str:
    if ours is None or qemu is None or qemu == 0:
        return "-"
    return f"{ours / qemu:.2f}x"


def table(ours: PathResult, qemu: PathResult, clients: int) -> str:
    rows: list[tuple[str, str, str, str]] = []
    rows.append(("lab up (s)", _f(ours.up_s), _f(qemu.up_s), ""))
    for key, label in (("seq", "sequential, 1 client"), ("conc", f"concurrent, {clients}")):
        a, b = ours.phases.get(key), qemu.phases.get(key)
        rows.append(
            (
                f"{label}: req/s",
                _f(a.rate if a else None),
                _f(b.rate if b else None),
                _ratio(a.rate if a else None, b.rate if b else None),
            )
        )
        for q, tag in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
            x, y = (a.pct(q) if a else None), (b.pct(q) if b else None)
            rows.append((f"{label}: {tag} ms", _f(x), _f(y), _ratio(x, y)))
        rows.append(
            (
                f"{label}: served/failed",
                f"{len(a.latencies_ms)}/{a.failed}" if a else "-",
                f"{len(b.latencies_ms)}/{b.failed}" if b else "-",
                "",
            )
        )
    rows.append(("checkpoints/min (QEMU STOP)", _f(ours.per_minute), _f(qemu.per_minute), ""))
    rows.append(("checkpoint pause p50 ms", _f(ours.pause_p50_ms), _f(qemu.pause_p50_ms), ""))
    engine = ", ".join(f"{k} {v}" for k, v in sorted(ours.engine.items()) if v) or "-"
    rows.append(("engine checkpoints by reason", engine, "n/a (no engine)", ""))
    rows.append(("request -> STOP (engine)", ours.req_to_stop, "n/a", ""))
    head = ("", "coloproxy", "QEMU colo-compare", "ours/QEMU")
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for res in (ours, qemu):
        if res.error:
            lines.append(f"{res.name}: FAILED: {res.error}")
    return "\n".join(lines)


def targets(ours: PathResult, qemu: PathResult) -> str:
    out = []
    for key in ("seq", "conc"):
        a, b = ours.phases.get(key), qemu.phases.get(key)
        if not a or not b or not b.rate:
            out.append(f"{key}: not measured")
            continue
        ratio = a.rate / b.rate
        p90a, p90b = a.pct(0.9), b.pct(0.9)
        lower = p90a is not None and p90b is not None and p90a < p90b
        out.append(
            f"{key}: req/s {ratio:.2f}x (target >= 1.5x: {'met' if ratio >= 1.5 else 'not met'});"
            f" p90 {_f(p90a)} vs {_f(p90b)} ms (target lower: {'met' if lower else 'not met'})"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent phase (default 4)")
    args = parser.parse_args()
    print(f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print(f"command: {shlex.join(['python3', *sys.argv])}")
    print(f"host: {platform.node()}, {platform.platform()}, python {platform.python_version()}")
    ours = measure(False, args.seconds, args.clients)
    qemu = measure(True, args.seconds, args.clients)
    print(f"\n== lab bench: GET {PAGE}, new connection per request, {args.seconds:.0f} s/phase")
    print(table(ours, qemu, args.clients))
    print(targets(ours, qemu))
    print("(QEMU's path measured earlier: median 7.5-9.8 ms, p90 about 60 ms at a 2 s period)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
