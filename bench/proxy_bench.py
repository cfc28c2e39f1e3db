"""The whole proxy on the namespace topology: direct, accept-only NFQUEUE, full ``coloproxy run``.

Builds ``coloproxy.lab.topology.Topology`` (client, LAN, host P, host S, PVM and SVM guest
namespaces) and runs the same deterministic services in both guests: ``tests/guestd.py``
(TCP echo on port 7), a bulk server of this script on port 19 and ``iperf3 -s``. Then, for
each path variant, in interleaved rounds:

* **direct**: no coloproxy rules at all; the client reaches the PVM through the bridges and
  the SVM gets nothing;
* **accept-only**: host P and host S set up by ``coloproxy.net.host.setup`` (the rules,
  mirror and tunnel ``coloproxy run`` installs) and a consumer of this script in host P's
  namespace that accepts everything on P-out and S-in and drops S-out -- the capture
  layer's ceiling for the same packets;
* **proxy**: ``coloproxy run`` for host P and host S as in ``tests/pairworld.py``, with the
  engine double of that module answering every checkpoint request after 2 ms.

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
one table at the end; asserts nothing. Needs root, iperf3, iptables (nft backend is fine).
Traffic stays in the namespaces it creates, which are deleted at the end, whatever happens.

    python3 bench/proxy_bench.py [--seconds 3] [--rounds 2] [--levers] [--profile]

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
QUEUES = (7710, 7711, 7712)  # P-out, S-out, S-in: tests/netfixtures.QUEUES
QUEUE_NAMES = ("P-out", "S-out", "S-in")
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
    """The accept-only consumer on P-out, S-out (drop) and S-in, in host P's namespace."""
    from coloproxy.capture.nfqueue import PacketQueue, QueueConfig, open_queue

    async def consume() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        queues: list[PacketQueue] = []
        for number, verdict in zip(QUEUES, ("accept", "drop", "accept"), strict=True):
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
                number,
                max_len=args.max_len,
                copy_range=args.copy_range,
                rcvbuf=args.rcvbuf,
                batch=args.batch,
                gso=args.gso and number != QUEUES[2],  # never on S-in (its verdicts rewrite)
            )
            queue = open_queue(config, on_packet, args.transport)
            decide = queue.accept if verdict == "accept" else queue.drop
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
        counters = {name: queue.counters() for name, queue in zip(QUEUE_NAMES, queues, strict=True)}
        for queue in queues:
            queue.close()
        print(json.dumps({name: dataclasses.asdict(c) for name, c in counters.items()}),
              flush=True)  # fmt: skip

    with asyncio.Runner(loop_factory=_event_loop_factory(args.loop)) as runner:
        runner.run(consume())


def daemon_main(args: argparse.Namespace) -> int:
    """``coloproxy run`` with the levers that need a code change, patched in at run time.

    The patch is the change the report proposes for coloproxy/daemon/run.py: the queue
    configs get ``gso`` (P-out and S-out, never S-in) and ``batch`` from settings.
    """
    import coloproxy.daemon.run as daemon_run
    from coloproxy.capture.nfqueue import QueueConfig
    from coloproxy.config import load_config

    config = load_config(args.config)
    queues = config.queues
    secondary_in = queues.secondary_in if queues is not None else -1

    def patched_queue_config(number: int, **settings: Any) -> QueueConfig:
        if args.gso != "config":  # never on S-in: its verdicts rewrite payloads
            settings["gso"] = args.gso == "on" and number != secondary_in
        return QueueConfig(number, batch=args.batch, **settings)

    daemon_run.QueueConfig = patched_queue_config  # type: ignore[attr-defined,assignment]
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
    max_len: int = 4096  # config default (QueueConfig's own is 8192)
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
    Variant("proxy max_len 8192", "proxy", max_len=8192, ceiling=CEILING),
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
    packets: tuple[int, int, int] = (0, 0, 0)  # queued on P-out, S-out, S-in
    payload_bytes: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # CPU seconds of the consumer or primary daemon
    cpu_user: float = 0.0  # of which in user space (the rest: kernel work in its syscalls)
    machine_busy: float = 0.0  # share of all CPUs busy during the workload, everything counted
    drops: dict[str, int] = field(default_factory=dict)  # kernel drops by queue and cause
    tcp: dict[str, int] = field(default_factory=dict)  # TCP_COUNTERS deltas, "where counter"
    requests: Counter[str] = field(default_factory=Counter)  # checkpoint requests by reason
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


