"""A protected pair of namespace "guests": topology, both daemons, guest services, an engine.

Used by the proxy's namespace tests. Each ``PairWorld`` gets its own topology prefix, its own
control sockets in a temporary directory and cleans up everything it started, whatever the
test did. The checkpoint engine is the test double (namespaces cannot be checkpointed):
tests/engine_double.py's ``EngineThread``, on an event loop of its own in a thread and
reconnecting when the proxy restarts; it reports ``synced: false`` so the proxy keeps each
connection's ISN offset (see docs/control-protocol.md). A test that needs a checkpoint held
open uses ``world.engine.holding()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from coloproxy.control import ControlClient
from coloproxy.lab.topology import CLIENT_IPV4, GUEST_IPV4, GUEST_IPV6, Topology
from coloproxy.protocol import AttachLan, ClientRole, Failover, Mode, Status, StatusRequest
from coloproxy.role import Role
from engine_double import EngineThread

# The engine double of the namespace tests (bench/proxy_bench.py imports it by this name).
Engine = EngineThread

ROOT = Path(__file__).resolve().parent.parent
GUESTD = ROOT / "tests" / "guestd.py"
BIG = bytes((i * 131 + 7) % 251 for i in range(1 << 20))  # tests/guestd.py's /big
SPLIT_QUEUE = 7714  # host P's queues.primary_split in PRIMARY_CONFIG

PRIMARY_CONFIG = """\
pair: {{name: t1, role: primary}}
net:
  prefix: cp
  guest_port: guest0
  lan_bridge: br-lan
  replication: {{local: 10.255.77.1, remote: 10.255.77.2}}
  underlay: repl
queues: {{primary_out: 7710, secondary_out: 7711, primary_split: 7714}}
compare:
  compare_timeout: {compare_timeout}
  max_held_packets: {max_held_packets}
  max_held_bytes: {max_held_bytes}
  # MLD reports and router solicitations go out after random delays (RFC 3810, RFC 4861):
  # the two guests never send them in step. Multicast control traffic is not protected.
  passthrough: [{{protocol: icmpv6, peer_network: "ff00::/8"}}]
control: {{socket: {socket}}}
metrics: {{listen: "127.0.0.1:9477"}}
log: {{level: info}}
"""

SECONDARY_CONFIG = """\
pair: {{name: t1, role: secondary}}
net:
  prefix: cp
  guest_port: guest0
  lan_bridge: br-lan
  replication: {{local: 10.255.77.2, remote: 10.255.77.1}}
  underlay: repl
