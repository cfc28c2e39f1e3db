"""NFQUEUE capture throughput and latency: direct vs through coloproxy's queue, per transport.

Builds three network namespaces, client -- router -- server, joined by veth pairs, and puts
the queue on the router's FORWARD chain (as the data path puts it on a bridge's FORWARD).
The consumer is an accept-only ``on_packet`` on coloproxy's queue classes, on a uvloop
loop in this process. Measures:

* TCP bulk: ``iperf3 -c`` for ``--seconds`` (default 5) from the client to the server,
  direct (no rule) and through the queue for each transport / GSO setting;
* request/response latency: a Python client sends 64-byte requests at ``--rate`` per second
  (default 1000) over one persistent TCP connection to a Python echo server; p50/p99/max of
  the round trip, direct and through the queue.

It prints a table and does not assert. Needs root, iperf3, iptables. Every namespace it
creates is removed at the end, whatever happens. A default run takes about a minute.

    python3 bench/nfqueue_bench.py [--seconds 5] [--rate 1000] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coloproxy.capture.queue import PacketQueue, QueueConfig  # noqa: E402
from coloproxy.capture.stats import read_queue_stats  # noqa: E402
from coloproxy.capture.transports import open_queue  # noqa: E402
from coloproxy.config import Transport  # noqa: E402

CLIENT_ADDR = "10.203.1.1"
ROUTER_CLIENT_ADDR = "10.203.1.2"
ROUTER_SERVER_ADDR = "10.203.2.2"
SERVER_ADDR = "10.203.2.1"
IPERF_PORT = 5201
ECHO_PORT = 5301
QUEUE_NUM = 7
REQUEST_SIZE = 64

COMMANDS: list[str] = []


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    COMMANDS.append(shlex.join(cmd))
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Lab:
    """client -- router -- server, each a network namespace; removed by ``down()``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.client = f"{prefix}-c"
        self.router = f"{prefix}-r"
        self.server = f"{prefix}-s"

    def up(self) -> None:
        p = self.prefix
        for ns in (self.client, self.router, self.server):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", f"{p}c0", "netns", self.client, "type", "veth", "peer", "name",
            f"{p}r0", "netns", self.router)  # fmt: skip
        run("ip", "link", "add", f"{p}s0", "netns", self.server, "type", "veth", "peer", "name",
            f"{p}r1", "netns", self.router)  # fmt: skip
        for ns, dev, addr in (
            (self.client, f"{p}c0", CLIENT_ADDR),
            (self.router, f"{p}r0", ROUTER_CLIENT_ADDR),
            (self.router, f"{p}r1", ROUTER_SERVER_ADDR),
            (self.server, f"{p}s0", SERVER_ADDR),
        ):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", self.client, "route", "add", "default", "via", ROUTER_CLIENT_ADDR)
        run("ip", "-n", self.server, "route", "add", "default", "via", ROUTER_SERVER_ADDR)
        run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def queue_rule(self, add: bool) -> None:
        # No --queue-bypass: fail closed, as in production (docs/data-path.md).
        run("ip", "netns", "exec", self.router, "iptables", "-A" if add else "-D", "FORWARD",
            "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUM))  # fmt: skip

    def down(self) -> None:
        for ns in (self.client, self.router, self.server):
            subprocess.run(("ip", "netns", "del", ns), capture_output=True, check=False)


@dataclass
class Variant:
    name: str
    transport: Transport | None  # None: direct, no queue
    gso: bool = False
    flush_each: bool = False  # one verdict per send(): no batching


VARIANTS = [
    Variant("direct (no queue)", None),
    Variant("netfilterqueue", Transport.NETFILTERQUEUE),
    Variant("netlink, 1 verdict/send", Transport.NETLINK, flush_each=True),
    Variant("netlink", Transport.NETLINK),
    Variant("netlink + GSO", Transport.NETLINK, gso=True),
]


class Consumer:
    """The accept-only consumer, plus loop-lag and CPU measurement around a workload."""

    def __init__(self, variant: Variant, lab: Lab) -> None:
        self.variant = variant
        self.lab = lab
        self.queue: PacketQueue | None = None
        self.bytes = 0
        self.max_lag = 0.0

    def start(self) -> None:
        variant = self.variant
        if variant.transport is None:
            return
        config = QueueConfig(QUEUE_NUM, gso=variant.gso, netns=self.lab.router)
        accept: Callable[..., None]
        if variant.flush_each:

            def on_packet(handle: Any, payload: bytes, now: float) -> None:
                accept(handle)
                flush()

        else:

            def on_packet(handle: Any, payload: bytes, now: float) -> None:
                accept(handle)

        self.queue = open_queue(config, on_packet, variant.transport)
        accept = self.queue.accept
        flush = getattr(self.queue, "flush", lambda: None)

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.close()

    async def watch_lag(self, stop: asyncio.Event) -> None:
        """Largest lateness of a 1 ms timer: how long a wake-up can hold the loop."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + 0.001
            await asyncio.sleep(0.001)
            self.max_lag = max(self.max_lag, loop.time() - due)


@dataclass
class BulkResult:
    gbits: float
    retransmits: int
    packets: int
    per_wakeup: float
    seconds: float
    cpu: float
    user_share: float  # of cpu: the rest is kernel work done in our syscalls
    max_lag: float
    queue_dropped: int
    user_dropped: int


async def measure_bulk(lab: Lab, variant: Variant, seconds: float) -> BulkResult:
    consumer = Consumer(variant, lab)
    if variant.transport is not None:
        lab.queue_rule(True)
    try:
        consumer.start()
        stop = asyncio.Event()
        lag_task = asyncio.create_task(consumer.watch_lag(stop))
        cmd = ["ip", "netns", "exec", lab.client, "iperf3", "-c", SERVER_ADDR, "-p",
               str(IPERF_PORT), "-t", str(seconds), "-J"]  # fmt: skip
        COMMANDS.append(shlex.join(cmd))
        times0 = os.times()
        wall0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        wall = time.monotonic() - wall0
        times1 = os.times()
        user = times1.user - times0.user
        system = times1.system - times0.system
        stop.set()
        await lag_task
        report = json.loads(out)
        end = report["end"]
        stats = read_queue_stats(netns=lab.router).get(QUEUE_NUM)
        counters = consumer.queue.counters() if consumer.queue else None
        packets = counters.received if counters else 0
        per_wakeup = packets / counters.wakeups if counters and counters.wakeups else 0.0
        return BulkResult(
            gbits=end["sum_received"]["bits_per_second"] / 1e9,
            retransmits=end["sum_sent"].get("retransmits", 0),
            packets=packets,
            per_wakeup=per_wakeup,
            seconds=wall,
            cpu=(user + system) / wall,
            user_share=user / (user + system) if user + system else 0.0,
            max_lag=consumer.max_lag,
            queue_dropped=stats.queue_dropped if stats else 0,
            user_dropped=stats.user_dropped if stats else 0,
        )
    finally:
        consumer.stop()
        if variant.transport is not None:
            lab.queue_rule(False)


ECHO_SERVER = f"""
import socket
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("{SERVER_ADDR}", {ECHO_PORT})); srv.listen(1)
while True:
    conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(65536)
        if not data: break
        conn.sendall(data)
    conn.close()