PRIMARY_CONFIG = """\
pair: {{name: t1, role: primary}}
net:
  prefix: cp
  guest_port: guest0
  lan_bridge: br-lan
  replication: {{local: 10.255.77.1, remote: 10.255.77.2}}
  underlay: repl
queues:
  primary_out: {queues[0]}
  secondary_out: {queues[1]}
  secondary_in: {queues[2]}
  transport: {transport}
  max_len: {max_len}
  rcvbuf: {rcvbuf}
  copy_range: {copy_range}
compare:
  compare_timeout: 1.0
  max_held_packets: 4096
  passthrough: [{{protocol: icmpv6, peer_network: "ff00::/8"}}]
control: {{socket: {socket}}}
metrics: {{listen: "127.0.0.1:9477"}}
log: {{level: info}}
"""


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
        from coloproxy.net.rules import Role
        from netfixtures import host_params

        for role, where in ((Role.PRIMARY, "hp"), (Role.SECONDARY, "hs")):
            action = hostnet.setup if up else hostnet.teardown
            self.topology.run_in(where, action, host_params(role))

    # -- one workload ----------------------------------------------------------------------

    def queue_ids(self) -> tuple[tuple[int, int, int], dict[str, int]]:
        """Packets queued so far (the last id) per queue, and the kernel's drop counters by
        "queue full" (max_len) and "receive buffer full" (rcvbuf) per queue."""
        from coloproxy.capture.stats import read_queue_stats

        stats = read_queue_stats(netns=self.topology.ns("hp"))
        ids = tuple(stats[n].id_sequence if n in stats else 0 for n in QUEUES)
        drops: dict[str, int] = {}
        for number, name in zip(QUEUES, QUEUE_NAMES, strict=True):
            if number in stats:
                drops[f"{name} queue full"] = stats[number].queue_dropped
                drops[f"{name} rcvbuf full"] = stats[number].user_dropped
        return (ids[0], ids[1], ids[2]), drops

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
        worker: subprocess.Popen[Any] | None,
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
        cpu0 = process_cpu(worker.pid) if worker else (0.0, 0.0)
        requests0 = len(engine.requests) if engine else 0
        profiler = self.start_profile(variant, workload, worker, round_)
        wall0 = time.monotonic()
        machine0 = cpu_sample()
        timeout = args.seconds + args.requests / args.rate + 60
        done = self.topology.exec("client", argv, check=False, timeout=timeout)
        result.seconds = time.monotonic() - wall0
        result.machine_busy = busy_between(machine0, cpu_sample())
        self.finish_profile(profiler, variant)
        cpu1 = process_cpu(worker.pid) if worker else (0.0, 0.0)
        ids1, drops1 = self.queue_ids()
        if engine is not None:
            result.requests = Counter(
                f"{r.reason}{guest_port(r.flow)}" for r in engine.requests[requests0:]
            )
        result.cpu_user = cpu1[0] - cpu0[0]
        result.cpu = result.cpu_user + cpu1[1] - cpu0[1]
        result.packets = (
            (ids1[0] - ids0[0]) % (1 << 32),
            (ids1[1] - ids0[1]) % (1 << 32),
            (ids1[2] - ids0[2]) % (1 << 32),
        )
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
        self, variant: Variant, round_: int, worker: subprocess.Popen[Any] | None,
        engine: Engine | None,
    ) -> None:  # fmt: skip
        for workload in self.workloads(variant):
            m = self.measure(variant, workload, round_, worker, engine)
            self.results.append(m)
            if m.error:
                shown = f"FAILED: {m.error}"
            elif m.samples:
                shown = f"p50 {m.p50 * 1e6:6.0f} us  p99 {m.p99 * 1e6:6.0f} us"
            else:
                shown = f"{m.gbits or 0:6.2f} Gbit/s"
            checkpoints = sum(m.requests.values())
            extra = f"  checkpoints {checkpoints} {dict(m.requests)}" if engine else ""
            extra += "".join(f", {k} +{v}" for k, v in m.tcp.items() if v)
            extra += "".join(f", dropped ({k}) {v}" for k, v in m.drops.items())
            print(f"  {m.date}  round {round_}  {variant.name:34s} {workload:11s} {shown}"
                  f"  load {loadavg()}{extra}", flush=True)  # fmt: skip

    # -- accept-only -----------------------------------------------------------------------

    def run_accept(self, variant: Variant, round_: int) -> None:
        argv = [sys.executable, str(SCRIPT), "_consumer", "--transport", variant.transport,
                "--batch", str(variant.batch), "--rcvbuf", str(variant.rcvbuf),
                "--max-len", str(variant.max_len), "--copy-range", str(variant.copy_range),
                "--loop", variant.loop]  # fmt: skip
        if variant.gso:
            argv.append("--gso")
        if variant.flush_each:
            argv.append("--flush-each")
        if variant.fifo:
            argv[:0] = FIFO
        self.note_command(variant, "hp", argv)
        consumer = self.spawn("hp", argv, ready=True)
        try:
            self.run_variant(variant, round_, consumer, None)
        finally:
            out = self.stop(consumer)
            for line in out.decode(errors="replace").splitlines():
                if line.startswith("{"):
                    self.consumer_counters.setdefault(variant.name, []).append(json.loads(line))

    # -- proxy -----------------------------------------------------------------------------

    def start_secondary(self) -> subprocess.Popen[Any]:
        socket_path = self.workdir / "secondary.sock"
        config = self.workdir / "secondary.yaml"
        from pairworld import SECONDARY_CONFIG  # the same host S as the namespace tests

        config.write_text(SECONDARY_CONFIG.format(socket=socket_path))
        argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(config)]
        process = self.spawn("hs", argv, log="secondary.log")
        wait_until(
            socket_path.exists,
            process,
            "the secondary's control socket",
            self.workdir / "secondary.log",
        )
        return process

    def run_proxy(self, variant: Variant, round_: int) -> None:
        from pairworld import Engine

        self.restart_bulk_servers()
        socket_path = self.workdir / "primary.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        config = self.workdir / "primary.yaml"
        config.write_text(
            PRIMARY_CONFIG.format(
                queues=QUEUES, transport=variant.transport, max_len=variant.max_len,
                rcvbuf=variant.rcvbuf, copy_range=variant.copy_range, socket=socket_path,
            )
        )  # fmt: skip
        if variant.patched:
            argv = [sys.executable, str(SCRIPT), "_daemon", "-c", str(config),
                    "--batch", str(variant.batch), "--loop", variant.loop,
                    "--gso", "on" if variant.gso else "off"]  # fmt: skip
        else:
            argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(config)]
        if variant.fifo:
            argv[:0] = FIFO
        self.note_command(variant, "hp", argv)
        log = self.workdir / "primary.log"
        log.write_bytes(b"")
        daemon = self.spawn("hp", argv, log=log.name)
        engine: Engine | None = None
        try:
            wait_until(socket_path.exists, daemon, "the primary's control socket", log)
            engine = Engine(socket_path, delay=ENGINE_DELAY)
            running = engine
            wait_until(lambda: running.completed >= 1, daemon, "the restart checkpoint", log)
            self.run_variant(variant, round_, daemon, engine)
        finally:
            if engine is not None:
                engine.close()
            self.stop(daemon)

    def note_command(self, variant: Variant, where: str, argv: list[str]) -> None:
        command = shlex.join(["ip", "netns", "exec", self.topology.ns(where), *argv])
        print(f"  {now_utc()}  {variant.name}: {variant.settings()}\n      {command}", flush=True)

    # -- profile ---------------------------------------------------------------------------

    def start_profile(
        self, variant: Variant, workload: str, worker: subprocess.Popen[Any] | None, round_: int
    ) -> tuple[subprocess.Popen[Any], Path] | None:
        if not (self.args.profile and worker and round_ == 1 and variant.kind != "direct"):
            return None
        if workload not in ("bulk-down", "bulk-up", "rr"):
            return None
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            return None
        output = self.workdir / f"profile-{len(self.profiles)}-{workload}.txt"
        argv = [py_spy, "record", "--pid", str(worker.pid), "--rate", "250", "--format", "raw",
                "--output", str(output), "--nonblocking", "--function", "--duration",
                str(int(self.args.seconds + self.args.requests / self.args.rate + 3))]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.2)
        return process, output.with_name(output.name + f"|{variant.name} {workload}")

    def finish_profile(
        self, profiler: tuple[subprocess.Popen[Any], Path] | None, variant: Variant
    ) -> None:
        if profiler is None:
            return
        process, tagged = profiler
        process.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        path_text, label = str(tagged).split("|", 1)
        path = Path(path_text)
        if not path.exists():
            return
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
                self.run_variant(variant, round_, None, None)
            if not accept and not proxy:
                continue
            self.host_setup(True)
            for variant in accept:
                self.run_accept(variant, round_)
            if proxy:
                secondary = self.start_secondary()
                try:
                    for variant in proxy:
                        self.run_proxy(variant, round_)
                finally:
                    self.stop(secondary)
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


