"""Drive QEMU's own colo-compare over its socket chardevs and time it.

Theory of operation
-------------------
QEMU runs with no machine at all (``-machine none``): colo-compare is a user-creatable object
that needs only an iothread and three socket chardevs, not a guest. We are the client of all
three unix sockets: we write the primary's and the secondary's frames into ``primary_in`` and
``secondary_in`` and read what colo-compare releases from ``outdev``.

Framing on every chardev (``vnet_hdr_support`` off, the default): a 4-byte big-endian length,
then the Ethernet frame. Released frames come out with the same framing.

Quirks handled here, all from QEMU's net/colo-compare.c:

* Frames colo-compare releases while nobody is connected to ``outdev`` are lost (the socket
  chardev discards writes when disconnected). So after connecting we send ARP probes on
  ``primary_in`` (colo-compare forwards non-IPv4 primary frames uncompared) until one comes
  out, and only then start.
* Each connection keeps at most ``max_queue_size`` (1024) packets per side; beyond that it
  silently drops the primary's packets too. The feeder therefore interleaves both sides in
  small chunks, so neither side gets far ahead.
* An unmatched primary packet is never released on its own: after ``compare_timeout``
  (3000 ms) colo-compare only notifies the COLO framework to checkpoint, and here there is
  none. The reader therefore stops after a bounded idle time and reports how many came out.
* colo-compare compares absolute TCP sequence numbers: in a real COLO setup filter-rewriter
  on the secondary shifts the secondary's sequence numbers into the primary's space first.
  Callers feed it workloads built with ``secondary_in_primary_seq_space=True``.

The feeder is one thread with non-blocking sockets writing big pre-serialized buffers, so it
costs a few system calls per chunk, not per frame. ``feeder_alone`` measures the same feeder
writing into sockets that only read and discard, to show whether QEMU or the feeder limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from workloads import Workload

QEMU_BINARY: Final = "qemu-system-x86_64"
CHUNK_ENTRIES: Final = 64  # schedule entries (both sides together) per interleaving chunk
RECV_SIZE: Final = 1 << 20
# colo-compare never releases an unmatched packet without a checkpoint; after the feeder has
# finished, this much silence on outdev means nothing more will come.
IDLE_TIMEOUT: Final = 2.0
STARTUP_TIMEOUT: Final = 10.0
PROBE_INTERVAL: Final = 0.05

_LENGTH: Final = struct.Struct("!I")
# A gratuitous ARP from the guest, padded to the Ethernet minimum: not IPv4, so colo-compare
# sends it straight to outdev from primary_in (and discards it from secondary_in).
PROBE_FRAME: Final = (
    b"\xff" * 6
    + bytes.fromhex("525400000001")
    + b"\x08\x06"
    + bytes.fromhex("0001080006040001")
    + bytes.fromhex("525400000001")
    + bytes([10, 0, 0, 1])
    + b"\x00" * 6
    + bytes([10, 0, 0, 1])
).ljust(60, b"\x00")


class BenchError(RuntimeError):
    """The benchmark could not run or a result failed its check."""


@dataclass(frozen=True)
class FramedStreams:
    """Both sides serialized with colo-compare's framing, and where each chunk ends."""

    primary: bytes
    secondary: bytes
    # (primary end offset, secondary end offset) after each chunk, in feeding order.
    boundaries: list[tuple[int, int]]
    primary_frames: int
    secondary_frames: int

    def receives(self) -> list[tuple[bool, bytes]]:
        """The chunks as a reader of both inputs gets them, in feeding order: (primary side,
        the chunk's bytes) for each side that has bytes in a chunk."""
        out: list[tuple[bool, bytes]] = []
        primary_at = secondary_at = 0
        for primary_end, secondary_end in self.boundaries:
            if primary_end > primary_at:
                out.append((True, self.primary[primary_at:primary_end]))
                primary_at = primary_end
            if secondary_end > secondary_at:
                out.append((False, self.secondary[secondary_at:secondary_end]))
                secondary_at = secondary_end
        return out


def length_framed(frame: bytes) -> bytes:
    """colo-compare's framing without vnet headers: a 4-byte big-endian length, the frame."""
    return _LENGTH.pack(len(frame)) + frame