"""

LATENCY_CLIENT = f"""
import json, socket, sys, time
rate, count = float(sys.argv[1]), int(sys.argv[2])
for _ in range(100):
    try: conn = socket.create_connection(("{SERVER_ADDR}", {ECHO_PORT}), timeout=5); break
    except OSError: time.sleep(0.05)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
request = bytes(range({REQUEST_SIZE}))
samples = []
due = time.perf_counter()
for _ in range(count):
    start = time.perf_counter()
    conn.sendall(request)
    got = 0
    while got < {REQUEST_SIZE}:
        got += len(conn.recv(65536))
    samples.append(time.perf_counter() - start)
    due += 1.0 / rate
    pause = due - time.perf_counter()
    if pause > 0: time.sleep(pause)
print(json.dumps(samples))
"""


@dataclass
class LatencyResult:
    samples: list[float]

    @property
    def p50(self) -> float:
        return sorted(self.samples)[len(self.samples) // 2]

    @property
    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def count(self) -> int:
        return len(self.samples)


async def measure_latency(lab: Lab, variant: Variant, rate: float, count: int) -> LatencyResult:
    consumer = Consumer(variant, lab)
    if variant.transport is not None:
        lab.queue_rule(True)
    try:
        consumer.start()
        cmd = ["ip", "netns", "exec", lab.client, sys.executable, "-c", "<latency client>",
               str(rate), str(count)]  # fmt: skip
        COMMANDS.append(shlex.join(cmd))
        cmd[cmd.index("<latency client>")] = LATENCY_CLIENT
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        return LatencyResult(json.loads(out)[100:])  # the first 100 warm up the path
    finally:
        consumer.stop()
        if variant.transport is not None:
            lab.queue_rule(False)


@contextlib.contextmanager
def servers(lab: Lab) -> Iterator[None]:
    iperf_cmd = ["ip", "netns", "exec", lab.server, "iperf3", "-s", "-p", str(IPERF_PORT)]
    echo_cmd = ["ip", "netns", "exec", lab.server, sys.executable, "-c", ECHO_SERVER]
    COMMANDS.append(shlex.join(iperf_cmd))
    COMMANDS.append(shlex.join([*echo_cmd[:-1], "<echo server>"]))
    procs = [
        subprocess.Popen(iperf_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(echo_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        time.sleep(0.3)  # both listening
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def busy_fraction(seconds: float) -> float:
    """Share of all CPUs busy over ``seconds`` (/proc/stat): other people's load on the box."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