def best(results: list[Measurement], variant: str, workload: str) -> Measurement | None:
    """Bulk: the best round (least disturbed by the rest of the machine); latency: all rounds
    pooled into one measurement. Never the stored measurement itself (it is called often)."""
    every = [m for m in results if m.variant == variant and m.workload == workload]
    found = [m for m in every if not m.error]
    if not found:
        return None
    # Checkpoints and TCP counters: every round, failed ones too (a bad round must show).
    requests: Counter[str] = Counter()
    tcp: Counter[str] = Counter()
    for m in every:
        requests.update(m.requests)
        tcp.update(m.tcp)
    if workload == "rr":
        pooled = Measurement(workload, variant, 0, found[0].date, found[0].command)
        pooled.requests = requests
        pooled.tcp = dict(tcp)
        for m in found:
            pooled.samples.extend(m.samples)
            pooled.cpu += m.cpu
            pooled.cpu_user += m.cpu_user
            pooled.seconds += m.seconds
            pooled.packets = tuple(  # type: ignore[assignment]
                a + b for a, b in zip(pooled.packets, m.packets, strict=True)
            )
        return pooled
    chosen = max(found, key=lambda m: m.gbits or 0.0)
    return dataclasses.replace(chosen, requests=requests, tcp=dict(tcp))


