#!/usr/bin/env python3
"""QEMU's colo-compare against coloproxy's chardev transport, side by side, in one run.

    python3 bench/chardev_bench.py [--packets N] [--workload NAME ...] [--vnet off on]

One feeder (bench/qemu_colo_compare.py's ``Feeder``), the same framed streams, two
comparators behind the same three unix sockets:

* qemu: colo-compare alone in ``qemu-system-x86_64 -machine none`` (as compare_bench.py),
  with ``vnet_hdr_support=on`` in the vnet rows;
* coloproxy: the real daemon, ``python3 -m coloproxy run -c FILE --no-setup`` in its own
  process, with a ``chardev`` section (coloproxy listens on the three sockets, as QEMU's
  server chardevs do here). Before timing, the harness completes the daemon's restart
  checkpoint over its control socket (role engine): a new proxy holds everything until then
  (I6).

Both get the secondary already in the primary's sequence space (what QEMU's filter-rewriter
does on the secondary host before either comparator sees it). With vnet on, every frame
carries the 8-byte length pair and a 12-byte virtio-net header (all zero: no offloads).

Before timing, each comparator is probed: an ARP frame on both inputs until one comes out of
outdev (colo-compare passes the primary's uncompared and discards the secondary's; coloproxy
compares the two). Then the clock runs from the feeder's first write to the last released
frame. Figures: primary packets released per second, primary payload Gbit/s, the ratio
coloproxy/qemu (above 1: coloproxy faster), and CPU time of each comparing process per
released packet. Prints, asserts nothing; the exit status is 1 if a run failed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import select
import shlex
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

BENCH_DIR: Final = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT: Final = os.path.dirname(BENCH_DIR)
for _path in (BENCH_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from compare_bench import comparator_variant, secondary_leads  # noqa: E402
from qemu_colo_compare import (  # noqa: E402
    IDLE_TIMEOUT,
    PROBE_FRAME,
    QEMU_BINARY,
    RECV_SIZE,
    STARTUP_TIMEOUT,
    BenchError,
    Feeder,
    FramedStreams,
    RunResult,
    process_cpu_seconds,
    qemu_command,
    qemu_version,
    running_comparator,
)
from qemu_colo_compare import frame_streams as qemu_frame_streams  # noqa: E402
from runstats import (  # noqa: E402
    MIN_RUNS,
    Figure,
    cpu_ratio,
    figure,
    load,
    load_one,
    ratio,
    socket_probe,
)
from workloads import DESCRIPTIONS, NAMES, Workload, make_workload  # noqa: E402

DEFAULT_PACKETS: Final = 20_000
VNET_HEADER: Final = bytes(12)  # struct virtio_net_hdr_mrg_rxbuf, no offload flags
_LENGTH: Final = struct.Struct("!I")
_LENGTHS: Final = struct.Struct("!II")

OURS_CONFIG: Final = """\
pair: {{name: bench, role: primary}}
net:
  guest_port: bench0
  replication: {{local: 10.255.0.1, remote: 10.255.0.2}}
control: {{socket: {dir}/ctl.sock}}
metrics: {{enabled: false}}
log: {{level: warning}}
chardev:
  primary_in: {{unix: {dir}/pin, server: true}}
  secondary_in: {{unix: {dir}/sin, server: true}}
  outdev: {{unix: {dir}/out, server: true}}
  vnet_hdr: {vnet}
