#!/usr/bin/env python3
"""Benchmark our comparator against QEMU's colo-compare on the same frames, in one run.

    python3 bench/compare_bench.py [--packets N] [--workload NAME ...] [--skip-qemu]

For each workload (see bench/workloads.py and bench/README.md) it measures:

* ours, in-process: ``Comparator.feed`` called in a loop on pre-built frames, primary and
  secondary interleaved by stream position; no sockets. The comparator's own cost.
* ours, over sockets: the comparator in a child process behind three unix sockets that speak
  colo-compare's chardev framing (4-byte big-endian length + frame); it parses the framing,
  feeds the comparator, writes released primary frames to the output socket. Driven by the
  very harness that drives QEMU, so it pays the same socket I/O: the fair comparison.
* QEMU: colo-compare in ``qemu-system-x86_64 -machine none`` (bench/qemu_colo_compare.py).
* the feeder alone: the harness writing into sockets that only read, to show the ceiling of
  the measurement itself.

Every figure is the median of ``--repeat`` runs (at least 3), with the lowest and highest in
brackets; ours over sockets and QEMU run alternately, and the load average is printed before
each row (bench/runstats.py). Rates count primary packets
released per second; Gbit/s counts primary payload bits (headers excluded) per second.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import multiprocessing
import multiprocessing.connection
import os
import platform
import select
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

BENCH_DIR: Final = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT: Final = os.path.dirname(BENCH_DIR)
for _path in (BENCH_DIR, REPO_ROOT):  # run from anywhere, installed or not
    if _path not in sys.path:
        sys.path.insert(0, _path)

from qemu_colo_compare import (  # noqa: E402
    CHUNK_ENTRIES,
    QEMU_BINARY,
    BenchError,
    FramedStreams,
    RunResult,
    connect_unix,
    feeder_alone,
    frame_streams,
    process_cpu_seconds,
    qemu_command,
    qemu_version,
    running_qemu,
    timed_run,
)
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
from workloads import DESCRIPTIONS as BASE_DESCRIPTIONS  # noqa: E402
from workloads import Workload, make_workload  # noqa: E402

DEFAULT_PACKETS: Final = 100_000
DEFAULT_REPEAT: Final = 3
# Read the clock once per this many packets: a shell reads it once per receive batch, and
# time.monotonic() per packet would cost more than some of what we measure.
CLOCK_BATCH: Final = 64
RECV_SIZE: Final = 1 << 20
CHILD_TIMEOUT: Final = 30.0
_LENGTH: Final = struct.Struct("!I")

# A workload with retransmissions of bytes already compared: tcp-1, and after every
# RESEND_EVERY-th data segment each side sends the segment RESEND_LAG before it again (same
# bytes, as a retransmission after a lost ACK would). The comparator keeps compared bytes to
# compare such resends with (CompareConfig.retransmit_window); this shows what that costs.
RESEND_WORKLOAD: Final = "tcp-1-resend"
RESEND_EVERY: Final = 10
RESEND_LAG: Final = 8
DESCRIPTIONS: Final = {
    **BASE_DESCRIPTIONS,
    RESEND_WORKLOAD: (
        f"tcp-1, and after every {RESEND_EVERY}th segment both sides resend the segment "
        f"{RESEND_LAG} before it (compared already: a retransmission)"
    ),
}
NAMES: Final = tuple(DESCRIPTIONS)


def bench_workload(
    name: str, packets: int, *, secondary_in_primary_seq_space: bool = False
) -> Workload:
    """``workloads.make_workload``, plus the resend workload built on tcp-1."""
    if name != RESEND_WORKLOAD:
        return make_workload(
            name, packets, secondary_in_primary_seq_space=secondary_in_primary_seq_space
        )
    base = make_workload(
        "tcp-1", packets, secondary_in_primary_seq_space=secondary_in_primary_seq_space
    )
    primary, primary_lengths, resent = _with_resends(
        base.primary_frames, base.primary_payload_lengths
    )
    secondary, secondary_lengths, _ = _with_resends(
        base.secondary_frames, base.secondary_payload_lengths
    )
    return Workload(
        name,
        DESCRIPTIONS[name],
        primary,
        secondary,
        primary_lengths,
        secondary_lengths,
        base.payload_bytes_total + resent,
    )


def _with_resends(frames: list[bytes], lengths: list[int]) -> tuple[list[bytes], list[int], int]:
    """The frames with resends inserted; a resend counts 0 bytes for the schedule, so each
    side's comes right after the segment it follows (frame 0 is the SYN-ACK)."""
    out_frames: list[bytes] = []
    out_lengths: list[int] = []
    resent = 0
    for index, (frame, length) in enumerate(zip(frames, lengths, strict=True)):
        out_frames.append(frame)
        out_lengths.append(length)
        if index > RESEND_LAG and index % RESEND_EVERY == 0:
            out_frames.append(frames[index - RESEND_LAG])
            out_lengths.append(0)
            resent += lengths[index - RESEND_LAG]
    return out_frames, out_lengths, resent