def frame_file(frame: str) -> str:
    """The source file of a py-spy frame "function (path:line)", shortened to what matters:
    coloproxy's modules by their package path, the rest (the event loop, uvloop's C code
    seen as its Python caller) as "loop and other"."""
    path = frame.rpartition(" (")[2].rpartition(":")[0]
    if "coloproxy/" in path:
        return "coloproxy/" + path.rpartition("coloproxy/")[2]
    return "loop and other"


def cpu_text(m: Measurement) -> str:
    """Worker CPU as a share of one core over the workload, and the user-space part of it."""
    if not m.cpu or not m.seconds:
        return "-"
    return f"{m.cpu / m.seconds * 100:.0f}% ({m.cpu_user / m.cpu * 100:.0f}% user)"


def fmt_ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def report(args: argparse.Namespace, bench: Bench, variants: list[Variant], header: str) -> None:
    results = bench.results
    by_name = {v.name: v for v in variants}
    accept_best = {}
    for workload in ("bulk-down", "bulk-up", "iperf3-down", "iperf3-up"):
        candidates = [best(results, v.name, workload) for v in variants if v.kind == "accept"]
        found = [m for m in candidates if m is not None]
        if found:
            accept_best[workload] = max(found, key=lambda m: m.gbits or 0.0)
    print()
    print(header)
    print(f"load average at the end: {loadavg()}")
    print()
    print("## Bulk (payload Gbit/s, best round) and what went through the queues")
    print()
    print("| workload | path | Gbit/s | vs direct | vs accept-only | P-out pkts "
          "| payload B / P-out pkt | S-out pkts | S-in pkts | machine busy | worker CPU "
          "| us CPU/pkt | CPU s/GB | kernel drops | checkpoints "
          "| client retrans/RTOs | SVM beyond-window | date |")  # fmt: skip
    print(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for workload in ("bulk-down", "bulk-up", "iperf3-down", "iperf3-up"):
        direct = best(results, "direct", workload)
        for variant in variants:
            m = best(results, variant.name, workload)
            if m is None:
                continue
            ceiling = ceiling_of(results, variant, workload, accept_best)
            packets = sum(m.packets)
            tcp = Counter(m.tcp)
            print(
                f"| {workload} | {variant.name} | {m.gbits or 0:.2f} "
                f"| {fmt_ratio(m.gbits, direct.gbits if direct else None)} "
                f"| {fmt_ratio(m.gbits, ceiling.gbits if ceiling else None)} "
                f"| {m.packets[0] if variant.kind != 'direct' else '-'} "
                f"| {m.payload_bytes // m.packets[0] if m.packets[0] else '-'} "
                f"| {m.packets[1] if variant.kind != 'direct' else '-'} "
                f"| {m.packets[2] if variant.kind != 'direct' else '-'} "
                f"| {m.machine_busy * 100:.0f}% | {cpu_text(m)} "
                f"| {m.cpu / packets * 1e6 if packets else 0:.1f} "
                f"| {m.cpu / m.payload_bytes * 1e9 if m.payload_bytes and m.cpu else 0:.2f} "
                f"| {sum(m.drops.values())} "
                f"| {sum(m.requests.values()) if variant.kind == 'proxy' else '-'} "
                f"| {tcp['client TcpRetransSegs']}/{tcp['client TcpExtTCPTimeouts']} "
                f"| {tcp['svm TcpExtBeyondWindow']} | {m.date} |"
            )
    print()
    print(f"## Request/response latency: {REQUEST_SIZE} B at {args.rate:g}/s, one TCP connection "
          f"to the echo service, {args.requests} per round, rounds pooled")  # fmt: skip
    print()
    print("| path | p50 us | p99 us | max us | added p50 us | added p99 us | p50 vs direct "
          "| worker CPU | us CPU/pkt | checkpoints | samples |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    direct_rr = best(results, "direct", "rr")
    for variant in variants:
        m = best(results, variant.name, "rr")
        if m is None:
            continue
        packets = sum(m.packets)
        added50 = (m.p50 - direct_rr.p50) * 1e6 if direct_rr else float("nan")
        added99 = (m.p99 - direct_rr.p99) * 1e6 if direct_rr else float("nan")
        ratio = fmt_ratio(m.p50, direct_rr.p50 if direct_rr else None)
        per_packet = m.cpu / packets * 1e6 if packets else 0.0
        checkpoints = sum(m.requests.values()) if variant.kind == "proxy" else "-"
        print(
            f"| {variant.name} | {m.p50 * 1e6:.0f} | {m.p99 * 1e6:.0f} "
            f"| {max(m.samples) * 1e6:.0f} | {added50:.0f} | {added99:.0f} | {ratio} "
            f"| {cpu_text(m)} | {per_packet:.1f} | {checkpoints} "
            f"| {len(m.samples)} |"
        )
    if bench.consumer_counters:
        print()
        print("## Accept-only consumer: packets per wake-up and verdict sends (whole variant)")
        print()
        print("| path | queue | packets | pkt/wakeup | verdict sends | batch verdicts | enobufs |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, runs in bench.consumer_counters.items():
            for queue in QUEUE_NAMES:
                received = sum(r[queue]["received"] for r in runs)
                wakeups = sum(r[queue]["wakeups"] for r in runs)
                sends = sum(r[queue]["verdict_sends"] for r in runs)
                batches = sum(r[queue]["batch_verdicts"] for r in runs)
                enobufs = sum(r[queue]["enobufs"] for r in runs)
                per = f"{received / wakeups:.1f}" if wakeups else "-"
                print(f"| {name} | {queue} | {received} | {per} | {sends} | {batches} "
                      f"| {enobufs} |")  # fmt: skip
    for label, self_time in bench.profiles.items():
        total = bench.profile_totals.get(label, 0)
        if not total:
            continue
        print()
        print(f"## py-spy, {label}: self time of the busiest functions ({total} samples, idle "
              "excluded)")  # fmt: skip
        print()
        by_file: Counter[str] = Counter()
        for frame, count in self_time.items():
            by_file[frame_file(frame)] += count
        print("    by file: " + ", ".join(
            f"{name} {count / total * 100:.0f}%" for name, count in by_file.most_common()
        ))  # fmt: skip
        print()
        for frame, count in self_time.most_common(args.profile_top):
            print(f"    {count / total * 100:5.1f}%  {frame}")
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
          f"capture settings); added latency p50 <= {TARGET_ADDED_P50 * 1e6:.0f} us, p99 <= "
          f"{TARGET_ADDED_P99 * 1e6:.0f} us.")  # fmt: skip
    print()
    print("| workload | path | result | vs direct | vs accept-only | checkpoints | target |")
    print("|---|---|---|---:|---:|---:|---|")
    for workload in ("bulk-down", "bulk-up", "rr", "iperf3-down", "iperf3-up"):
        direct = best(results, "direct", workload)
        for variant in variants:
            m = best(results, variant.name, workload)
            failed = [f for f in results if f.variant == variant.name and f.workload == workload
                      and f.error]  # fmt: skip
            if m is None:
                if failed:
                    requests = sum((f.requests for f in failed), Counter[str]())
                    print(f"| {workload} | {variant.name} | FAILED in {len(failed)} of "
                          f"{len(failed)} rounds: {failed[0].error} | - | - "
                          f"| {sum(requests.values())} | NOT met |")  # fmt: skip
                continue
            ceiling = ceiling_of(results, by_name[variant.name], workload, accept_best)
            checkpoints = str(sum(m.requests.values())) if variant.kind == "proxy" else "-"
            if workload == "rr":
                result = f"p50 {m.p50 * 1e6:.0f} us, p99 {m.p99 * 1e6:.0f} us"
                vs_direct = (
                    f"+{(m.p50 - direct.p50) * 1e6:.0f}/+{(m.p99 - direct.p99) * 1e6:.0f} us"
                    if direct and variant.kind != "direct"
                    else "-"
                )
                vs_accept = (
                    f"{(m.p50 - ceiling.p50) * 1e6:+.0f}/{(m.p99 - ceiling.p99) * 1e6:+.0f} us"
                    if ceiling and variant.kind == "proxy"
                    else "-"
                )
                target = "-"
                if variant.kind == "proxy" and direct:
                    ok50 = m.p50 - direct.p50 <= TARGET_ADDED_P50
                    ok99 = m.p99 - direct.p99 <= TARGET_ADDED_P99
                    target = (
                        f"p50 {'met' if ok50 else 'NOT met'}, p99 {'met' if ok99 else 'NOT met'}"
                    )
            else:
                result = f"{m.gbits or 0:.2f} Gbit/s"
                vs_direct = fmt_ratio(m.gbits, direct.gbits if direct else None)
                vs_accept = fmt_ratio(m.gbits, ceiling.gbits if ceiling else None)
                target = "-"
                if variant.kind == "proxy" and workload.startswith("bulk") and ceiling:
                    ok = (m.gbits or 0) >= TARGET_BULK_VS_ACCEPT * (ceiling.gbits or 0)
                    target = "met" if ok else "NOT met"
            if failed:
                result += f" (best of the rounds; {len(failed)} round(s) FAILED)"
                target = "NOT met" if variant.kind == "proxy" else target
            print(f"| {workload} | {variant.name} | {result} | {vs_direct} | {vs_accept} "
                  f"| {checkpoints} | {target} |")  # fmt: skip
    print()
    print("vs accept-only: bulk, the ratio to the accept-only variant with the same capture "
          "settings (proxy rows) or to the best accept-only (accept rows); latency, proxy minus "
          "that accept-only (p50/p99). '*': GSO or other settings coloproxy run cannot take from "
          "its config yet, patched in at run time (see bench/proxy_README.md).")  # fmt: skip


def ceiling_of(
    results: list[Measurement],
    variant: Variant,
    workload: str,
    accept_best: dict[str, Measurement],
) -> Measurement | None:
    if variant.kind == "proxy" and variant.ceiling:
        return best(results, variant.ceiling, workload)
    if variant.kind == "accept":
        return accept_best.get(workload)
    return None


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
    consumer = sub.add_parser("_consumer", help="(internal) the accept-only consumer")
    consumer.add_argument("--transport", default="netlink")
    consumer.add_argument("--gso", action="store_true")
    consumer.add_argument("--batch", type=int, default=256)
    consumer.add_argument("--rcvbuf", type=int, default=8 << 20)
    consumer.add_argument("--max-len", type=int, default=4096)
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
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
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