queues: {{secondary_in: 7712, secondary_egress: 7713}}
control: {{socket: {socket}}}
metrics: {{enabled: false}}
log: {{level: info}}
"""


class PairWorld:
    def __init__(self, topology: Topology, directory: Path, **compare: Any) -> None:
        self.topology = topology
        self.directory = directory
        self.primary_socket = directory / "primary.sock"
        self.secondary_socket = directory / "secondary.sock"
        settings = {
            "compare_timeout": 1.0,
            "max_held_packets": 4096,
            "max_held_bytes": 64 << 20,
        } | compare
        self.primary_config = directory / "primary.yaml"
        self.primary_config.write_text(
            PRIMARY_CONFIG.format(socket=self.primary_socket, **settings)
        )
        self.secondary_config = directory / "secondary.yaml"
        self.secondary_config.write_text(SECONDARY_CONFIG.format(socket=self.secondary_socket))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.engine: EngineThread | None = None

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, where: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        process = self.topology.popen(where, argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes[name] = process
        return process

    def start(self) -> PairWorld:
        python = sys.executable
        # Queue S-in hands the SVM the client's GSO packets cut into MTU-sized segments, the
        # PVM gets them whole; the SVM's receive-buffer accounting then shrinks its window
        # faster, and a client paced by the PVM's window overruns it (TcpExtBeyondWindow).
        # Identical, roomier buffers on both guests keep the namespace tests about the data
        # path; docs/data-path.md ("Known limits") says what it costs real VMs.
        for guest in ("pvm", "svm"):
            self.topology.exec(guest, ["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 1048576 16777216"])
        if os.environ.get("PAIRWORLD_CAPTURE"):  # debugging aid: tcpdump in both guests
            for guest in ("pvm", "svm"):
                self._spawn(f"tcpdump-{guest}", guest, ["tcpdump", "-l", "-n", "-S", "-i", "eth0"])
        self._spawn("pvm", "pvm", [python, str(GUESTD), "--variant", "primary"])
        self._spawn("svm", "svm", [python, str(GUESTD), "--variant", "secondary"])
        self._spawn(
            "secondary", "hs", [python, "-m", "coloproxy", "run", "-c", str(self.secondary_config)]
        )
        self.wait_for_socket(self.secondary_socket)
        self.start_primary()
        self.engine = EngineThread(self.primary_socket)
        self.wait_until(
            lambda: self.engine is not None and self.engine.completed >= 1,
            what="the restart checkpoint",
        )
        return self

    def start_primary(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.primary_socket.unlink()
        argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(self.primary_config)]
        if os.environ.get("PAIRWORLD_RECORD"):  # debugging aid: what the comparator saw
            argv += ["--record", str(self.directory / "record")]
        self._spawn("primary", "hp", argv)
        self.wait_for_socket(self.primary_socket)

    def kill_primary(self) -> None:
        process = self.processes.pop("primary")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def wait_for_socket(self, path: Path, timeout: float = 20.0) -> None:
        self.wait_until(path.exists, timeout, what=f"control socket {path}")

    def wait_until(self, predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(
                        f"{name} exited with {process.returncode}:\n{self.log(name)}"
                    )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    # -- what a client does ----------------------------------------------------------------

    def client(self, function: Any, *args: Any) -> Any:
        return self.topology.run_in("client", function, *args)

    def status(self, host: str = "primary") -> Status:
        """The status of host P's daemon, or with ``host="secondary"`` host S's."""
        socket = self.primary_socket if host == "primary" else self.secondary_socket

        async def ask() -> Status:
            client = await ControlClient.connect(socket, ClientRole.MONITOR, name="test")
            try:
                return await client.request(StatusRequest())
            finally:
                await client.close()

        return asyncio.run(ask())

    def cut_off_primary(self) -> None:
        """Host P dies: its daemon is killed and the PVM's port leaves the LAN (the client's
        frames reach neither the PVM nor, through host P's mirror, the SVM)."""
        self.kill_primary()
        self.topology.exec("hp", ["ip", "link", "set", "guest0", "nomaster"])

    def take_over(self) -> None:
        """Host P dies and host S takes over, the way the engines do it (docs/engine.md)
        without QEMU: host P's daemon is killed and its PVM cut off the LAN; host S's
        proxy is told first, then its daemon moves the SVM's port into the LAN and replays
        the client SYNs of connections half-open on the SVM (``attach-lan``: the same code
        the engine runs as its ``attach_lan``), then the SVM announces itself (a datagram to
        the client stands in for QEMU's announce-self: the LAN bridge learns where the
        guest's MAC is now)."""
        if "primary" in self.processes:
            self.cut_off_primary()

        async def tell() -> None:
            client = await ControlClient.connect(self.secondary_socket, ClientRole.ENGINE)
            try:
                await client.request(Failover(Role.PRIMARY, Mode.UNPROTECTED, "test"))
                await client.request(AttachLan())
            finally:
                await client.close()

        asyncio.run(tell())

        def announce() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"announce", (CLIENT_IPV4, 9))

        self.topology.run_in("svm", announce)

    def diagnose(self) -> str:
        """What to print when a test fails: the kernel's queue counters and our drop counts."""
        lines = [self.topology.exec("hp", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout]
        try:
            lines += [
                line
                for line in self.scrape().splitlines()
                if not line.startswith("#")
                and any(
                    word in line
                    for word in ("malformed", "nfqueue", "divergences", "packets_total")
                )
            ]
        except OSError as exc:
            lines.append(f"(no metrics: {exc})")
        lines.append(self.log("primary"))
        return "\n".join(lines)

    def scrape(self) -> str:
        def fetch() -> str:
            with urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=5) as response:
                return response.read().decode()

        return str(self.topology.run_in("hp", fetch))


def http_get(
    path: str, family: int = socket.AF_INET, timeout: float = 10.0
) -> tuple[int, bytes, int]:
    """GET over a fresh connection from the client namespace: (status, body, local port)."""
    host = GUEST_IPV4 if family == socket.AF_INET else GUEST_IPV6
    connection = http.client.HTTPConnection(host, 80, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        port = connection.sock.getsockname()[1] if connection.sock else 0
        return response.status, response.read(), port
    finally:
        connection.close()


def http_post(path: str, body: bytes, timeout: float = 10.0) -> bytes:
    connection = http.client.HTTPConnection(GUEST_IPV4, 80, timeout=timeout)
    try:
        connection.request("POST", path, body=body)
        return connection.getresponse().read()
    finally:
        connection.close()


def arriving(sock: socket.socket, seconds: float) -> bytes:
    """Whatever reaches ``sock`` in the next ``seconds`` (watched the whole time, to its end
    or until the peer closes): a test that output is held reads b"" here."""
    deadline = time.monotonic() + seconds
    chunks = []
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def receive_exactly(sock: socket.socket, size: int, timeout: float = 10.0) -> bytes:
    """``size`` bytes from ``sock`` (bounded); fewer only if the peer closes first."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    received = 0
    while received < size and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        data = sock.recv(size - received)
        if not data:
            break
        chunks.append(data)
        received += len(data)
    return b"".join(chunks)


def sha256_line(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode() + b"\n"


def udp_echo(message: bytes, family: int, timeout: float = 5.0) -> bytes:
    host = GUEST_IPV4 if family == socket.AF_INET else GUEST_IPV6
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(message, (host, 7))
        return sock.recvfrom(65536)[0]


def tcp_echo(message: bytes, family: int, timeout: float = 5.0) -> bytes:
    host = GUEST_IPV4 if family == socket.AF_INET else GUEST_IPV6
    with socket.create_connection((host, 7), timeout=timeout) as sock:
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


__all__ = [
    "BIG",
    "SPLIT_QUEUE",
    "Engine",
    "PairWorld",
    "arriving",
    "http_get",
    "http_post",
    "os",
    "receive_exactly",
    "sha256_line",
    "tcp_echo",
    "udp_echo",
]