# -- ours, in-process ------------------------------------------------------------------------


@dataclass
class Verdicts:
    """What the comparator said, counted; ``problems`` lists every failed check."""

    primary: int
    released: int = 0
    released_twice: int = 0
    secondary_released: int = 0
    checkpoints: int = 0
    malformed: int = 0
    first_checkpoint: str = ""
    problems: list[str] = field(default_factory=list)

    def check(self, name: str) -> None:
        if self.released != self.primary:
            self.problems.append(f"released {self.released} of {self.primary} primary packets")
        if self.released_twice:
            self.problems.append(f"{self.released_twice} primary packets released twice")
        if self.secondary_released:
            self.problems.append(f"{self.secondary_released} secondary packets released")
        if self.checkpoints:
            self.problems.append(
                f"{self.checkpoints} checkpoint requests on identical output, first: "
                f"{self.first_checkpoint}"
            )
        if self.malformed:
            self.problems.append(f"{self.malformed} packets reported malformed")
        if self.problems:
            raise BenchError(f"ours on {name}: " + "; ".join(self.problems))


def _sides() -> tuple[Any, Any]:
    from coloproxy.compare import Side

    return Side.PRIMARY, Side.SECONDARY


def _new_comparator() -> Any:
    from coloproxy.compare import Comparator, CompareConfig, Framing

    return Comparator(CompareConfig(framing=Framing.ETHERNET))


def _event_counter(
    verdicts: Verdicts,
    marks: bytearray,
    frames: list[bytes] | None = None,
    outgoing: list[bytes] | None = None,
    others_only: bool = False,
) -> Callable[[list[Any]], None]:
    """A function that tallies one ``feed``'s events into ``verdicts``.

    Primary tokens are the packet index (>= 0); secondary tokens are negative. With
    ``frames`` and ``outgoing`` (the socket server), each newly released primary frame is
    also queued on ``outgoing``, framed, and forgotten from ``frames``: one pass over events.
    With ``others_only`` it counts only what is neither ``Release`` nor ``Drop``.
    """
    from coloproxy.compare.events import CheckpointNeeded, Drop, MalformedPacket, Release

    pack_length = _LENGTH.pack

    def count(events: list[Any]) -> None:
        for event in events:
            kind = type(event)
            if kind is Drop:
                continue
            if kind is Release:
                if others_only:
                    continue
                token = event.token
                if token < 0:
                    verdicts.secondary_released += 1
                elif marks[token]:
                    verdicts.released_twice += 1
                else:
                    marks[token] = 1
                    verdicts.released += 1
                    if frames is not None and outgoing is not None:
                        released = frames[token]
                        frames[token] = b""  # a shell forgets a released frame
                        outgoing.append(pack_length(len(released)))
                        outgoing.append(released)
            elif kind is CheckpointNeeded:
                if not event.coalesced:
                    verdicts.checkpoints += 1
                    if not verdicts.first_checkpoint:
                        verdicts.first_checkpoint = f"{event.reason} {event.flow}"
            elif kind is MalformedPacket:
                verdicts.malformed += 1

    return count