"""


# -- framing ---------------------------------------------------------------------------------


def frame(packet: bytes, vnet: bool) -> bytes:
    if not vnet:
        return _LENGTH.pack(len(packet)) + packet
    return _LENGTHS.pack(len(VNET_HEADER) + len(packet), len(VNET_HEADER)) + VNET_HEADER + packet


def frame_streams(workload: Workload, vnet: bool) -> FramedStreams:
    """Both sides serialized once, with or without vnet headers (the same schedule as
    qemu_colo_compare.frame_streams)."""
    return qemu_frame_streams(workload, framing=lambda packet: frame(packet, vnet))


def count_frames(
    sock: socket.socket, expected: int, feeder: Feeder, vnet: bool
) -> tuple[int, float | None]:
    """qemu_colo_compare.count_frames, for either framing: frames read off ``sock`` until
    ``expected`` came or the output went quiet after the feeder ended."""
    header = 8 if vnet else 4
    sock.setblocking(True)
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    carried = count = 0
    last_frame_at: float | None = None
    last_data_at = time.perf_counter()
    unpack_length = _LENGTH.unpack_from
    while count < expected:
        readable, _, _ = select.select([sock], [], [], 0.2)
        now = time.perf_counter()
        if not readable:
            if feeder.error is not None:
                break
            if not feeder.is_alive() and now - last_data_at > IDLE_TIMEOUT:
                break
            if now - last_data_at > 10 * IDLE_TIMEOUT:
                break
            continue
        got = sock.recv_into(view[carried:])
        if not got:
            break
        last_data_at = now
        available = carried + got
        position = 0
        while position + header <= available:
            end = position + header + unpack_length(buffer, position)[0]
            if end > available:
                break
            position = end
            count += 1
        if position:
            last_frame_at = now
        carried = available - position
        if carried and position:
            buffer[:carried] = bytes(view[position:available])
    return count, last_frame_at


def timed_run(
    sockets: tuple[socket.socket, socket.socket, socket.socket],
    streams: FramedStreams,
    workload: Workload,
    vnet: bool,
    pid: int,
) -> RunResult:
    primary, secondary, out = sockets
    feeder = Feeder(primary, secondary, streams)
    cpu_before = process_cpu_seconds(pid)
    started = time.perf_counter()
    feeder.start()
    released, last_frame_at = count_frames(out, len(workload.primary_frames), feeder, vnet)
    feeder.join(timeout=10.0)
    if feeder.error is not None:
        raise BenchError(f"feeder failed: {feeder.error!r}") from feeder.error
    seconds = (last_frame_at - started) if last_frame_at is not None else 0.0
    return RunResult(
        len(workload.primary_frames),
        released,
        seconds,
        workload.payload_bytes_total,
        server_cpu=process_cpu_seconds(pid) - cpu_before,
    )


# -- the two comparators ---------------------------------------------------------------------


def probe(sockets: tuple[socket.socket, socket.socket, socket.socket], vnet: bool) -> None:
    """ARP on both inputs until one comes out of outdev; then drain outdev until quiet."""
    primary, secondary, out = sockets
    framed = frame(PROBE_FRAME, vnet)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        primary.sendall(framed)
        secondary.sendall(framed)
        readable, _, _ = select.select([out], [], [], 0.05)
        if readable:
            out.setblocking(False)
            received = 0
            quiet_until = time.monotonic() + 0.3
            while time.monotonic() < quiet_until:
                with contextlib.suppress(BlockingIOError):
                    data = out.recv(RECV_SIZE)
                    if not data:
                        raise BenchError("outdev closed during the probe")
                    received += len(data)
                    quiet_until = time.monotonic() + 0.3
                time.sleep(0.01)
            out.setblocking(True)
            if received % len(framed):
                raise BenchError(f"probe: {received} bytes out is not whole probe frames")
            return
    raise BenchError(f"no probe came out of outdev in {STARTUP_TIMEOUT} s")


def complete_restart_checkpoint(control: str) -> None:
    """Play the checkpoint engine for the new daemon's restart request (I6)."""
    from coloproxy.control import ControlClient
    from coloproxy.protocol import (
        CheckpointCompleted,
        CheckpointRequest,
        CheckpointStarted,
        ClientRole,
    )

    async def engine() -> None:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            client = await ControlClient.connect(control, ClientRole.ENGINE, name="bench")
            async with client:
                async for push in client:
                    if isinstance(push, CheckpointRequest):
                        now = time.time()
                        await client.request(CheckpointStarted(request=push.id, time=now))
                        await client.request(
                            CheckpointCompleted(request=push.id, started=now, completed=time.time())
                        )
                        return

    asyncio.run(engine())


