"""The whole proxy on the namespace topology: direct, accept-only NFQUEUE, full ``coloproxy run``.

Builds ``coloproxy.lab.topology.Topology`` (client, LAN, host P, host S, PVM and SVM guest
namespaces) and runs the same deterministic services in both guests: ``tests/guestd.py``
(TCP echo on port 7), a bulk server of this script on port 19 and ``iperf3 -s``. Then, for
each path variant, in interleaved rounds:

* **direct**: no coloproxy rules at all; the client reaches the PVM through the bridges and
  the SVM gets nothing;
* **accept-only**: host P and host S set up by ``coloproxy.net.host.setup`` (the rules,
  mirror and tunnel ``coloproxy run`` installs) and a consumer of this script in each host's
  namespace that binds the queues that host's daemon binds: in host P it accepts everything
  on P-out (and the split queue, which no rule feeds) and drops S-out, in host S it accepts
  everything on S-in and the secondary egress queue -- the capture layer's ceiling for the
  same packets;
* **proxy**: ``coloproxy run`` for host S (role secondary: S-in and the egress queue) and
  then host P (P-out, S-out and the split queue), as ``tests/pairworld.py`` starts them and
  with its configs plus the variant's queue settings, and the engine double of that module
  answering every checkpoint request after 2 ms.

Workloads, all from the client namespace, all deterministic (both guests send the same bytes,
so a correct proxy asks for no checkpoint):

* ``bulk-down`` / ``bulk-up``: one TCP connection; the client asks for (or sends) 16 MiB
  chunks of a fixed pattern for ``--seconds``; payload Gbit/s;
* ``rr``: 64-byte requests at ``--rate`` per second over one TCP connection (TCP_NODELAY)
  to the guests' echo service; round-trip p50/p99;
* ``iperf3-down`` / ``iperf3-up`` (direct and accept-only only): ``iperf3 -c -R`` and
  ``iperf3 -c``. iperf3's payload is random per process and its control connection exchanges
  cookies, so through the proxy it diverges all the time: not a protected measurement.

Prints the date, the command, the machine's load, every measurement with its command, and
tables at the end (the median of the rounds, with each round's figure); asserts nothing.
Needs root, iperf3, iptables (nft backend is fine). Traffic stays in the namespaces it
creates, which are deleted at the end, whatever happens.

    python3 bench/proxy_bench.py [--seconds 3] [--rounds 3] [--levers] [--profile]

The script is also its own helper: ``_guest-bulk``, ``_client``, ``_consumer`` and
``_daemon`` are the processes it starts inside the namespaces (see bench/proxy_README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
# --coloproxy DIR: another copy of the package (a patched or compiled one) for everything this
# bench starts; passed to the helpers through the environment. tests/ always comes from here.
SOURCE_ENV = "PROXY_BENCH_COLOPROXY"
SOURCE = Path(os.environ.get(SOURCE_ENV) or ROOT)
sys.path[:0] = [str(SOURCE), str(ROOT / "tests")]

if TYPE_CHECKING:
    from coloproxy.lab.topology import Topology
    from pairworld import Engine

BULK_PORT = 19  # chargen's port: the guests' deterministic bulk service
ECHO_PORT = 7  # tests/guestd.py's TCP echo
IPERF_PORT = 5201
CHUNK = 16 << 20  # bytes per bulk request
REQUEST_SIZE = 64  # bytes per request/response exchange
WARMUP_REQUESTS = 100  # first round trips of each latency run, dropped


@dataclass(frozen=True)
class Queue:
    """One NFQUEUE queue of the pair: where it is bound and what the accept-only consumer
    does with it (the real daemons' roles, docs/data-path.md)."""

    name: str
    number: int
    host: Literal["hp", "hs"]  # the namespace of the host whose daemon binds it
    accept: bool  # accept-only consumer: accept (True) or drop
    gso: bool  # the daemon asks for whole GSO packets here (netlink transport only)


# Numbers as in tests/netfixtures.QUEUES (host_params sets up the rules with them) plus the
# split queue, which no rule names: host P's P-out verdicts send packets there. Queue numbers
# are per namespace; the split queue gets its own number all the same, so that no config
# default (14) and no rule of host P ever meets it.
QUEUES = (
    Queue("P-out", 7710, "hp", accept=True, gso=True),
    Queue("S-out", 7711, "hp", accept=False, gso=True),
    Queue("P-split", 7714, "hp", accept=True, gso=False),
    Queue("S-in", 7712, "hs", accept=True, gso=False),  # its verdicts rewrite: never GSO
    Queue("S-egress", 7713, "hs", accept=True, gso=False),
)
QUEUE_NAMES = tuple(queue.name for queue in QUEUES)
HOSTS = {"hp": "host P", "hs": "host S"}
ENGINE_DELAY = 0.002  # the engine double's checkpoint pause, as in tests/pairworld.py
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A real-time priority for the worker: wake-ups then do not wait for the other processes
# of this 2-CPU machine (systemd's CPUSchedulingPolicy=fifo does the same for a service).
FIFO = ["chrt", "-f", "10"]
# SO_LINGER on, 0 s: closing (or dying) aborts the connection with an RST at once, so that a
# stalled bulk connection leaves no retransmissions behind for the next measurement.
ABORTIVE_CLOSE = struct.pack("ii", 1, 0)
BULK_STALL = 5.0  # seconds without progress that fail a bulk measurement
# TCP counters read with `nstat -asz` around each workload (absolute values, no history file:
# nstat's history is per user, not per namespace): where, which.
TCP_COUNTERS = (
    ("client", "TcpRetransSegs"),
    ("client", "TcpExtTCPTimeouts"),
    ("pvm", "TcpRetransSegs"),
    ("svm", "TcpRetransSegs"),
    ("svm", "TcpExtBeyondWindow"),
)

# Targets from the issue.
TARGET_BULK_VS_ACCEPT = 0.5
TARGET_ADDED_P50 = 100e-6
TARGET_ADDED_P99 = 500e-6


def pattern() -> bytes:
    """16 MiB of tests/guestd.py's /big pattern: what the guests send, what the client sends."""
    big = bytes((i * 131 + 7) % 251 for i in range(1 << 20))
    return big * (CHUNK >> 20)


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def loadavg() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# Helpers run inside the namespaces (subcommands of this script)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _bulk_connection(conn: socket.socket, view: memoryview) -> None:
    """One client: ``D`` + size: send ``size`` bytes of the pattern; ``U`` + size: read
    ``size`` bytes, answer ``K``. The same program in both guests sends the same bytes."""
    buffer = bytearray(1 << 20)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE_CLOSE)
    with conn, contextlib.suppress(OSError):
        while (header := _recv_exact(conn, 9)) is not None:
            op, size = header[0], int.from_bytes(header[1:], "big")
            if op == ord("D"):
                while size:
                    count = min(size, len(view))
                    conn.sendall(view[:count])
                    size -= count
            elif op == ord("U"):
                while size:
                    got = conn.recv_into(buffer, min(size, len(buffer)))
                    if not got:
                        return
                    size -= got
                conn.sendall(b"K")
            else:
                return


def guest_bulk(args: argparse.Namespace) -> None:
    view = memoryview(pattern())
    listener = socket.create_server(("::", args.port), family=socket.AF_INET6, dualstack_ipv6=True)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_bulk_connection, args=(conn, view), daemon=True).start()


