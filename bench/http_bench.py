#!/usr/bin/env python3
"""Real HTTP clients (ab, wrk) against the lab's VM pair: through coloproxy and through QEMU's
colo-compare, alternating, in one run.

Each round brings the lab up with one path (``coloproxy lab up`` or ``--qemu-filters``), runs
every row below from the client namespace against the guest, and takes it down; the next
round starts with the other path. Per row: requests per second, latency p50/p90/p99/max,
failures, checkpoints by reason (coloproxy: the engine's counters; QEMU's path: the pauses the
lab's monitor saw), the two guests' TCP retransmissions (their ``tcpstat`` console lines) and
the client's. Then the median over the rounds of each figure and the ratio. It prints, it
never asserts. Needs root, Debian's ``wrk`` and ``apache2-utils`` (scripts/setup installs
them). Traffic goes only from the lab's client namespace to the lab's guest.

    python3 bench/http_bench.py [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coloproxy.lab import lab as labmod
from coloproxy.lab.console import guest_retransmissions as console_retransmissions
from coloproxy.lab.demo import CheckpointWatch
from coloproxy.lab.topology import GUEST_IPV4

PREFIX = "cphttp"
RUN_DIR = Path("/run/coloproxy-lab-http")
UPLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class Row:
    name: str
    argv: tuple[str, ...]  # {url} and {upload} are filled in
    deterministic: bool = True


def rows(seconds: int) -> list[Row]:
    duration = f"{seconds}s"
    return [
        Row("ab c1 new conn /index.html", ("ab", "-q", "-n", "300", "-c", "1", "{url}/index.html")),
        Row("ab c4 new conn /index.html", ("ab", "-q", "-n", "400", "-c", "4", "{url}/index.html")),
        Row("ab -k c4 /index.html", ("ab", "-q", "-k", "-n", "800", "-c", "4", "{url}/index.html")),
        Row(
            "wrk c1 /big.bin",
            ("wrk", "-t1", "-c1", f"-d{duration}", "--latency", "{url}/big.bin"),
        ),
        Row(
            "wrk c2 /big.bin",
            ("wrk", "-t1", "-c2", f"-d{duration}", "--latency", "{url}/big.bin"),
        ),
        Row(
            "ab c1 1 MB POST /cgi-bin/upload",
            (
                "ab",
                "-q",
                "-n",
                "20",
                "-c",
                "1",
                "-p",
                "{upload}",
                "-T",
                "application/octet-stream",
                "{url}/cgi-bin/upload",
            ),
        ),
    ]


@dataclass
class Figures:
    rate: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    failed: int = 0
    checkpoints: dict[str, int] = field(default_factory=dict)
    guest_retrans: int | None = None
    client_retrans: int | None = None
    load: float = 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(text)
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(out: str) -> Figures:
    figures = Figures()
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        figures.rate = float(m[1])
    for pct, attr in (("50", "p50"), ("90", "p90"), ("99", "p99")):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M):
            setattr(figures, attr, _ms(m[1]))
    if m := re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out):
        figures.max = _ms(m[1])
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures.failed = sum(int(x) for x in errors.groups()) if errors else 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        figures.failed += int(m[1])
    return figures


def parse_ab(out: str) -> Figures:
    figures = Figures()
    if m := re.search(r"Requests per second:\s+([\d.]+)", out):
        figures.rate = float(m[1])
    for pct, attr in (("50", "p50"), ("90", "p90"), ("99", "p99"), ("100", "max")):
        if m := re.search(rf"^\s+{pct}%\s+(\d+)", out, re.M):
            setattr(figures, attr, float(m[1]))
    for label in ("Failed requests", "Non-2xx responses"):
        if m := re.search(rf"{label}:\s+(\d+)", out):
            figures.failed += int(m[1])
    return figures


def client_retransmissions() -> int:
    text = subprocess.run(
        ["ip", "netns", "exec", f"{PREFIX}-client", "cat", "/proc/net/snmp"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names, values = [line.split() for line in text.splitlines() if line.startswith("Tcp:")][:2]
    return int(values[names.index("RetransSegs")])


def guest_retransmissions(lab: labmod.Lab) -> int | None:
    counts = [console_retransmissions(lab.paths, role) for role in ("primary", "secondary")]
    return None if None in counts else sum(c for c in counts if c is not None)


def checkpoints(lab: labmod.Lab, watch: CheckpointWatch, qemu: bool) -> dict[str, int]:
    if qemu:
        return {"pauses": len(watch.pauses_ms())}
    return dict(lab.engine_checkpoints())


def run_path(qemu: bool, table: list[Row], upload: Path) -> dict[str, Figures]:
    name = "QEMU colo-compare" if qemu else "coloproxy"
    lab = labmod.Lab(PREFIX, RUN_DIR, qemu_filters=qemu)
    results: dict[str, Figures] = {}
    print(f"\n== {name}: lab up ({PREFIX}-*, {RUN_DIR})", flush=True)
    try:
        lab.up()
        watch = CheckpointWatch(lab.paths).start()
        try:
            for row in table:
                load = os.getloadavg()[0]
                before = checkpoints(lab, watch, qemu)
                guests0, client0 = guest_retransmissions(lab), client_retransmissions()
                argv = [a.format(url=f"http://{GUEST_IPV4}", upload=upload) for a in row.argv]
                out = subprocess.run(
                    ["ip", "netns", "exec", f"{PREFIX}-client", *argv],
                    check=False, capture_output=True, text=True, timeout=600,
                ).stdout  # fmt: skip
                time.sleep(1.2)  # one more tcpstat line from each guest
                figures = parse_wrk(out) if argv[0] == "wrk" else parse_ab(out)
                after = checkpoints(lab, watch, qemu)
                figures.checkpoints = {
                    k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)
                }
                guests1 = guest_retransmissions(lab)
                if guests0 is not None and guests1 is not None:
                    figures.guest_retrans = guests1 - guests0
                figures.client_retrans = client_retransmissions() - client0
                figures.load = load
                results[row.name] = figures
                print(f"   load {load:.2f}  {row.name}: {_line(figures)}", flush=True)
        finally:
            watch.stop()
    except Exception as exc:  # printed, never raised: the other path still runs
        print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
    finally:
        try:
            lab.down()
        except Exception as exc:
            print(f"   down failed: {type(exc).__name__}: {exc}", flush=True)
    return results


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _line(f: Figures) -> str:
    return (
        f"{_f(f.rate)} req/s p50 {_f(f.p50)} p90 {_f(f.p90)} p99 {_f(f.p99)} max {_f(f.max)} ms,"
        f" failed {f.failed}, checkpoints {f.checkpoints or '{}'},"
        f" retrans guests {f.guest_retrans} client {f.client_retrans}"
    )


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summary(table: list[Row], runs: dict[bool, list[dict[str, Figures]]]) -> str:
    lines = [
        "| row | path | req/s | p50 ms | p90 ms | p99 ms | max ms | failed | checkpoints"
        " (last run) | guest retrans (sum) | req/s ratio | p99 <= QEMU's |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in table:
        medians: dict[bool, dict[str, float | None]] = {}
        for qemu in (False, True):
            figures = [run[row.name] for run in runs[qemu] if row.name in run]
            medians[qemu] = {
                attr: _median([getattr(f, attr) for f in figures])
                for attr in ("rate", "p50", "p90", "p99", "max")
            }
            failed = sum(f.failed for f in figures)
            retrans = sum(f.guest_retrans or 0 for f in figures)
            last = figures[-1].checkpoints if figures else {}
            ratio = p99_ok = ""
            if not qemu:
                ours, theirs = medians[False]["rate"], None
            else:
                ours, theirs = medians[False]["rate"], medians[True]["rate"]
                if ours and theirs:
                    ratio = f"{ours / theirs:.2f}x"
                mine, qemus = medians[False]["p99"], medians[True]["p99"]
                if mine is not None and qemus is not None:
                    p99_ok = "yes" if mine <= qemus else "no"
            m = medians[qemu]
            lines.append(
                f"| {row.name} | {'QEMU' if qemu else 'coloproxy'} | {_f(m['rate'])} |"
                f" {_f(m['p50'])} | {_f(m['p90'])} | {_f(m['p99'])} | {_f(m['max'])} |"
                f" {failed} | {last} | {retrans} | {ratio} | {p99_ok} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path (alternating)")
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk row")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("http_bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    table = rows(args.seconds)
    print(
        f"http_bench {datetime.datetime.now().isoformat(timespec='seconds')}"
        f" load {os.getloadavg()} cpus {os.cpu_count()}",
        flush=True,
    )
    runs: dict[bool, list[dict[str, Figures]]] = {False: [], True: []}
    with tempfile.NamedTemporaryFile(suffix=".bin") as upload:
        upload.write(bytes((i * 131 + 7) % 251 for i in range(UPLOAD_BYTES)))
        upload.flush()
        for round_number in range(args.rounds):
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for qemu in order:
                runs[qemu].append(run_path(qemu, table, Path(upload.name)))
    print(f"\nmedian of {args.rounds} round(s) each, paths alternating:\n")
    print(summary(table, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