def qemu_vnet_command(binary: str, vnet: bool) -> Callable[[str], list[str]]:
    def command(directory: str) -> list[str]:
        argv = qemu_command(directory, binary)
        if vnet:
            argv[-1] += ",vnet_hdr_support=on"
        return argv

    return command


def ours_command(vnet: bool) -> Callable[[str], list[str]]:
    def command(directory: str) -> list[str]:
        path = os.path.join(directory, "bench.yaml")
        with open(path, "w") as config:
            config.write(OURS_CONFIG.format(dir=directory, vnet=str(vnet).lower()))
        return [sys.executable, "-m", "coloproxy", "run", "-c", path, "--no-setup"]

    return command


def ours_env() -> dict[str, str]:
    """The daemon runs this checkout's coloproxy, installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def run_qemu_once(workload: Workload, streams: FramedStreams, vnet: bool, binary: str) -> RunResult:
    with running_comparator(
        qemu_vnet_command(binary, vnet), lambda sockets: probe(sockets, vnet)
    ) as (sockets, pid):
        return timed_run(sockets, streams, workload, vnet, pid)


def run_ours_once(workload: Workload, streams: FramedStreams, vnet: bool) -> RunResult:
    with running_comparator(
        ours_command(vnet),
        lambda sockets: probe(sockets, vnet),
        name="coloproxy",
        before_connect=lambda d: complete_restart_checkpoint(os.path.join(d, "ctl.sock")),
        env=ours_env(),
    ) as (sockets, pid):
        return timed_run(sockets, streams, workload, vnet, pid)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    vnet: bool
    load: str = ""
    packets: int = 0
    ours: Figure | None = None
    qemu: Figure | None = None
    notes: list[str] = field(default_factory=list)


def measure(name: str, vnet: bool, args: argparse.Namespace) -> Row:
    """One row: ``--repeat`` runs of coloproxy and colo-compare, alternately; medians."""
    label = f"{name} vnet {'on' if vnet else 'off'}"
    row = Row(name, vnet, load=load_one())
    print(f"  {label}: load {load()} (1, 5, 15 min) at the start", flush=True)
    workload = make_workload(name, args.packets, secondary_in_primary_seq_space=True)
    row.packets = len(workload.primary_frames)
    streams = frame_streams(workload, vnet)
    qemu_streams = streams
    if not args.skip_qemu:
        # colo-compare matches non-TCP newest-primary-first and drops at 1024 queued
        # (bench/README.md): if a trial run stalls, its timed runs get the secondary one
        # chunk ahead (udp always: a trial that passes does not mean the timed runs will).
        trial = run_qemu_once(workload, streams, vnet, args.qemu_binary)
        if not trial.complete or name == "udp":
            qemu_streams = secondary_leads(streams)
            row.notes.append(
                f"{label}: colo-compare's trial run with the primary fed first released "
                f"{trial.released} of {row.packets}; its timed runs feed the secondary one "
                "chunk ahead"
            )
    ours: list[RunResult] = []
    qemu: list[RunResult] = []
    for _ in range(args.repeat):  # alternate: a burst of load hits both alike
        if not args.skip_ours:
            ours.append(run_ours_once(workload, streams, vnet))
        if not args.skip_qemu:
            qemu.append(run_qemu_once(workload, qemu_streams, vnet, args.qemu_binary))
    if ours:
        row.ours = figure(ours)
        short = [run.released for run in ours if not run.complete]
        if short:
            row.notes.append(f"{label}: coloproxy released only {short} of {row.packets}")
    if qemu:
        row.qemu = figure(qemu)
    return row


def render(rows: list[Row]) -> str:
    header = (
        "workload", "vnet", "load", "pkts", "coloproxy pkt/s (low-high)", "us cpu/pkt (low-high)",
        "qemu pkt/s (low-high)", "us cpu/pkt (low-high)", "coloproxy/qemu", "cpu qemu/coloproxy",
    )  # fmt: skip
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        lines.append(
            (
                row.name,
                "on" if row.vnet else "off",
                row.load or "-",
                f"{row.packets:,}",
                row.ours.rate_text() if row.ours else "-",
                row.ours.cpu_text() if row.ours else "-",
                row.qemu.rate_text() if row.qemu else "-",
                row.qemu.cpu_text() if row.qemu else "-",
                ratio(row.ours, row.qemu),
                cpu_ratio(row.ours, row.qemu),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rendered = []
    for number, line in enumerate(lines):
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        rendered.append("  ".join(cells))
        if number == 0:
            rendered.append("  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="QEMU's colo-compare against coloproxy's chardev transport.",
        epilog="Workloads: " + "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items()),
    )
    parser.add_argument(
        "--packets",
        type=int,
        default=DEFAULT_PACKETS,
        help=f"primary data packets per workload (default {DEFAULT_PACKETS:,})",
    )
    parser.add_argument("--workload", nargs="+", choices=NAMES, default=list(NAMES),
                        metavar="NAME", help=f"default all: {' '.join(NAMES)}")  # fmt: skip
    parser.add_argument("--vnet", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="vnet header framing (default both)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=MIN_RUNS,
                        help=f"runs per figure, median shown (at least {MIN_RUNS})")  # fmt: skip
    parser.add_argument("--skip-qemu", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--qemu-binary", default=QEMU_BINARY)
    args = parser.parse_args(argv)
    if args.packets <= 0:
        parser.error("--packets must be positive")
    if args.repeat < MIN_RUNS:
        parser.error(f"--repeat must be at least {MIN_RUNS}: a figure is a median of runs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    print(f"date      {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"command   {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"python    {platform.python_implementation()} {platform.python_version()}")
    variant, stale = comparator_variant()
    print(f"coloproxy {variant}")
    if stale:
        print(f"error: stale compiled modules: {' '.join(stale)}")
        return 2
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        print("loop      uvloop")
    print(f"qemu      {qemu_version(args.qemu_binary) if not args.skip_qemu else 'skipped'}")
    print(f"host      {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"syscalls  {socket_probe()}")
    print(
        f"qemu cmd  {shlex.join(qemu_command('<tmpdir>', args.qemu_binary))}[,vnet_hdr_support=on]"
    )
    print("ours cmd  python3 -m coloproxy run -c <tmpdir>/bench.yaml --no-setup")
    print(f"load      {load()} (1, 5, 15 min) at the start")
    print(
        f"runs      median of {args.repeat}, coloproxy and qemu alternately; {args.packets:,} "
        "primary data packets per workload"
    )
    print(flush=True)
    rows: list[Row] = []
    failed = False
    for name in args.workload:
        for vnet in (value == "on" for value in args.vnet):
            step = time.monotonic()
            try:
                rows.append(measure(name, vnet, args))
            except BenchError as exc:
                failed = True
                rows.append(Row(name, vnet, notes=[f"{name}: FAILED: {exc}"]))
            print(f"  {name} vnet {'on' if vnet else 'off'}: {time.monotonic() - step:.1f} s",
                  flush=True)  # fmt: skip
    print()
    print(render(rows))
    print()
    print(
        "Medians of the runs (lowest-highest). load: 1-minute load average when the row "
        "started. pkt/s: primary packets released per second, from the feeder's first write "
        "to the last released frame. us cpu/pkt: CPU time of the comparing process per "
        "released primary packet (its secondary packet included). coloproxy/qemu: pkt/s "
        "ratio (above 1: coloproxy faster); cpu qemu/coloproxy: QEMU's CPU per packet over "
        "coloproxy's (above 1: coloproxy needs less). ! = not every packet came out."
    )
    for row in rows:
        for note in row.notes:
            print(f"note: {note}")
    print(f"load      {load()} (1, 5, 15 min) at the end")
    print(f"total {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