def client_bulk(host: str, direction: str, seconds: float) -> dict[str, Any]:
    """Bulk transfer over one connection: one untimed, checked chunk, then timed chunks."""
    data = pattern()
    expected = hashlib.sha256(data).digest()
    view = memoryview(data)
    # A stall this long means a stream that cannot recover by itself (see the README).
    conn = socket.create_connection((host, BULK_PORT), timeout=BULK_STALL)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE_CLOSE)
    buffer = bytearray(4 << 20)

    def one_chunk(check: bool) -> None:
        if direction == "down":
            conn.sendall(b"D" + CHUNK.to_bytes(8, "big"))
            digest = hashlib.sha256() if check else None
            remaining = CHUNK
            while remaining:
                got = conn.recv_into(buffer, min(remaining, len(buffer)))
                if not got:
                    raise ConnectionError("bulk server closed the connection")
                if digest is not None:
                    digest.update(memoryview(buffer)[:got])
                remaining -= got
            if digest is not None and digest.digest() != expected:
                raise ValueError("the bulk download differs from the pattern")
        else:
            conn.sendall(b"U" + CHUNK.to_bytes(8, "big"))
            conn.sendall(view)
            if _recv_exact(conn, 1) != b"K":
                raise ConnectionError("bulk server did not confirm the upload")

    one_chunk(check=True)  # warm-up: the window opens, the bytes are the pattern
    chunks = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_chunk(check=False)
        chunks += 1
    elapsed = time.perf_counter() - start
    conn.close()
    return {"bytes": chunks * CHUNK, "seconds": elapsed}


def client_latency(host: str, rate: float, count: int) -> dict[str, Any]:
    conn = socket.create_connection((host, ECHO_PORT), timeout=15)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = bytes(range(REQUEST_SIZE))
    samples: list[float] = []
    due = time.perf_counter()
    for _ in range(count + WARMUP_REQUESTS):
        start = time.perf_counter()
        conn.sendall(request)
        got = 0
        while got < REQUEST_SIZE:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("echo server closed the connection")
            got += len(chunk)
        samples.append(time.perf_counter() - start)
        due += 1.0 / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    conn.close()
    return {"samples": samples[WARMUP_REQUESTS:]}


def client_main(args: argparse.Namespace) -> None:
    if args.workload == "rr":
        result = client_latency(args.host, args.rate, args.count)
    else:
        result = client_bulk(args.host, args.workload.removeprefix("bulk-"), args.seconds)
    print(json.dumps(result))


def _event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def consumer_main(args: argparse.Namespace) -> None:
    """The accept-only consumer of one host: the queues its daemon binds, in its namespace
    (host P: P-out, S-out dropped, P-split; host S: S-in, S-egress)."""
    from coloproxy.capture.queue import PacketQueue, QueueConfig
    from coloproxy.capture.transports import open_queue

    async def consume() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        mine = [queue for queue in QUEUES if queue.host == args.host]
        queues: list[PacketQueue] = []
        for spec in mine:
            # Verdict function of the queue once open; packets delivered during the bind
            # (the netlink transport reads them while it waits for the ack) wait in pending.
            cell: list[Callable[[Any], None] | None] = [None]
            pending: list[Any] = []

            def on_packet(
                handle: Any,
                payload: bytes,
                now: float,
                cell: list[Callable[[Any], None] | None] = cell,
                pending: list[Any] = pending,
            ) -> None:
                decide = cell[0]
                if decide is None:
                    pending.append(handle)
                else:
                    decide(handle)

            config = QueueConfig(
                spec.number,
                max_len=args.max_len,
                copy_range=args.copy_range,
                rcvbuf=args.rcvbuf,
                batch=args.batch,
                gso=args.gso and spec.gso,  # where the daemon asks for it: P-out and S-out
            )
            queue = open_queue(config, on_packet, args.transport)
            decide = queue.accept if spec.accept else queue.drop
            if args.flush_each:
                flush = getattr(queue, "flush", lambda: None)
                base = decide

                def decide_and_flush(
                    handle: Any, base: Callable[[Any], None] = base, flush: Any = flush
                ) -> None:
                    base(handle)
                    flush()

                decide = decide_and_flush
            cell[0] = decide
            for handle in pending:
                decide(handle)
            queues.append(queue)
        print("ready", flush=True)
        await stop.wait()
        counters = {spec.name: queue.counters() for spec, queue in zip(mine, queues, strict=True)}
        for queue in queues:
            queue.close()
        print(json.dumps({name: dataclasses.asdict(c) for name, c in counters.items()}),
              flush=True)  # fmt: skip

    with asyncio.Runner(loop_factory=_event_loop_factory(args.loop)) as runner:
        runner.run(consume())


def daemon_main(args: argparse.Namespace) -> int:
    """``coloproxy run`` with the levers that need a code change, patched in at run time.

    The patch is the change the report proposes for coloproxy/daemon/datapath.py: the queue
    configs get ``gso`` and ``batch`` from settings. ``--gso off`` turns GSO off where the
    daemon asks for it (P-out and S-out); ``on`` and ``config`` leave the daemon's own
    choice, which is never GSO on the split queue (the kernel must cut what comes there) or
    on host S's queues (S-in's verdicts rewrite payloads). The same launcher runs either role.
    """
    import coloproxy.daemon.datapath as daemon_datapath
    import coloproxy.daemon.run as daemon_run
    from coloproxy.capture.queue import QueueConfig
    from coloproxy.config import load_config

    config = load_config(args.config)

    def patched_queue_config(number: int, **settings: Any) -> QueueConfig:
        if args.gso == "off":
            settings["gso"] = False
        return QueueConfig(number, batch=args.batch, **settings)

    daemon_datapath.QueueConfig = patched_queue_config  # type: ignore[attr-defined,assignment]
    return daemon_run.run(config, loop_factory=_event_loop_factory(args.loop))


# ---------------------------------------------------------------------------------------------
# The variants


PathKind = Literal["direct", "accept", "proxy"]


@dataclass(frozen=True)
class Variant:
    name: str
    kind: PathKind
    transport: str = "netlink"
    # P-out and S-out only (S-in rewrites payloads). coloproxy run sets it with the netlink
    # transport and cannot without it; anything else is patched in (see ``patched``).
    gso: bool = True
    batch: int = 256  # QueueConfig's default; not in the config file
    rcvbuf: int = 8 << 20  # config default
    max_len: int = 8192  # config default (and QueueConfig's)
    copy_range: int = 65535
    loop: str = "uvloop"  # what `coloproxy run` picks when uvloop is installed
    flush_each: bool = False  # accept-only: one send() per verdict (no verdict batching)
    fifo: bool = False  # run the consumer or daemon under SCHED_FIFO (chrt -f 10)
    launcher: bool = False  # proxy: through ``_daemon`` even with nothing to patch (control)
    ceiling: str | None = None  # proxy: the accept-only variant with the same capture settings
    iperf: bool = False  # also the iperf3 reference rows

    @property
    def patched(self) -> bool:
        """A proxy variant coloproxy run cannot be configured for: run through ``_daemon``."""
        return self.kind == "proxy" and (
            self.launcher
            or self.gso != (self.transport == "netlink")
            or self.batch != 256
            or self.loop != "uvloop"
        )

    def settings(self) -> str:
        if self.kind == "direct":
            return "no rules, no queue"
        parts = [f"transport {self.transport}", f"gso {'P-out,S-out' if self.gso else 'off'}"]
        parts += [f"batch {self.batch}", f"rcvbuf {self.rcvbuf >> 20} MiB"]
        parts += [f"max_len {self.max_len}", f"copy_range {self.copy_range}", self.loop]
        if self.flush_each:
            parts.append("1 verdict/send")
        if self.fifo:
            parts.append("SCHED_FIFO 10")
        if self.patched:
            parts.append("patched in at run time")
        return ", ".join(parts)