async def bench(args: argparse.Namespace, lab: Lab) -> None:
    """Rounds interleave the variants, so that load from elsewhere hits them all alike."""
    variants = [v for v in VARIANTS if not args.only or v.name in args.only]
    background = busy_fraction(1.0)
    bulk: dict[str, list[BulkResult]] = {v.name: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            result = await measure_bulk(lab, variant, args.seconds)
            print(f"  round {round_ + 1} bulk    {variant.name:26s} {result.gbits:6.2f} Gbit/s",
                  file=sys.stderr)  # fmt: skip
            bulk[variant.name].append(result)
    latency: dict[str, LatencyResult] = {}
    if not args.skip_latency:
        per_round = max(200, args.requests // args.rounds)
        for round_ in range(args.rounds):
            for variant in variants:
                lat = await measure_latency(lab, variant, args.rate, per_round)
                print(f"  round {round_ + 1} latency {variant.name:26s} p50 "
                      f"{lat.p50 * 1e6:5.0f} us", file=sys.stderr)  # fmt: skip
                latency.setdefault(variant.name, LatencyResult([])).samples.extend(lat.samples)
    report(
        args,
        background,
        # The best round of each: the one least disturbed by the rest of the machine.
        [(v, max(bulk[v.name], key=lambda r: r.gbits)) for v in variants],
        [(v, latency[v.name]) for v in variants if v.name in latency],
    )


def report(
    args: argparse.Namespace,
    background: float,
    bulk: list[tuple[Variant, BulkResult]],
    latency: list[tuple[Variant, LatencyResult]],
) -> None:
    import uvloop

    print("# NFQUEUE capture bench")
    print()
    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"host: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
        f"Python {platform.python_version()}, uvloop {uvloop.__version__}"
    )
    print(f"CPU busy before the run (other load on the machine): {background * 100:.0f}%")
    print(
        f"bulk: iperf3 {args.seconds:g} s per variant, {args.rounds} interleaved rounds, best "
        f"shown; latency: {args.requests} requests of {REQUEST_SIZE} B at {args.rate:g}/s on "
        f"one TCP connection, pooled over the rounds (first 100 of each round dropped)"
    )
    print()
    direct = next((r for v, r in bulk if v.transport is None), None)
    print("## TCP bulk (iperf3), client -> router (queue on FORWARD) -> server")
    print()
    print(
        "| variant | Gbit/s | vs direct | queue pkt/s | avg pkt B | pkt/wakeup "
        "| consumer CPU (user) | max loop lag | retrans | kernel drops q/user |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, r in bulk:
        ratio = f"{r.gbits / direct.gbits:.2f}" if direct and direct.gbits else "-"
        if variant.transport is None:
            rate = size = wakeup = cpu = lag = drops = "-"
        else:
            rate = f"{r.packets / r.seconds / 1e3:.0f}k"
            size = f"{r.gbits * 1e9 * r.seconds / 8 / r.packets:.0f}" if r.packets else "-"
            wakeup = f"{r.per_wakeup:.1f}"
            cpu = f"{r.cpu * 100:.0f}% ({r.user_share * 100:.0f}% user)"
            lag = f"{r.max_lag * 1e3:.1f} ms"
            drops = f"{r.queue_dropped}/{r.user_dropped}"
        print(
            f"| {variant.name} | {r.gbits:.2f} | {ratio} | {rate} | {size} | {wakeup} "
            f"| {cpu} | {lag} | {r.retransmits} | {drops} |"
        )
    if latency:
        print()
        print(f"## Request/response latency, {args.rate:g} req/s")
        print()
        print("| variant | p50 us | p99 us | max us | p50 vs direct | samples |")
        print("|---|---:|---:|---:|---:|---:|")
        direct_lat = next((r for v, r in latency if v.transport is None), None)
        for variant, lat in latency:
            ratio = f"{lat.p50 / direct_lat.p50:.2f}" if direct_lat else "-"
            print(f"| {variant.name} | {lat.p50 * 1e6:.0f} | {lat.p99 * 1e6:.0f} | "
                  f"{lat.max * 1e6:.0f} | {ratio} | {lat.count} |")  # fmt: skip
    print()
    print("## Commands")
    print()
    seen: set[str] = set()
    for command in COMMANDS:
        if command not in seen and ("iperf3" in command or "latency" in command
                                    or "echo" in command or "NFQUEUE" in command):  # fmt: skip
            seen.add(command)
            print(f"    {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 run length")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=3000, help="requests per variant")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--only", nargs="*", help="variant names to run")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("nfqueue_bench: needs root (network namespaces, iptables, NFQUEUE)")
    import uvloop

    lab = Lab(f"cqb{os.getpid() % 100000}")
    try:
        lab.up()
        with servers(lab):
            uvloop.run(bench(args, lab))
    finally:
        lab.down()


if __name__ == "__main__":
    main()