def run_ours_in_process(workload: Workload) -> RunResult:
    """Time ``Comparator.feed`` over the whole workload, interleaved by stream position."""
    primary_side, secondary_side = _sides()
    feed_list: list[tuple[Any, bytes, int]] = []
    for is_primary, index in workload.schedule():
        if is_primary:
            feed_list.append((primary_side, workload.primary_frames[index], index))
        else:
            feed_list.append((secondary_side, workload.secondary_frames[index], -1 - index))
    primary_count = len(workload.primary_frames)
    verdicts = Verdicts(primary_count)
    count = _event_counter(verdicts, bytearray(primary_count))
    comparator = _new_comparator()
    feed = comparator.feed
    get_timer = comparator.get_timer
    monotonic = time.monotonic
    cpu_started = time.process_time()
    started = time.perf_counter()
    for start in range(0, len(feed_list), CLOCK_BATCH):
        now = monotonic()
        for side, frame, token in feed_list[start : start + CLOCK_BATCH]:
            count(feed(side, frame, now, token))
        deadline = get_timer()
        if deadline is not None and deadline <= now:
            count(comparator.handle_timer(now))
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    verdicts.check(workload.name)
    return RunResult(
        primary_count, verdicts.released, seconds, workload.payload_bytes_total, server_cpu=cpu
    )


# -- ours, over sockets ----------------------------------------------------------------------


def _serve_ours(
    listeners: tuple[socket.socket, socket.socket, socket.socket],
    primary_count: int,
    report: multiprocessing.connection.Connection,
    batch: bool,
) -> None:
    """Child process: colo-compare's socket protocol in front of our comparator.

    Accepts primary_in, secondary_in and outdev; for each receive batch reads the clock once,
    parses the length framing, feeds the batch's frames (with one ``feed_many`` call when
    ``batch``, else ``feed`` per frame) and writes released primary frames (framed) to
    outdev. Reports its verdicts on ``report`` when both inputs reach end of file.
    """
    try:
        connections = [listener.accept()[0] for listener in listeners]
        for listener in listeners:
            listener.close()
        primary_in, secondary_in, out = connections
        from coloproxy.compare import CompareConfig
        from coloproxy.daemon import collector, heap

        collector.tune()  # as `coloproxy run` does
        heap.reserve(CompareConfig().max_retransmit_bytes)  # as `coloproxy run` does on host P
        report.send("ready")
        cpu_started = time.process_time()  # idle until the harness writes: CPU, not wall
        primary_side, secondary_side = _sides()
        comparator = _new_comparator()
        verdicts = Verdicts(primary_count)
        from coloproxy.compare.relay import HeldFrames
        from coloproxy.protocol.colo_frames import FrameDecoder

        # What the chardev transport does per receive, with the same compiled pieces: cut
        # the frames in place (FrameDecoder.cut), hold the primary's where they lie under
        # fresh tokens (HeldFrames.hold_frames), feed the batch, queue the released frames as
        # they came (runs of them as slices of the receive), write them once per pass.
        decoders = {primary_in: FrameDecoder(), secondary_in: FrameDecoder()}
        held = HeldFrames()
        open_inputs = [primary_in, secondary_in]
        feed_many = comparator.feed_many
        feed_one = comparator.feed
        # Releases are HeldFrames' (a token released twice, or a secondary's token None,
        # is not held: counted in held.unknown); this counts the rest.
        act = _event_counter(verdicts, bytearray(0), others_only=True)
        while open_inputs:
            readable, _, _ = select.select(open_inputs, [], [])
            now = time.monotonic()
            for sock in readable:
                got = sock.recv(RECV_SIZE)
                if not got:
                    open_inputs.remove(sock)
                    continue
                frames = decoders[sock].cut(got)
                if sock is primary_in:
                    tokens: Sequence[object] = held.hold_frames(frames)
                    side = primary_side
                else:
                    tokens = [None] * len(frames)  # the secondary's: nothing to keep
                    side = secondary_side
                if batch:
                    events = feed_many(side, frames, now, tokens)
                else:
                    events = []
                    for frame, token in zip(frames, tokens, strict=True):
                        events += feed_one(side, frame, now, token)
                if held.release_events(events):
                    act(events)  # checkpoint requests or malformed packets: count them
            deadline = comparator.get_timer()
            if deadline is not None and deadline <= now:
                events = comparator.handle_timer(now)
                if held.release_events(events):
                    act(events)
            if held.queued_frames:
                verdicts.released += held.queued_frames
                out.sendall(held.take())
        verdicts.released_twice += held.unknown  # released twice, or a secondary's
        try:
            verdicts.check("sockets")
            report.send(("ok", verdicts.released, time.process_time() - cpu_started))
        except BenchError as exc:
            report.send(("error", str(exc), 0.0))
    except BaseException as exc:
        report.send(("error", f"server failed: {exc!r}", 0.0))
        raise