CEILING = "accept netlink+GSO"

DEFAULT_VARIANTS = [
    Variant("direct", "direct", iperf=True),
    Variant(CEILING, "accept", iperf=True),
    Variant("accept netlink", "accept", gso=False, iperf=True),
    Variant("proxy netlink+GSO", "proxy", ceiling=CEILING),  # coloproxy run's defaults
]

LEVER_VARIANTS = [
    Variant("accept netfilterqueue", "accept", transport="netfilterqueue", gso=False),
    Variant("accept netlink 1 verdict/send", "accept", gso=False, flush_each=True),
    Variant("accept netlink+GSO copy 128", "accept", copy_range=128),
    Variant("accept netlink+GSO asyncio", "accept", loop="asyncio"),
    Variant("proxy netfilterqueue", "proxy", transport="netfilterqueue", gso=False,
            ceiling="accept netfilterqueue"),
    Variant("proxy netlink*", "proxy", gso=False, ceiling="accept netlink"),
    Variant("proxy launcher control*", "proxy", launcher=True, ceiling=CEILING),
    Variant("proxy batch 64*", "proxy", batch=64, ceiling=CEILING),
    Variant("proxy batch 1024*", "proxy", batch=1024, ceiling=CEILING),
    Variant("proxy rcvbuf 1M", "proxy", rcvbuf=1 << 20, ceiling=CEILING),
    Variant("proxy rcvbuf 32M", "proxy", rcvbuf=32 << 20, ceiling=CEILING),
    Variant("proxy max_len 4096", "proxy", max_len=4096, ceiling=CEILING),
    Variant("proxy asyncio*", "proxy", loop="asyncio", ceiling="accept netlink+GSO asyncio"),
    Variant("accept netlink+GSO fifo", "accept", fifo=True),
    Variant("proxy fifo", "proxy", fifo=True, ceiling="accept netlink+GSO fifo"),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    """One workload on one variant in one round."""

    workload: str
    variant: str
    round: int
    date: str
    command: str
    gbits: float | None = None
    samples: list[float] = field(default_factory=list)
    packets: dict[str, int] = field(default_factory=dict)  # queued, by queue name (QUEUES)
    payload_bytes: int = 0
    seconds: float = 0.0
    # CPU seconds of each host's consumer or daemon ("hp", "hs"), and of it in user space
    # (the rest: kernel work in its syscalls, which includes forwarding what it accepts).
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_user: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0  # share of all CPUs busy during the workload, everything counted
    drops: dict[str, int] = field(default_factory=dict)  # kernel drops by queue and cause
    tcp: dict[str, int] = field(default_factory=dict)  # TCP_COUNTERS deltas, "where counter"
    requests: Counter[str] = field(default_factory=Counter)  # checkpoint requests by reason
    evidence: list[str] = field(default_factory=list)  # the first requests' evidence details
    retransmits: int | None = None
    error: str | None = None

    @property
    def p50(self) -> float:
        return percentile(self.samples, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 0.99)


def guest_port(flow: str | None) -> str:
    """' :PORT' of the guest side of a checkpoint request's flow ("tcp A:P -> B:Q"), or ''."""
    if not flow or " -> " not in flow:
        return ""
    return " :" + flow.split(" -> ")[0].rsplit(":", 1)[-1]


def percentile(samples: Sequence[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (/proc/PID/stat); zeros if it is gone.

    System time includes what the kernel does on the way of a packet we give a verdict to
    (the rest of FORWARD, the bridge, the tunnel, the veth into the next namespace)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_sample() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of all CPUs so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def busy_between(before: tuple[int, int], after: tuple[int, int]) -> float:
    return 1 - (after[1] - before[1]) / max(1, after[0] - before[0])


def busy_fraction(seconds: float) -> float:
    """Share of all CPUs busy over ``seconds``: other load on the machine."""
    before = cpu_sample()
    time.sleep(seconds)
    return busy_between(before, cpu_sample())


# ---------------------------------------------------------------------------------------------
# The bench


def queue_number(name: str) -> int:
    return next(queue.number for queue in QUEUES if queue.name == name)


def daemon_config(role: Literal["primary", "secondary"], variant: Variant, socket: Path) -> str:
    """The config of host P's (``primary``) or host S's daemon: tests/pairworld.py's, so that
    the bench runs the pair the namespace tests run, with this bench's queue numbers and the
    variant's queue settings added to each host's ``queues`` section."""
    import yaml

    from pairworld import PRIMARY_CONFIG, SECONDARY_CONFIG

    if role == "primary":
        text = PRIMARY_CONFIG.format(
            socket=socket, compare_timeout=1.0, max_held_packets=4096, max_held_bytes=64 << 20
        )
        numbers = {
            "primary_out": queue_number("P-out"),
            "secondary_out": queue_number("S-out"),
            "primary_split": queue_number("P-split"),
        }
    else:
        text = SECONDARY_CONFIG.format(socket=socket)
        numbers = {
            "secondary_in": queue_number("S-in"),
            "secondary_egress": queue_number("S-egress"),
        }
    config = yaml.safe_load(text)
    config["queues"] = numbers | {
        "transport": variant.transport,
        "max_len": variant.max_len,
        "rcvbuf": variant.rcvbuf,
        "copy_range": variant.copy_range,
    }
    return str(yaml.safe_dump(config, sort_keys=False))


class Bench:
    def __init__(self, args: argparse.Namespace, topology: Topology, workdir: Path) -> None:
        self.args = args
        self.topology = topology
        self.workdir = workdir
        self.results: list[Measurement] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.consumer_counters: dict[str, list[dict[str, Any]]] = {}
        self.profiles: dict[str, Counter[str]] = {}
        self.profile_totals: dict[str, int] = {}
        self.bulk_servers: list[subprocess.Popen[Any]] = []

    # -- processes -------------------------------------------------------------------------

    def spawn(
        self, where: str, argv: list[str], log: str | None = None, ready: bool = False
    ) -> subprocess.Popen[Any]:
        stdout: IO[Any] | int
        if ready:
            stdout = subprocess.PIPE
        elif log is not None:
            stdout = open(self.workdir / log, "ab")  # noqa: SIM115  (closed below)
        else:
            stdout = subprocess.DEVNULL
        # cwd: `python -m coloproxy` puts it first on sys.path, so it picks the copy in use.
        process = self.topology.popen(
            where, argv, stdout=stdout, stderr=subprocess.STDOUT, cwd=str(SOURCE)
        )
        if not isinstance(stdout, int):
            stdout.close()
        self.processes.append(process)
        if ready:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != b"ready":
                rest = process.stdout.read() if process.poll() is not None else b""
                raise RuntimeError(f"{shlex.join(argv)} in {where}: {(line + rest).decode()!r}")
        return process

    def stop(self, process: subprocess.Popen[Any], timeout: float = 10.0) -> bytes:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        if process in self.processes:
            self.processes.remove(process)
        return out or b""

    def start_guests(self) -> None:
        from coloproxy.lab.topology import CLIENT_IPV4, CLIENT_MAC, GUEST_INTERFACE

        py = sys.executable
        for guest, variant in (("pvm", "primary"), ("svm", "secondary")):
            if self.args.guest_rmem:
                rmem = f"net.ipv4.tcp_rmem={self.args.guest_rmem}"
                self.topology.exec(guest, ["sysctl", "-qw", rmem])
            # The client's MAC as a checkpoint would have copied it into the SVM. Without it,
            # a client that has not ARPed since the SVM was connected (it talked to the PVM
            # in the direct phase) is unknown to the SVM, whose own ARP requests end at
            # <p>-mir0: the SVM cannot answer, the PVM's output times out, and the engine
            # double's checkpoint cannot copy state, so the pair never realigns.
            neighbour = [CLIENT_IPV4, "lladdr", CLIENT_MAC, "dev", GUEST_INTERFACE]
            self.topology.exec(guest, ["ip", "neigh", "replace", *neighbour, "nud", "permanent"])
            self.spawn(guest, [py, str(ROOT / "tests" / "guestd.py"), "--variant", variant],
                       ready=True)  # fmt: skip
            self.spawn(guest, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        self.restart_bulk_servers()
        time.sleep(0.3)  # iperf3 listening

    def restart_bulk_servers(self) -> None:
        """(Re)start the bulk server in both guests; a stopped one aborts its connections.

        Before each proxy variant: the namespace guests cannot be made equal by a checkpoint
        (the engine double's ``synced: false``), so a connection that stalled in the previous
        variant (bulk-up, see the README) would keep diverging through the next one.
        """
        for process in self.bulk_servers:
            self.stop(process)
        argv = [sys.executable, str(SCRIPT), "_guest-bulk", "--port", str(BULK_PORT)]
        self.bulk_servers = [self.spawn(guest, argv, ready=True) for guest in ("pvm", "svm")]

    # -- host set-up -----------------------------------------------------------------------

    def host_setup(self, up: bool) -> None:
        from coloproxy.net import host as hostnet
        from coloproxy.role import Role
        from netfixtures import QUEUES as RULE_QUEUES
        from netfixtures import host_params

        # The rules name the queues by tests/netfixtures' numbers; the consumers bind ours.
        for name, field_name in (
            ("P-out", "primary_out"),
            ("S-out", "secondary_out"),
            ("S-in", "secondary_in"),
            ("S-egress", "secondary_egress"),
        ):
            if getattr(RULE_QUEUES, field_name) != queue_number(name):
                raise RuntimeError(
                    f"tests/netfixtures.QUEUES.{field_name} is not {name}'s "
                    f"{queue_number(name)}: update QUEUES in {SCRIPT.name}"
                )
        for role, where in ((Role.PRIMARY, "hp"), (Role.SECONDARY, "hs")):
            action = hostnet.setup if up else hostnet.teardown
            self.topology.run_in(where, action, host_params(role))

    # -- one workload ----------------------------------------------------------------------

    def queue_ids(self) -> tuple[dict[str, int], dict[str, int]]:
        """Packets queued so far (the last id) per queue, each read in its host's namespace,
        and the kernel's drop counters by "queue full" (max_len) and "receive buffer full"
        (rcvbuf) per queue."""
        from coloproxy.capture.stats import read_queue_stats

        stats = {host: read_queue_stats(netns=self.topology.ns(host)) for host in HOSTS}
        ids: dict[str, int] = {}
        drops: dict[str, int] = {}
        for queue in QUEUES:
            found = stats[queue.host].get(queue.number)
            ids[queue.name] = found.id_sequence if found else 0
            if found:
                drops[f"{queue.name} queue full"] = found.queue_dropped
                drops[f"{queue.name} rcvbuf full"] = found.user_dropped
        return ids, drops

    def tcp_counters(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for where in sorted({where for where, _ in TCP_COUNTERS}):
            names = [name for place, name in TCP_COUNTERS if place == where]
            done = self.topology.exec(where, ["nstat", "-asz", *names], check=False)
            values = dict(line.split()[:2] for line in done.stdout.splitlines()[1:] if line)
            for name in names:
                found[f"{where} {name}"] = int(values.get(name, 0))
        return found

    def measure(
        self,
        variant: Variant,
        workload: str,
        round_: int,
        workers: dict[str, subprocess.Popen[Any]],
        engine: Engine | None,
    ) -> Measurement:
        from coloproxy.lab.topology import GUEST_IPV4

        args = self.args
        if workload.startswith("iperf3"):
            argv = ["iperf3", "-c", GUEST_IPV4, "-p", str(IPERF_PORT), "-t", f"{args.seconds:g}",
                    "-J"] + (["-R"] if workload == "iperf3-down" else [])  # fmt: skip
        elif workload == "rr":
            argv = [sys.executable, str(SCRIPT), "_client", "rr", "--host", GUEST_IPV4,
                    "--rate", f"{args.rate:g}", "--count", str(args.requests)]  # fmt: skip
        else:
            argv = [sys.executable, str(SCRIPT), "_client", workload, "--host", GUEST_IPV4,
                    "--seconds", f"{args.seconds:g}"]  # fmt: skip
        command = shlex.join(["ip", "netns", "exec", self.topology.ns("client"), *argv])
        result = Measurement(workload, variant.name, round_, now_utc(), command)
        ids0, drops0 = self.queue_ids()
        tcp0 = self.tcp_counters()
        cpu0 = {host: process_cpu(worker.pid) for host, worker in workers.items()}
        requests0 = len(engine.requests) if engine else 0
        profilers = self.start_profiles(variant, workload, workers, round_)
        wall0 = time.monotonic()
        machine0 = cpu_sample()
        timeout = args.seconds + args.requests / args.rate + 60
        done = self.topology.exec("client", argv, check=False, timeout=timeout)
        result.seconds = time.monotonic() - wall0
        result.machine_busy = busy_between(machine0, cpu_sample())
        self.finish_profiles(profilers)
        cpu1 = {host: process_cpu(worker.pid) for host, worker in workers.items()}
        ids1, drops1 = self.queue_ids()
        if engine is not None:
            result.requests = Counter(
                f"{r.reason}{guest_port(r.flow)}" for r in engine.requests[requests0:]
            )
            # What the comparator said about each (an overflow names the bound it hit).
            for request in engine.requests[requests0:]:
                detail = request.evidence.detail if request.evidence is not None else ""
                if detail and len(result.evidence) < 3:
                    result.evidence.append(f"{request.reason}: {detail}")
        for host in workers:
            result.cpu_user[host] = cpu1[host][0] - cpu0[host][0]
            result.cpu[host] = result.cpu_user[host] + cpu1[host][1] - cpu0[host][1]
        # A queue bound anew starts its ids at 0 again (wrap-around: 32 bits).
        result.packets = {name: (ids1[name] - ids0[name]) % (1 << 32) for name in ids1}
        result.drops = {k: v - drops0.get(k, 0) for k, v in drops1.items() if v - drops0.get(k, 0)}
        tcp1 = self.tcp_counters()
        result.tcp = {key: tcp1[key] - tcp0[key] for key in tcp1}
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
            result.error = " ".join(last) or f"exit {done.returncode}"
            return result
        report = json.loads(done.stdout)
        if workload.startswith("iperf3"):
            end = report["end"]
            result.gbits = end["sum_received"]["bits_per_second"] / 1e9
            result.payload_bytes = int(end["sum_received"]["bytes"])
            result.retransmits = int(end["sum_sent"].get("retransmits", 0))
        elif workload == "rr":
            result.samples = report["samples"]
        else:
            result.payload_bytes = int(report["bytes"])
            result.gbits = report["bytes"] * 8 / report["seconds"] / 1e9
        return result

    def workloads(self, variant: Variant) -> list[str]:
        # rr first and bulk-up last: a bulk-up stall through the proxy (see the README) leaves
        # retransmissions and timeout checkpoints behind that would land in the next workload.
        chosen = [w for w in ("rr", "bulk-down", "bulk-up") if w in self.args.workloads]
        if variant.iperf and not self.args.skip_iperf:
            chosen += ["iperf3-down", "iperf3-up"]
        return chosen

    def run_variant(
        self, variant: Variant, round_: int, workers: dict[str, subprocess.Popen[Any]],
        engine: Engine | None,
    ) -> None:  # fmt: skip
        for workload in self.workloads(variant):
            m = self.measure(variant, workload, round_, workers, engine)
            self.results.append(m)
            if m.error:
                shown = f"FAILED: {m.error}"
            elif m.samples:
                shown = f"p50 {m.p50 * 1e6:6.0f} us  p99 {m.p99 * 1e6:6.0f} us"
            else:
                shown = f"{m.gbits or 0:6.2f} Gbit/s"
            checkpoints = sum(m.requests.values())
            extra = f"  checkpoints {checkpoints} {dict(m.requests)}" if engine else ""
            extra += "".join(
                f", {HOSTS[host]} CPU {cpu_share(m, host)}" for host in HOSTS if host in m.cpu
            )
            if variant.kind == "proxy" and m.packets.get("P-split"):
                extra += f", P-split +{m.packets['P-split']}"
            extra += "".join(f", {k} +{v}" for k, v in m.tcp.items() if v)
            extra += "".join(f", dropped ({k}) {v}" for k, v in m.drops.items())
            extra += "".join(f"\n      {detail}" for detail in m.evidence)
            print(f"  {m.date}  round {round_}  {variant.name:34s} {workload:11s} {shown}"
                  f"  load {loadavg()}{extra}", flush=True)  # fmt: skip

    # -- accept-only -----------------------------------------------------------------------

    def run_accept(self, variant: Variant, round_: int) -> None:
        """One consumer per host, in its namespace, on the queues that host's daemon binds:
        two processes, as the two daemons are."""
        consumers: dict[str, subprocess.Popen[Any]] = {}
        try:
            for host in HOSTS:
                argv = [sys.executable, str(SCRIPT), "_consumer", "--host", host,
                        "--transport", variant.transport, "--batch", str(variant.batch),
                        "--rcvbuf", str(variant.rcvbuf), "--max-len", str(variant.max_len),
                        "--copy-range", str(variant.copy_range),
                        "--loop", variant.loop]  # fmt: skip
                if variant.gso:
                    argv.append("--gso")
                if variant.flush_each:
                    argv.append("--flush-each")
                if variant.fifo:
                    argv[:0] = FIFO
                self.note_command(variant, host, argv)
                consumers[host] = self.spawn(host, argv, ready=True)
            self.run_variant(variant, round_, consumers, None)
        finally:
            counters: dict[str, Any] = {}
            for consumer in consumers.values():
                out = self.stop(consumer)
                for line in out.decode(errors="replace").splitlines():
                    if line.startswith("{"):
                        counters |= json.loads(line)
            if counters:
                self.consumer_counters.setdefault(variant.name, []).append(counters)

    # -- proxy -----------------------------------------------------------------------------

    def daemon_argv(self, variant: Variant, config: Path) -> list[str]:
        if variant.patched:
            argv = [sys.executable, str(SCRIPT), "_daemon", "-c", str(config),
                    "--batch", str(variant.batch), "--loop", variant.loop,
                    "--gso", "on" if variant.gso else "off"]  # fmt: skip
        else:
            argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(config)]
        if variant.fifo:
            argv[:0] = FIFO
        return argv

    def start_daemon(
        self, variant: Variant, host: str, role: Literal["primary", "secondary"]
    ) -> subprocess.Popen[Any]:
        """``coloproxy run`` (or the ``_daemon`` launcher) for one host, with its config
        written for this variant; back once its control socket is there."""
        socket_path = self.workdir / f"{role}.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        config = self.workdir / f"{role}.yaml"
        config.write_text(daemon_config(role, variant, socket_path))
        argv = self.daemon_argv(variant, config)
        self.note_command(variant, host, argv)
        log = self.workdir / f"{role}.log"
        with log.open("a") as stream:  # every start in one file (--keep), marked
            stream.write(f"==== {now_utc()} {variant.name}: {shlex.join(argv)}\n")
        daemon = self.spawn(host, argv, log=log.name)
        wait_until(socket_path.exists, daemon, f"the {role}'s control socket", log)
        return daemon

    def run_proxy(self, variant: Variant, round_: int) -> None:
        """Both daemons, as tests/pairworld.py starts them: host S's first (its S-in must
        be bound before host P's restart checkpoint lets client traffic through), then host
        P's, then the engine double on host P's control socket."""
        from pairworld import Engine

        self.restart_bulk_servers()
        daemons: dict[str, subprocess.Popen[Any]] = {}
        engine: Engine | None = None
        try:
            daemons["hs"] = self.start_daemon(variant, "hs", "secondary")
            daemons["hp"] = primary = self.start_daemon(variant, "hp", "primary")
            engine = Engine(self.workdir / "primary.sock", delay=ENGINE_DELAY)
            running = engine
            log = self.workdir / "primary.log"
            wait_until(lambda: running.completed >= 1, primary, "the restart checkpoint", log)
            self.run_variant(variant, round_, daemons, engine)
        finally:
            if engine is not None:
                engine.close()
            for daemon in reversed(daemons.values()):
                self.stop(daemon)

    def note_command(self, variant: Variant, where: str, argv: list[str]) -> None:
        command = shlex.join(["ip", "netns", "exec", self.topology.ns(where), *argv])
        print(f"  {now_utc()}  {variant.name}: {variant.settings()}\n      {command}", flush=True)

    # -- profile ---------------------------------------------------------------------------

    def start_profiles(
        self,
        variant: Variant,
        workload: str,
        workers: dict[str, subprocess.Popen[Any]],
        round_: int,
    ) -> list[tuple[subprocess.Popen[Any], Path, str]]:
        """py-spy on each host's consumer or daemon (round 1 only)."""
        if not (self.args.profile and workers and round_ == 1 and variant.kind != "direct"):
            return []
        if workload not in ("bulk-down", "bulk-up", "rr"):
            return []
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            return []
        profilers = []
        for host, worker in workers.items():
            output = self.workdir / f"profile-{len(self.profiles)}-{workload}-{host}.txt"
            duration = int(self.args.seconds + self.args.requests / self.args.rate + 3)
            argv = [py_spy, "record", "--pid", str(worker.pid), "--rate", "250",
                    "--format", "raw", "--output", str(output), "--nonblocking", "--function",
                    "--duration", str(duration)]  # fmt: skip
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            profilers.append((process, output, f"{variant.name} {workload}, {HOSTS[host]}"))
        time.sleep(0.2)  # py-spy attached
        return profilers

    def finish_profiles(self, profilers: list[tuple[subprocess.Popen[Any], Path, str]]) -> None:
        for process, _, _ in profilers:
            process.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
        for process, path, label in profilers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if not path.exists():
                continue
            self_time: Counter[str] = Counter()
            total = 0
            for line in path.read_text(errors="replace").splitlines():
                stack, _, count_text = line.rpartition(" ")
                if not stack or not count_text.isdigit():
                    continue
                count = int(count_text)
                total += count
                leaf = stack.split(";")[-1]
                self_time[leaf] += count
            self.profiles[label] = self_time
            self.profile_totals[label] = total

    # -- rounds ----------------------------------------------------------------------------

    def run(self, variants: list[Variant]) -> None:
        direct = [v for v in variants if v.kind == "direct"]
        accept = [v for v in variants if v.kind == "accept"]
        proxy = [v for v in variants if v.kind == "proxy"]
        for round_ in range(1, self.args.rounds + 1):
            print(f"round {round_}: {now_utc()}, load average {loadavg()}", flush=True)
            for variant in direct:
                print(f"  {now_utc()}  {variant.name}: {variant.settings()}", flush=True)
                self.run_variant(variant, round_, {}, None)
            if not accept and not proxy:
                continue
            self.host_setup(True)
            for variant in accept:
                self.run_accept(variant, round_)
            for variant in proxy:
                self.run_proxy(variant, round_)
            if round_ < self.args.rounds and direct:
                self.host_setup(False)


def wait_until(
    predicate: Callable[[], bool],
    process: subprocess.Popen[Any],
    what: str,
    log: Path | None = None,
    timeout: float = 30,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Summary:
    """One workload on one variant over all its rounds: the median round's figures."""

    variant: str
    workload: str
    rounds: list[Measurement]  # every round, failed ones too, in order
    median: Measurement | None  # the median round (lower middle of an even count); None: all failed
    gbits: float | None = None  # bulk: median Gbit/s, a failed round counted as 0
    p50: float = float("nan")  # rr: median of the rounds' p50 and p99
    p99: float = float("nan")
    worst: float = float("nan")  # rr: the largest sample of all rounds
    requests: Counter[str] = field(default_factory=Counter)  # every round, failed ones too
    tcp: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> list[Measurement]:
        return [m for m in self.rounds if m.error]

    def per_round(self) -> str:
        """Each round's figure, in round order: Gbit/s, or p50/p99 us; "x" for a failure."""
        if self.workload == "rr":
            return ", ".join(
                "x" if m.error else f"{m.p50 * 1e6:.0f}/{m.p99 * 1e6:.0f}" for m in self.rounds
            )
        return ", ".join("x" if m.error else f"{m.gbits or 0:.2f}" for m in self.rounds)


def summarize(results: list[Measurement], variant: str, workload: str) -> Summary | None:
    """The median of the rounds (bench discipline: at least 3 rounds, alternated). A failed
    bulk round (a stall) counts as 0 Gbit/s: a stream that stops is what the user gets."""
    rounds = [m for m in results if m.variant == variant and m.workload == workload]
    if not rounds:
        return None
    found = [m for m in rounds if not m.error]
    summary = Summary(variant, workload, rounds, None)
    for m in rounds:
        summary.requests.update(m.requests)
        summary.tcp.update(m.tcp)
    if workload == "rr":
        if found:
            summary.p50 = statistics.median(m.p50 for m in found)
            summary.p99 = statistics.median(m.p99 for m in found)
            summary.worst = max(max(m.samples) for m in found)
            ordered = sorted(found, key=lambda m: m.p50)
            summary.median = ordered[(len(ordered) - 1) // 2]
        return summary
    summary.gbits = statistics.median((m.gbits or 0.0) if not m.error else 0.0 for m in rounds)
    if found:
        ordered = sorted(found, key=lambda m: m.gbits or 0.0)
        summary.median = ordered[(len(ordered) - 1) // 2]
    return summary


def frame_file(frame: str) -> str:
    """The source file of a py-spy frame "function (path:line)", shortened to what matters:
    coloproxy's modules by their package path, the rest (the event loop, uvloop's C code
    seen as its Python caller) as "loop and other"."""
    path = frame.rpartition(" (")[2].rpartition(":")[0]
    if "coloproxy/" in path:
        return "coloproxy/" + path.rpartition("coloproxy/")[2]
    return "loop and other"


def cpu_share(m: Measurement | None, host: str) -> str:
    """One host's consumer or daemon CPU as a share of one core over the workload, and the
    user-space part of it."""
    if m is None or not m.cpu.get(host) or not m.seconds:
        return "-"
    cpu = m.cpu[host]
    return f"{cpu / m.seconds * 100:.0f}% ({m.cpu_user[host] / cpu * 100:.0f}% user)"


def fmt_ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def round_ratios(proxy: Summary, ceiling: Summary | None) -> str:
    """proxy / accept-only round by round (the two ran minutes apart in the same round)."""
    if ceiling is None:
        return "-"
    accept = {m.round: m for m in ceiling.rounds}
    ratios = []
    for m in proxy.rounds:
        other = accept.get(m.round)
        if other is None or other.error or not other.gbits:
            ratios.append("-")
        else:
            ratios.append(f"{(0.0 if m.error else m.gbits or 0.0) / other.gbits:.2f}")
    return ", ".join(ratios)


def report(args: argparse.Namespace, bench: Bench, variants: list[Variant], header: str) -> None:
    results = bench.results
    summaries: dict[tuple[str, str], Summary] = {}
    for measured in results:
        key = (measured.variant, measured.workload)
        if key not in summaries and (made := summarize(results, *key)) is not None:
            summaries[key] = made

    def get(variant: str, workload: str) -> Summary | None:
        return summaries.get((variant, workload))

    accept_best: dict[str, Summary] = {}
    for workload in ("bulk-down", "bulk-up", "iperf3-down", "iperf3-up"):
        found = [s for v in variants if v.kind == "accept" and (s := get(v.name, workload))]
        if found:
            accept_best[workload] = max(found, key=lambda s: s.gbits or 0.0)

    def ceiling_of(variant: Variant, workload: str) -> Summary | None:
        if variant.kind == "proxy" and variant.ceiling:
            return get(variant.ceiling, workload)
        if variant.kind == "accept":
            return accept_best.get(workload)
        return None

    rounds = args.rounds
    print()
    print(header)
    print(f"load average at the end: {loadavg()}")
    print()
    print(f"## Bulk: payload Gbit/s, median of {rounds} rounds (each round in order), and what "
          "went through the queues in the median round")  # fmt: skip
    print()
    print("| workload | path | Gbit/s | rounds | vs direct | vs accept-only | P-out pkts "
          "| payload B / P-out pkt | S-out pkts | P-split pkts | S-in pkts | machine busy "
          "| host P CPU | host S CPU | us CPU/pkt | CPU s/GB | kernel drops | checkpoints "
          "| client retrans/RTOs | PVM/SVM retrans | SVM beyond-window | date |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
          "|---:|---:|---:|---:|---:|---|")  # fmt: skip
    for workload in ("bulk-down", "bulk-up", "iperf3-down", "iperf3-up"):
        direct = get("direct", workload)
        for variant in variants:
            s = get(variant.name, workload)
            if s is None:
                continue
            m = s.median
            ceiling = ceiling_of(variant, workload)
            queued = variant.kind != "direct" and m is not None

            def count(name: str, m: Measurement | None = m, queued: bool = queued) -> str:
                return str(m.packets.get(name, 0)) if queued and m is not None else "-"

            packets = sum(m.packets.values()) if m else 0
            cpu = sum(m.cpu.values()) if m else 0.0
            p_out = m.packets.get("P-out", 0) if m else 0
            tcp = s.tcp
            print(
                f"| {workload} | {variant.name} | {s.gbits or 0:.2f} | {s.per_round()} "
                f"| {fmt_ratio(s.gbits, direct.gbits if direct else None)} "
                f"| {fmt_ratio(s.gbits, ceiling.gbits if ceiling else None)} "
                f"| {count('P-out')} "
                f"| {m.payload_bytes // p_out if m and p_out else '-'} "
                f"| {count('S-out')} | {count('P-split')} | {count('S-in')} "
                f"| {m.machine_busy * 100 if m else 0:.0f}% "
                f"| {cpu_share(m, 'hp')} | {cpu_share(m, 'hs')} "
                f"| {cpu / packets * 1e6 if packets else 0:.1f} "
                f"| {cpu / m.payload_bytes * 1e9 if m and m.payload_bytes and cpu else 0:.2f} "
                f"| {sum(m.drops.values()) if m else '-'} "
                f"| {sum(s.requests.values()) if variant.kind == 'proxy' else '-'} "
                f"| {tcp['client TcpRetransSegs']}/{tcp['client TcpExtTCPTimeouts']} "
                f"| {tcp['pvm TcpRetransSegs']}/{tcp['svm TcpRetransSegs']} "
                f"| {tcp['svm TcpExtBeyondWindow']} | {m.date if m else '-'} |"
            )
    print()
    print("Retransmissions, RTOs, beyond-window and checkpoints: all rounds added up.")
    print()
    print(f"## Request/response latency: {REQUEST_SIZE} B at {args.rate:g}/s, one TCP connection "
          f"to the echo service, {args.requests} per round; median of the rounds' p50 and p99 "
          "(each round p50/p99 in order)")  # fmt: skip
    print()
    print("| path | p50 us | p99 us | rounds p50/p99 us | max us | added p50 us | added p99 us "
          "| host P CPU | host S CPU | us CPU/pkt | checkpoints | samples |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    direct_rr = get("direct", "rr")
    for variant in variants:
        s = get(variant.name, "rr")
        if s is None or s.median is None:
            continue
        m = s.median
        packets = sum(m.packets.values())
        added50 = (s.p50 - direct_rr.p50) * 1e6 if direct_rr else float("nan")
        added99 = (s.p99 - direct_rr.p99) * 1e6 if direct_rr else float("nan")
        per_packet = sum(m.cpu.values()) / packets * 1e6 if packets else 0.0
        checkpoints = sum(s.requests.values()) if variant.kind == "proxy" else "-"
        print(
            f"| {variant.name} | {s.p50 * 1e6:.0f} | {s.p99 * 1e6:.0f} | {s.per_round()} "
            f"| {s.worst * 1e6:.0f} | {added50:.0f} | {added99:.0f} "
            f"| {cpu_share(m, 'hp')} | {cpu_share(m, 'hs')} | {per_packet:.1f} "
            f"| {checkpoints} | {sum(len(r.samples) for r in s.rounds)} |"
        )
    if bench.consumer_counters:
        print()
        print("## Accept-only consumers: packets per wake-up and verdict sends (whole variant)")
        print()
        print("| path | queue | packets | pkt/wakeup | verdict sends | batch verdicts |")
        print("|---|---|---:|---:|---:|---:|")
        for name, runs in bench.consumer_counters.items():
            for queue in QUEUE_NAMES:
                mine = [r[queue] for r in runs if queue in r]
                received = sum(c["received"] for c in mine)
                wakeups = sum(c["wakeups"] for c in mine)
                sends = sum(c["verdict_sends"] for c in mine)
                batches = sum(c["batch_verdicts"] for c in mine)
                per = f"{received / wakeups:.1f}" if wakeups else "-"
                print(f"| {name} | {queue} | {received} | {per} | {sends} | {batches} |")
    for label, self_time in bench.profiles.items():
        total = bench.profile_totals.get(label, 0)
        if not total:
            continue
        print()
        print(f"## py-spy, {label}: self time of the busiest functions ({total} samples, idle "
              "excluded)")  # fmt: skip
        print()
        by_file: Counter[str] = Counter()
        for frame, number in self_time.items():
            by_file[frame_file(frame)] += number
        print("    by file: " + ", ".join(
            f"{name} {number / total * 100:.0f}%" for name, number in by_file.most_common()
        ))  # fmt: skip
        print()
        for frame, number in self_time.most_common(args.profile_top):
            print(f"    {number / total * 100:5.1f}%  {frame}")
    failures = [m for m in results if m.error]
    if failures:
        print()
        print("## Failed measurements")
        for m in failures:
            counters = ", ".join(f"{k} +{v}" for k, v in m.tcp.items() if v)
            print(f"    round {m.round} {m.variant} {m.workload}: {m.error}; checkpoints "
                  f"{dict(m.requests)}; {counters}")  # fmt: skip
    print()
    print("## Summary")
    print()
    print(f"Targets: proxy bulk >= {TARGET_BULK_VS_ACCEPT:.0%} of its accept-only ceiling (same "
          f"capture settings, same run; medians of {rounds} rounds, a failed round counted as "
          f"0); added latency vs direct p50 <= {TARGET_ADDED_P50 * 1e6:.0f} us, p99 <= "
          f"{TARGET_ADDED_P99 * 1e6:.0f} us (medians of the rounds).")  # fmt: skip
    print()
    print("| workload | path | median | rounds | vs direct | vs accept-only | per round "
          "| checkpoints | target |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---|---:|---|")
    for workload in ("bulk-down", "bulk-up", "rr", "iperf3-down", "iperf3-up"):
        direct = get("direct", workload)
        for variant in variants:
            s = get(variant.name, workload)
            if s is None:
                continue
            ceiling = ceiling_of(variant, workload)
            checkpoints = str(sum(s.requests.values())) if variant.kind == "proxy" else "-"
            failed = len(s.failed)
            per_round = "-"
            if workload == "rr":
                if s.median is None:
                    print(f"| rr | {variant.name} | FAILED in every round: {s.failed[0].error} "
                          f"| - | - | - | - | {checkpoints} | NOT met |")  # fmt: skip
                    continue
                result = f"p50 {s.p50 * 1e6:.0f} us, p99 {s.p99 * 1e6:.0f} us"
                vs_direct = (
                    f"{(s.p50 - direct.p50) * 1e6:+.0f}/{(s.p99 - direct.p99) * 1e6:+.0f} us"
                    if direct and variant.kind != "direct"
                    else "-"
                )
                vs_accept = (
                    f"{(s.p50 - ceiling.p50) * 1e6:+.0f}/{(s.p99 - ceiling.p99) * 1e6:+.0f} us"
                    if ceiling and variant.kind == "proxy"
                    else "-"
                )
                target = "-"
                if variant.kind == "proxy" and direct:
                    ok50 = s.p50 - direct.p50 <= TARGET_ADDED_P50 and not failed
                    ok99 = s.p99 - direct.p99 <= TARGET_ADDED_P99 and not failed
                    target = (
                        f"p50 {'met' if ok50 else 'NOT met'}, p99 {'met' if ok99 else 'NOT met'}"
                    )
            else:
                result = f"{s.gbits or 0:.2f} Gbit/s"
                vs_direct = fmt_ratio(s.gbits, direct.gbits if direct else None)
                vs_accept = fmt_ratio(s.gbits, ceiling.gbits if ceiling else None)
                target = "-"
                if variant.kind == "proxy":
                    per_round = round_ratios(s, ceiling)
                    if workload.startswith("bulk") and ceiling:
                        ok = (s.gbits or 0) >= TARGET_BULK_VS_ACCEPT * (ceiling.gbits or 0)
                        target = "met" if ok else "NOT met"
            if failed:
                result += f" ({failed} of {len(s.rounds)} rounds FAILED)"
            print(f"| {workload} | {variant.name} | {result} | {s.per_round()} | {vs_direct} "
                  f"| {vs_accept} | {per_round} | {checkpoints} | {target} |")  # fmt: skip
    print()
    print("vs accept-only: bulk, the ratio of the medians to the accept-only variant with the "
          "same capture settings (proxy rows) or to the best accept-only (accept rows); per "
          "round: proxy / accept-only within each round; latency, proxy minus that accept-only "
          "(p50/p99). '*': GSO or other settings coloproxy run cannot take from its config "
          "yet, patched in at run time (see bench/proxy_README.md).")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="helper")
    bulk = sub.add_parser("_guest-bulk", help="(internal) the guests' bulk server")
    bulk.add_argument("--port", type=int, default=BULK_PORT)
    client = sub.add_parser("_client", help="(internal) a client in the client namespace")
    client.add_argument("workload", choices=("bulk-down", "bulk-up", "rr"))
    client.add_argument("--host", required=True)
    client.add_argument("--seconds", type=float, default=3.0)
    client.add_argument("--rate", type=float, default=1000.0)
    client.add_argument("--count", type=int, default=2000)
    consumer = sub.add_parser("_consumer", help="(internal) one host's accept-only consumer")
    consumer.add_argument("--host", choices=tuple(HOSTS), required=True)
    consumer.add_argument("--transport", default="netlink")
    consumer.add_argument("--gso", action="store_true")
    consumer.add_argument("--batch", type=int, default=256)
    consumer.add_argument("--rcvbuf", type=int, default=8 << 20)
    consumer.add_argument("--max-len", type=int, default=8192)
    consumer.add_argument("--copy-range", type=int, default=65535)
    consumer.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    consumer.add_argument("--flush-each", action="store_true")
    daemon = sub.add_parser("_daemon", help="(internal) coloproxy run with patched levers")
    daemon.add_argument("-c", "--config", required=True)
    daemon.add_argument("--gso", choices=("on", "off", "config"), default="config")
    daemon.add_argument("--batch", type=int, default=256)
    daemon.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")

    parser.add_argument("--seconds", type=float, default=3.0, help="per bulk measurement")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=2000, help="per latency measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--levers", action="store_true", help="also the lever variants")
    parser.add_argument("--only", nargs="*", help="variant names to run (direct always runs)")
    parser.add_argument(
        "--workloads", nargs="*", default=["bulk-down", "bulk-up", "rr"],
        help="of bulk-down, bulk-up, rr (iperf3 rows come with --skip-iperf unset)",
    )  # fmt: skip
    parser.add_argument("--skip-iperf", action="store_true", help="no iperf3 reference rows")
    parser.add_argument(
        "--guest-rmem",
        metavar="'MIN DEFAULT MAX'",
        help="net.ipv4.tcp_rmem in both guests (default: the kernel's)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the consumer/daemon in round 1 (slows what it watches)",
    )
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--keep", action="store_true", help="keep the daemons' logs and configs")
    parser.add_argument(
        "--coloproxy",
        metavar="DIR",
        help="run this copy of the package (DIR/coloproxy), e.g. a patched or compiled one",
    )
    return parser.parse_args(argv)


def source_state() -> str:
    """The commit the bench ran, whether coloproxy/ had uncommitted changes, and whether
    compiled modules (scripts/build-fast) were there to be imported instead of the .py."""
    import coloproxy

    package = Path(coloproxy.__file__).resolve().parent
    compiled = sorted(p.name for p in package.rglob("*.so"))
    kind = f"compiled modules: {len(compiled)} .so" if compiled else "pure Python"
    where = f"{package} ({kind})"
    if package.parent.resolve() != ROOT:
        return f"{where}, a copy (--coloproxy)"

    def git(*argv: str) -> str:
        argv = ("git", "-C", str(ROOT), *argv)
        done = subprocess.run(argv, check=False, capture_output=True, text=True)
        return done.stdout.rstrip()

    head = git("log", "-1", "--format=%h %s") or "not a git checkout"
    changed = git("status", "--porcelain", "--", "coloproxy").splitlines()
    if changed:
        return f"{where}; {head}; uncommitted: {', '.join(line[3:] for line in changed)}"
    return f"{where}; {head}; no uncommitted changes in coloproxy/"


def main() -> int:
    args = parse_args()
    if args.coloproxy and Path(args.coloproxy).resolve() != SOURCE.resolve():
        # Start again with the copy first on sys.path (this process imported nothing yet).
        os.environ[SOURCE_ENV] = str(Path(args.coloproxy).resolve())
        os.execv(sys.executable, [sys.executable, str(SCRIPT), *sys.argv[1:]])
    if args.helper == "_guest-bulk":
        guest_bulk(args)
        return 0
    if args.helper == "_client":
        client_main(args)
        return 0
    if args.helper == "_consumer":
        consumer_main(args)
        return 0
    if args.helper == "_daemon":
        return daemon_main(args)
    if os.geteuid() != 0:
        sys.exit("proxy_bench: needs root (network namespaces, iptables, NFQUEUE)")
    if shutil.which("iperf3") is None and not args.skip_iperf:
        sys.exit("proxy_bench: needs iperf3 (or --skip-iperf)")
    import uvloop

    from coloproxy.lab.topology import Topology

    variants = DEFAULT_VARIANTS + (LEVER_VARIANTS if args.levers else [])
    if args.only:
        variants = [v for v in variants if v.kind == "direct" or v.name in args.only]
    background = busy_fraction(1.0)
    header_lines = [
        "# coloproxy proxy bench",
        "",
        f"date: {now_utc()}",
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        f"host: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
        f"Python {platform.python_version()}, uvloop {getattr(uvloop, '__version__', '?')}",
        f"coloproxy: {source_state()}",
        f"guests' net.ipv4.tcp_rmem: {args.guest_rmem or 'kernel default'}",
        f"load average before: {loadavg()}; CPU busy in the second before: {background * 100:.0f}%",
        f"bulk: {args.seconds:g} s per measurement, {CHUNK >> 20} MiB chunks on one connection "
        f"(port {BULK_PORT}); latency: {args.requests} x {REQUEST_SIZE} B at {args.rate:g}/s "
        f"(port {ECHO_PORT}); {args.rounds} interleaved rounds; engine double pause "
        f"{ENGINE_DELAY * 1e3:g} ms",
    ]
    print("\n".join(header_lines), flush=True)
    topology = Topology(prefix=f"cpb{os.getpid() % 100000}")
    workdir = Path(tempfile.mkdtemp(prefix="proxy_bench."))
    bench = Bench(args, topology, workdir)
    started = time.monotonic()
    try:
        topology.up()
        bench.start_guests()
        bench.run(variants)
    finally:
        for process in list(bench.processes):
            bench.stop(process, timeout=5)
        topology.down()
        if args.keep:
            print(f"logs and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    header_lines.append(f"wall time: {time.monotonic() - started:.0f} s")
    report(args, bench, variants, "\n".join(header_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
