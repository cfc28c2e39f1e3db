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
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coloproxy.capture.netlink import (  # noqa: E402
    NFQA_CFG_F_GSO,
    build_config,
)
from coloproxy.capture.nfqueue import (  # noqa: E402
    NfQueue,
    PacketQueue,
    QueueConfig,
    Transport,
    open_queue,
)
from coloproxy.capture.stats import read_queue_stats  # noqa: E402

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
    note: str = ""
    nfq_gso_hack: bool = False  # set NFQA_CFG_F_GSO behind netfilterqueue's back
    flush_each: bool = False  # one verdict per send(): no batching


VARIANTS = [
    Variant("direct (no queue)", None),
    Variant("netfilterqueue", Transport.NETFILTERQUEUE),
    Variant(
        "netfilterqueue + GSO flag*",
        Transport.NETFILTERQUEUE,
        nfq_gso_hack=True,
        note="* flag set by hand; payload cut at 4016 B: not usable for comparing",
    ),
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
        if variant.nfq_gso_hack:
            assert isinstance(self.queue, NfQueue)
            message = build_config(QUEUE_NUM, flags=NFQA_CFG_F_GSO, mask=NFQA_CFG_F_GSO, ack=False)
            with socket.socket(fileno=os.dup(self.queue.fileno())) as raw:
                raw.send(message)

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
    seconds: float
    cpu: float
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
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        wall = time.monotonic() - wall0
        cpu = time.process_time() - cpu0
        stop.set()
        await lag_task
        report = json.loads(out)
        end = report["end"]
        stats = read_queue_stats(netns=lab.router).get(QUEUE_NUM)
        packets = consumer.queue.counters().received if consumer.queue else 0
        return BulkResult(
            gbits=end["sum_received"]["bits_per_second"] / 1e9,
            retransmits=end["sum_sent"].get("retransmits", 0),
            packets=packets,
            seconds=wall,
            cpu=cpu / wall,
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
    p50: float
    p99: float
    max: float
    count: int


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
        samples = sorted(json.loads(out)[100:])  # the first 100 warm up the path
        return LatencyResult(
            p50=samples[len(samples) // 2],
            p99=samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            max=samples[-1],
            count=len(samples),
        )
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


async def bench(args: argparse.Namespace, lab: Lab) -> None:
    variants = [v for v in VARIANTS if not args.only or v.name in args.only]
    bulk: list[tuple[Variant, BulkResult]] = []
    for variant in variants:
        result = await measure_bulk(lab, variant, args.seconds)
        print(f"  bulk    {variant.name:28s} {result.gbits:6.2f} Gbit/s", file=sys.stderr)
        bulk.append((variant, result))
    latency: list[tuple[Variant, LatencyResult]] = []
    if not args.skip_latency:
        for variant in variants:
            if variant.nfq_gso_hack or variant.flush_each:
                continue
            lat = await measure_latency(lab, variant, args.rate, args.requests)
            print(f"  latency {variant.name:28s} p50 {lat.p50 * 1e6:7.0f} us", file=sys.stderr)
            latency.append((variant, lat))
    report(args, bulk, latency)


def report(
    args: argparse.Namespace,
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
    print(f"iperf3 {args.seconds:g} s; latency {args.requests} requests of {REQUEST_SIZE} B at "
          f"{args.rate:g}/s on one TCP connection (first 100 dropped)")  # fmt: skip
    print()
    direct = next((r for v, r in bulk if v.transport is None), None)
    print("## TCP bulk (iperf3), client -> router (queue on FORWARD) -> server")
    print()
    print("| variant | Gbit/s | vs direct | queue pkt/s | avg pkt B | consumer CPU | "
          "max loop lag | retrans | kernel drops q/user |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, r in bulk:
        ratio = f"{r.gbits / direct.gbits:.2f}" if direct and direct.gbits else "-"
        if variant.transport is None:
            rate = size = cpu = lag = drops = "-"
        else:
            rate = f"{r.packets / r.seconds / 1e3:.0f}k"
            size = f"{r.gbits * 1e9 * r.seconds / 8 / r.packets:.0f}" if r.packets else "-"
            cpu = f"{r.cpu * 100:.0f}%"
            lag = f"{r.max_lag * 1e3:.1f} ms"
            drops = f"{r.queue_dropped}/{r.user_dropped}"
        print(f"| {variant.name} | {r.gbits:.2f} | {ratio} | {rate} | {size} | {cpu} | {lag} | "
              f"{r.retransmits} | {drops} |")  # fmt: skip
    notes = sorted({v.note for v, _ in bulk if v.note})
    for note in notes:
        print(f"\n{note}")
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
    parser.add_argument("--requests", type=int, default=3000, help="requests per latency run")
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