@contextlib.contextmanager
def _ours_server(
    primary_count: int, batch: bool
) -> Iterator[tuple[tuple[socket.socket, ...], Any]]:
    """Fork the socket server; yield connected (primary_in, secondary_in, outdev) and its pipe."""
    directory = tempfile.mkdtemp(prefix="coloproxy-bench-")
    listeners: list[socket.socket] = []
    clients: list[socket.socket] = []
    process: multiprocessing.process.BaseProcess | None = None
    parent_end, child_end = multiprocessing.Pipe()
    try:
        paths = [os.path.join(directory, name) for name in ("pin", "sin", "out")]
        for path in paths:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(listener)
            listener.bind(path)
            listener.listen(1)
        context = multiprocessing.get_context("fork")
        process = context.Process(
            target=_serve_ours,
            args=(tuple(listeners), primary_count, child_end, batch),
            name="ours-server",
            daemon=True,
        )
        process.start()
        child_end.close()
        for listener in listeners:
            listener.close()
        clients.extend(connect_unix(path) for path in paths)
        if not parent_end.poll(CHILD_TIMEOUT) or parent_end.recv() != "ready":
            raise BenchError("our socket server did not start")
        yield tuple(clients), parent_end
    finally:
        for sock in clients + listeners:
            sock.close()
        if process is not None:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        parent_end.close()
        shutil.rmtree(directory, ignore_errors=True)


def run_ours_sockets(workload: Workload, streams: FramedStreams, batch: bool = True) -> RunResult:
    primary_count = len(workload.primary_frames)
    with _ours_server(primary_count, batch) as ((primary, secondary, out), report):
        result = timed_run(
            primary, secondary, out, streams, primary_count, workload.payload_bytes_total
        )
        primary.shutdown(socket.SHUT_WR)
        secondary.shutdown(socket.SHUT_WR)
        if not report.poll(CHILD_TIMEOUT):
            raise BenchError("our socket server sent no verdict")
        status, detail, cpu = report.recv()
        if status != "ok":
            raise BenchError(f"ours over sockets on {workload.name}: {detail}")
    return dataclasses.replace(result, server_cpu=cpu)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    load: str = ""  # the 1-minute load average when the row started
    ours_packets: int = 0
    qemu_packets: int = 0
    in_process: Figure | None = None
    sockets: Figure | None = None
    qemu: Figure | None = None
    feeder: Figure | None = None
    ours_gbit: float = 0.0  # the median socket run's primary payload Gbit/s
    notes: list[str] = field(default_factory=list)


def best(runs: list[RunResult]) -> RunResult:
    """The run with the most packets out, then the fastest."""
    return max(runs, key=lambda run: (run.released, run.packets_per_second))


def secondary_leads(streams: FramedStreams) -> FramedStreams:
    """The same streams with the secondary written one chunk ahead of the primary."""
    boundaries = streams.boundaries
    last = len(boundaries) - 1
    shifted = [
        (boundaries[index][0], boundaries[min(index + 1, last)][1]) for index in range(last + 1)
    ]
    return FramedStreams(
        streams.primary,
        streams.secondary,
        shifted,
        streams.primary_frames,
        streams.secondary_frames,
    )


def run_qemu_once(workload: Workload, streams: FramedStreams, binary: str) -> RunResult:
    with running_qemu(binary) as (primary, secondary, out, pid):
        cpu_before = process_cpu_seconds(pid)
        result = timed_run(
            primary,
            secondary,
            out,
            streams,
            len(workload.primary_frames),
            workload.payload_bytes_total,
        )
        cpu = process_cpu_seconds(pid) - cpu_before
    return dataclasses.replace(result, server_cpu=cpu)


def run_qemu_repeated(
    workload: Workload, streams: FramedStreams, repeat: int, binary: str
) -> list[RunResult]:
    return [run_qemu_once(workload, streams, binary) for _ in range(repeat)]