def frame_streams(
    workload: Workload,
    chunk_entries: int = CHUNK_ENTRIES,
    framing: Callable[[bytes], bytes] = length_framed,
) -> FramedStreams:
    """Serialize a workload once, each frame with ``framing``; chunks follow the workload's
    stream-position schedule."""

    def serialize(frames: Sequence[bytes]) -> tuple[bytes, list[int]]:
        framed = [framing(packet) for packet in frames]
        return b"".join(framed), list(itertools.accumulate(len(part) for part in framed))

    primary, primary_ends = serialize(workload.primary_frames)
    secondary, secondary_ends = serialize(workload.secondary_frames)
    boundaries: list[tuple[int, int]] = []
    primary_count = secondary_count = 0
    schedule = workload.schedule()
    for position, (is_primary, _) in enumerate(schedule, 1):
        if is_primary:
            primary_count += 1
        else:
            secondary_count += 1
        if position % chunk_entries == 0 or position == len(schedule):
            boundaries.append(
                (
                    primary_ends[primary_count - 1] if primary_count else 0,
                    secondary_ends[secondary_count - 1] if secondary_count else 0,
                )
            )
    return FramedStreams(
        primary,
        secondary,
        boundaries,
        len(workload.primary_frames),
        len(workload.secondary_frames),
    )


@dataclass(frozen=True)
class RunResult:
    """One timed run: how many primary frames came out, over how long."""

    expected: int
    released: int
    seconds: float
    payload_bytes: int  # payload of all expected primary frames
    server_cpu: float | None = None  # CPU seconds of the comparing process, where measured

    @property
    def complete(self) -> bool:
        return self.released == self.expected

    @property
    def packets_per_second(self) -> float:
        return self.released / self.seconds if self.seconds > 0 else 0.0

    @property
    def gbit_per_second(self) -> float:
        # Payload actually released: assume released frames carry the average payload.
        if self.seconds <= 0 or self.expected == 0:
            return 0.0
        released_bytes = self.payload_bytes * self.released / self.expected
        return released_bytes * 8 / self.seconds / 1e9


class Feeder(threading.Thread):
    """Write both framed streams chunk by chunk with non-blocking sends; record errors."""

    def __init__(
        self, primary: socket.socket, secondary: socket.socket, streams: FramedStreams
    ) -> None:
        super().__init__(name="feeder", daemon=True)
        self._sockets = (primary, secondary)
        self._streams = streams
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            self._feed()
            self.finished_at = time.perf_counter()
        except BaseException as exc:  # reported by the caller, which owns the threads
            self.error = exc

    def _feed(self) -> None:
        primary_sock, secondary_sock = self._sockets
        for sock in self._sockets:
            sock.setblocking(False)
        views = {
            primary_sock: memoryview(self._streams.primary),
            secondary_sock: memoryview(self._streams.secondary),
        }
        positions = {primary_sock: 0, secondary_sock: 0}
        for primary_end, secondary_end in self._streams.boundaries:
            ends = {primary_sock: primary_end, secondary_sock: secondary_end}
            pending = [sock for sock in self._sockets if positions[sock] < ends[sock]]
            while pending:
                _, writable, _ = select.select([], pending, [], 5.0)
                if not writable:
                    raise BenchError("feeder: nobody read the input sockets for 5 s")
                for sock in writable:
                    sent = sock.send(views[sock][positions[sock] : ends[sock]])
                    positions[sock] += sent
                pending = [sock for sock in self._sockets if positions[sock] < ends[sock]]