def measure(name: str, args: argparse.Namespace) -> Row:
    """One row: ``--repeat`` runs of each side, ours (sockets) and QEMU alternately, then
    the medians. The in-process runs (no I/O, no QEMU) come first."""
    row = Row(name, load=load_one())
    print(f"  {name}: load {load()} (1, 5, 15 min) at the start", flush=True)
    ours_workload = ours_streams = qemu_workload = qemu_streams = None
    if not args.skip_ours:
        ours_workload = bench_workload(name, args.packets)
        row.ours_packets = len(ours_workload.primary_frames)
        ours_streams = frame_streams(ours_workload)
        in_process = [run_ours_in_process(ours_workload) for _ in range(args.repeat)]
        row.in_process = figure(in_process)
    if not args.skip_qemu:
        # What colo-compare receives in COLO: the secondary's sequence numbers already
        # shifted into the primary's space by filter-rewriter.
        qemu_workload = bench_workload(name, args.qemu_packets, secondary_in_primary_seq_space=True)
        row.qemu_packets = len(qemu_workload.primary_frames)
        qemu_streams = frame_streams(qemu_workload)
        # colo-compare matches non-TCP packets newest-primary-first; while the primary stays
        # ahead nothing matches, queues pass max_queue_size (1024) and drop. One trial run
        # tells; if it stalls, every timed QEMU run gets the secondary one chunk ahead.
        # udp always: a trial that passes does not mean the timed runs will.
        trial = run_qemu_once(qemu_workload, qemu_streams, args.qemu_binary)
        if not trial.complete or name == "udp":
            qemu_streams = secondary_leads(qemu_streams)
            row.notes.append(
                f"{name}: colo-compare's trial run with the primary fed first released "
                f"{trial.released} of {row.qemu_packets}; its timed runs feed the secondary "
                f"one chunk ({CHUNK_ENTRIES} entries) ahead"
            )
    sockets: list[RunResult] = []
    qemu: list[RunResult] = []
    feeder: list[RunResult] = []
    for _ in range(args.repeat):  # alternate: a burst of load hits both sides alike
        if ours_workload is not None and ours_streams is not None:
            sockets.append(run_ours_sockets(ours_workload, ours_streams, args.batch))
        if qemu_workload is not None and qemu_streams is not None:
            qemu.append(run_qemu_once(qemu_workload, qemu_streams, args.qemu_binary))
            feeder.append(feeder_alone(qemu_streams, qemu_workload.payload_bytes_total))
    if sockets:
        row.sockets = figure(sockets)
        median_run = sorted(sockets, key=lambda run: run.packets_per_second)[len(sockets) // 2]
        row.ours_gbit = median_run.gbit_per_second
    if qemu:
        row.qemu = figure(qemu)
        row.feeder = figure(feeder)
    return row


def render(rows: list[Row]) -> str:
    header = (
        "workload",
        "load",
        "in-proc pkt/s",
        "socket pkt/s (low-high)",
        "Gb/s",
        "socket us cpu/pkt",
        "qemu pkt/s (low-high)",
        "qemu us cpu/pkt",
        "socket/qemu",
        "cpu qemu/socket",
        "in-proc/qemu",
        "feeder pkt/s",
    )
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        lines.append(
            (
                row.name,
                row.load or "-",
                f"{row.in_process.rate / 1e3:,.0f}k" if row.in_process else "-",
                row.sockets.rate_text() if row.sockets else "-",
                f"{row.ours_gbit:.2f}" if row.sockets else "-",
                row.sockets.cpu_text() if row.sockets else "-",
                row.qemu.rate_text() if row.qemu else "-",
                row.qemu.cpu_text() if row.qemu else "-",
                ratio(row.sockets, row.qemu),
                cpu_ratio(row.sockets, row.qemu),
                ratio(row.in_process, row.qemu),
                f"{row.feeder.rate / 1e3:,.0f}k" if row.feeder else "-",
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rendered = []
    for number, line in enumerate(lines):
        cells = [
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        rendered.append("  ".join(cells))
        if number == 0:
            rendered.append("  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def comparator_variant() -> tuple[str, list[str]]:
    """Which comparator runs (coloproxy.variant: compiled when installed, pure Python with
    COLOPROXY_PURE=1 or without a compiler); and the compiled modules whose source is newer
    than their build (stale: not the code in the .py)."""
    try:
        from coloproxy import variant
    except ImportError as exc:
        return f"not importable ({exc})", []
    return variant.describe(), variant.stale_modules()


def _load() -> str:
    return f"{load()} (1, 5, 15 min)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare coloproxy's comparator with QEMU's colo-compare.",
        epilog="Workloads: " + "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items()),
    )
    parser.add_argument(
        "--packets",
        type=int,
        default=DEFAULT_PACKETS,
        help=f"primary data packets per workload for ours (default {DEFAULT_PACKETS:,})",
    )
    parser.add_argument(
        "--qemu-packets",
        type=int,
        default=None,
        help="primary data packets per workload for QEMU (default: same as --packets)",
    )
    parser.add_argument(
        "--workload",
        nargs="+",
        choices=NAMES,
        default=list(NAMES),
        metavar="NAME",
        help=f"workloads to run (default all: {' '.join(NAMES)})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help=f"runs per figure, the median is shown (at least {MIN_RUNS}, default 3)",
    )
    parser.add_argument(
        "--feed-per-packet",
        dest="batch",
        action="store_false",
        help="socket column: call feed once per frame, not feed_many once per receive batch",
    )
    parser.add_argument("--skip-qemu", action="store_true", help="do not run QEMU")
    parser.add_argument("--skip-ours", action="store_true", help="do not run our comparator")
    parser.add_argument("--qemu-binary", default=QEMU_BINARY, help="QEMU to run")
    args = parser.parse_args(argv)
    if args.qemu_packets is None:
        args.qemu_packets = args.packets
    if args.packets <= 0 or args.qemu_packets <= 0:
        parser.error("--packets and --qemu-packets must be positive")
    if args.repeat < MIN_RUNS:
        parser.error(f"--repeat must be at least {MIN_RUNS}: a figure is a median of runs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    started = time.monotonic()
    print(f"date     {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"command  {command}")
    print(f"python   {platform.python_implementation()} {platform.python_version()}")
    variant, stale = comparator_variant() if not args.skip_ours else ("skipped", [])
    print(f"ours     {variant}")
    if stale:
        print(f"error: stale compiled modules (source newer than build): {' '.join(stale)}")
        print("       rebuild: scripts/build-fast (or pip install -e .)")
        return 2
    print(f"qemu     {qemu_version(args.qemu_binary) if not args.skip_qemu else 'skipped'}")
    print(f"host     {os.cpu_count()} CPUs, {_cpu_model()}, {platform.platform()}")
    print(f"syscalls {socket_probe()}")
    print(f"load     {_load()} at the start")
    if not args.skip_qemu:
        print(f"qemu cmd {shlex.join(qemu_command('<tmpdir>', args.qemu_binary))}")
    print(
        f"runs     median of {args.repeat}, ours and qemu alternately; ours {args.packets:,} "
        f"and qemu {args.qemu_packets:,} primary data packets per workload (+1 SYN-ACK per "
        "TCP connection)"
    )
    print(flush=True)
    rows: list[Row] = []
    failures: list[str] = []
    for name in args.workload:
        workload_started = time.monotonic()
        try:
            rows.append(measure(name, args))
        except BenchError as exc:
            failures.append(str(exc))
            rows.append(Row(name, notes=[f"{name}: FAILED: {exc}"]))
        print(f"  {name} done in {time.monotonic() - workload_started:.1f} s", flush=True)
    print()
    print(render(rows))
    print()
    print(
        "Medians of the runs, (lowest-highest). load: 1-minute load average when the row "
        "started. in-proc: Comparator.feed in a loop, no I/O. socket: our comparator in a "
        "child process behind colo-compare's socket framing, driven like QEMU. pkt/s: primary "
        "packets released per second; Gb/s: primary payload of ours over sockets. us cpu/pkt: "
        "CPU time of the comparing process per released primary packet (its secondary "
        "packet included). socket/qemu: pkt/s ratio; cpu qemu/socket: QEMU's CPU per packet "
        "over ours (above 1: ours needs less; unlike pkt/s it leaves out time spent waiting "
        "for a CPU). feeder: the harness alone into sinks, its ceiling. ! = not every packet "
        "came out."
    )
    for row in rows:
        for note in row.notes:
            print(f"note: {note}")
    print(f"load     {_load()} at the end")
    print(f"total {time.monotonic() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