def count_frames(
    sock: socket.socket,
    expected: int,
    feeder: Feeder | None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> tuple[int, float | None]:
    """Read framed output until ``expected`` frames came, or silence after the feeder ended.

    Returns the count and the ``perf_counter`` time the last frame was complete.
    """
    sock.setblocking(True)
    # recv_into one preallocated buffer: recv(1 MiB) would mmap and unmap a fresh 1 MiB
    # object per call, which costs more than the parsing when QEMU writes frame by frame.
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    carried = 0  # bytes of an incomplete frame kept at the start of the buffer
    count = 0
    last_frame_at: float | None = None
    last_data_at = time.perf_counter()
    unpack_length = _LENGTH.unpack_from
    while count < expected:
        readable, _, _ = select.select([sock], [], [], 0.2)
        now = time.perf_counter()
        if not readable:
            feeder_done = feeder is None or not feeder.is_alive()
            if feeder is not None and feeder.error is not None:
                break
            if feeder_done and now - last_data_at > idle_timeout:
                break
            if now - last_data_at > 10 * idle_timeout:
                break  # the feeder is stuck as well; it reports its own error
            continue
        got = sock.recv_into(view[carried:])
        if not got:
            break
        last_data_at = now
        available = carried + got
        position = 0
        while position + 4 <= available:
            end = position + 4 + unpack_length(buffer, position)[0]
            if end > available:
                break
            position = end
            count += 1
        if position:
            last_frame_at = now
        carried = available - position
        if carried and position:
            buffer[:carried] = bytes(view[position:available])  # may overlap: copy first
    return count, last_frame_at


def timed_run(
    primary: socket.socket,
    secondary: socket.socket,
    out: socket.socket,
    streams: FramedStreams,
    expected: int,
    payload_bytes: int,
) -> RunResult:
    """Feed both sides from a thread, count released frames on ``out``, time the whole."""
    feeder = Feeder(primary, secondary, streams)
    started = time.perf_counter()
    feeder.start()
    released, last_frame_at = count_frames(out, expected, feeder)
    feeder.join(timeout=10.0)
    if feeder.error is not None:
        raise BenchError(f"feeder failed: {feeder.error!r}") from feeder.error
    seconds = (last_frame_at - started) if last_frame_at is not None else 0.0
    return RunResult(expected, released, seconds, payload_bytes)


def feeder_alone(streams: FramedStreams, payload_bytes: int) -> RunResult:
    """The feeder writing into unix sockets whose other end only reads and discards.

    ``released`` counts primary frames written; ``seconds`` runs until the sinks read the
    last byte of both streams.
    """
    primary_feed, primary_sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    secondary_feed, secondary_sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets = (primary_feed, primary_sink, secondary_feed, secondary_sink)
    try:
        sink_done: list[float] = []

        def sink() -> None:
            remaining = {
                primary_sink: len(streams.primary),
                secondary_sink: len(streams.secondary),
            }
            scratch = bytearray(RECV_SIZE)
            while any(remaining.values()):
                waiting = [sock for sock, left in remaining.items() if left]
                readable, _, _ = select.select(waiting, [], [], 5.0)
                if not readable:
                    return
                for sock in readable:
                    got = sock.recv_into(scratch)
                    if not got:
                        return
                    remaining[sock] -= got
            sink_done.append(time.perf_counter())

        reader = threading.Thread(target=sink, name="sink", daemon=True)
        feeder = Feeder(primary_feed, secondary_feed, streams)
        started = time.perf_counter()
        reader.start()
        feeder.start()
        feeder.join(timeout=60.0)
        reader.join(timeout=60.0)
        if feeder.error is not None:
            raise BenchError(f"feeder failed: {feeder.error!r}") from feeder.error
        if not sink_done:
            raise BenchError("feeder alone: the sink did not receive every byte")
        return RunResult(
            streams.primary_frames, streams.primary_frames, sink_done[0] - started, payload_bytes
        )
    finally:
        for sock in sockets:
            sock.close()


def qemu_version(binary: str = QEMU_BINARY) -> str:
    """First line of ``qemu-system-x86_64 --version``, or why there is none."""
    path = shutil.which(binary)
    if path is None:
        return f"{binary} not found"
    completed = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return completed.stdout.splitlines()[0] if completed.stdout else "unknown"


def qemu_command(directory: str, binary: str = QEMU_BINARY) -> list[str]:
    """The QEMU command line: no machine, one iothread, three server sockets, colo-compare."""

    def chardev(name: str) -> str:
        return f"socket,id={name},path={os.path.join(directory, name)},server=on,wait=off"

    return [
        binary,
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-object",
        "iothread,id=iot0",
        "-chardev",
        chardev("pin"),
        "-chardev",
        chardev("sin"),
        "-chardev",
        chardev("out"),
        "-object",
        "colo-compare,id=cc0,primary_in=pin,secondary_in=sin,outdev=out,iothread=iot0",
    ]


def wait_for_paths(paths: Sequence[str], process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not all(os.path.exists(path) for path in paths):
        if process is not None and process.poll() is not None:
            raise BenchError(f"QEMU exited with status {process.returncode} while starting")
        if time.monotonic() > deadline:
            raise BenchError(f"sockets {paths} did not appear in {STARTUP_TIMEOUT} s")
        time.sleep(0.01)


def connect_unix(path: str) -> socket.socket:
    """Connect, retrying while the path exists but nobody listens yet: QEMU binds the socket
    (the path appears) before it calls listen, and on a busy machine a connect can fall in
    between (ECONNREFUSED; seen once in about 50 runs)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        except OSError:
            sock.close()
            raise
        return sock


def probe_outdev(primary: socket.socket, out: socket.socket) -> int:
    """Send ARP probes on primary_in until one comes out of outdev; return how many sent.

    Leaves ``out`` drained: after the first probe arrives, late copies of earlier ones are
    read away so that the timed run counts only workload frames.
    """
    framed = _LENGTH.pack(len(PROBE_FRAME)) + PROBE_FRAME
    deadline = time.monotonic() + STARTUP_TIMEOUT
    sent = 0
    while time.monotonic() < deadline:
        primary.sendall(framed)
        sent += 1
        readable, _, _ = select.select([out], [], [], PROBE_INTERVAL)
        if readable:
            received = 0
            out.setblocking(False)
            # Collect until quiet: probes sent before outdev was accepted are lost, later
            # ones all arrive.
            quiet_until = time.monotonic() + 0.2
            while time.monotonic() < quiet_until:
                with contextlib.suppress(BlockingIOError):
                    data = out.recv(RECV_SIZE)
                    if not data:
                        raise BenchError("colo-compare closed outdev during the probe")
                    received += len(data)
                    quiet_until = time.monotonic() + 0.2
                time.sleep(0.01)
            out.setblocking(True)
            if received % len(framed):
                raise BenchError(f"probe: {received} bytes out is not whole probe frames")
            return sent
    raise BenchError(f"colo-compare released none of {sent} probes in {STARTUP_TIMEOUT} s")


Sockets = tuple[socket.socket, socket.socket, socket.socket]  # primary_in, secondary_in, outdev


@contextlib.contextmanager
def running_comparator(
    command: Callable[[str], list[str]],
    probe: Callable[[Sockets], object],
    *,
    name: str = "QEMU",
    before_connect: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Sockets, int]]:
    """Start ``command(DIR)``, a comparator listening on DIR/pin, DIR/sin and DIR/out; connect
    (after ``before_connect(DIR)``), ``probe`` the sockets; yield them and its pid.

    The process is killed and the temporary directory removed whatever happens.
    """
    directory = tempfile.mkdtemp(prefix="colo-compare-bench-")
    process: subprocess.Popen[bytes] | None = None
    sockets: list[socket.socket] = []
    stderr_path = os.path.join(directory, "stderr")
    try:
        argv = command(directory)
        with open(stderr_path, "wb") as stderr:
            try:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    env=env,
                )  # fmt: skip
            except OSError as exc:
                raise BenchError(f"cannot start {argv[0]}: {exc}") from exc
        paths = [os.path.join(directory, part) for part in ("pin", "sin", "out")]
        try:
            wait_for_paths(paths, process)
            if before_connect is not None:
                before_connect(directory)
            sockets.extend(connect_unix(path) for path in paths)
            connected = (sockets[0], sockets[1], sockets[2])
            probe(connected)
        except BaseException as exc:
            with open(stderr_path, "rb") as stderr_file:
                output = stderr_file.read().decode(errors="replace").strip()
            if output:
                raise BenchError(f"{exc} ({name} said: {output[-2000:]})") from exc
            raise
        yield connected, process.pid
        if process.poll() is not None:
            raise BenchError(f"{name} exited with status {process.returncode} during the run")
    finally:
        for sock in sockets:
            sock.close()
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running_qemu(
    binary: str = QEMU_BINARY,
) -> Iterator[tuple[socket.socket, socket.socket, socket.socket, int]]:
    """QEMU with colo-compare, connected and probed: (primary_in, secondary_in, outdev, pid)."""
    with running_comparator(
        lambda directory: qemu_command(directory, binary),
        lambda sockets: probe_outdev(sockets[0], sockets[2]),
    ) as ((primary, secondary, out), pid):
        yield primary, secondary, out, pid


def process_cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU time of a process so far. Without ``children``: the time its live threads ran, from
    the scheduler (``/proc/PID/task/*/schedstat``, nanoseconds), where the kernel has it, so
    that a run of 100 ms is measured to the microsecond and not in 10 ms clock ticks (a
    thread that ends between two readings takes its time with it: the comparing processes
    measured here keep theirs). With ``children`` (the daemons run iptables-save), or where
    schedstat is missing: user plus system time and that of the children it waited for, from
    ``/proc/PID/stat`` (clock ticks)."""
    if not children:
        precise = _threads_ran(pid)
        if precise is not None:
            return precise
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _threads_ran(pid: int) -> float | None:
    """Seconds the live threads of ``pid`` have run, or None where schedstat is missing."""
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{thread}"):
                continue  # the thread ended meanwhile
            return None
    return total / 1e9


def run_qemu(workload: Workload, binary: str = QEMU_BINARY) -> RunResult:
    """Time colo-compare on ``workload`` (secondary already in the primary's seq space)."""
    streams = frame_streams(workload)
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
        return dataclasses.replace(result, server_cpu=process_cpu_seconds(pid) - cpu_before)
