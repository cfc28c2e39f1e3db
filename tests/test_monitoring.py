"""A real Prometheus scrapes real daemons; every alert and every dashboard query is evaluated
through its HTTP API (root: everything runs in a network namespace the test creates).

In host P's namespace of a test topology:

- ``nfqueue``: host P's daemon with its full set-up (links, rules, queues: the kernel's
  queue counters, the rules' watch), an engine double answering its checkpoint requests;
- ``chardev``: a primary on the chardev transport fed by the test over its unix sockets, a
  primary and a secondary datagram that differ now and then (divergences, checkpoint
  requests, releases), the engine double again;
- ``engine``: a chardev primary whose own checkpoint engine runs (its QEMU never appears:
  the engine's metric families are exported, with nothing counted);
- Prometheus (Debian's package), on loopback, scraping the three every second with
  deploy/prometheus/coloproxy-rules.yml loaded.

Every alert expression and every dashboard query must parse and evaluate; every metric they
name that a daemon here exports must return series; every rule must evaluate without an
error; and every name the daemons export must be one tests/metric_names.py knows (what the
document checks of tests/test_deploy_prometheus.py rely on).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import metric_names
from coloproxy.lab.topology import Topology
from coloproxy.net import netns
from coloproxy.protocol.colo_frames import encode_frames
from craft import udp
from netfixtures import topology_fixture
from pairworld import PRIMARY_CONFIG, Engine
from test_deploy_prometheus import DASHBOARD, RULES, alerts, dashboard_queries

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_PORT = 9090
ETH = bytes.fromhex("5254000000095254000000010800")  # peer <- guest, IPv4

CHARDEV = """\
pair: {{name: {name}, role: primary}}
net:
  guest_port: mon-guest
  replication: {{local: 127.0.0.1, remote: 127.0.0.2}}
control: {{socket: {dir}/{name}.sock}}
metrics: {{listen: "127.0.0.1:{port}"}}
compare: {{compare_timeout: 0.5}}
chardev:
  primary_in: {{unix: {dir}/{name}-pin, server: true}}
  secondary_in: {{unix: {dir}/{name}-sin, server: false}}
  outdev: {{unix: {dir}/{name}-out, server: true}}
"""
DAEMONS = {"nfqueue": 9477, "chardev": 9481, "engine": 9482}


class World:
    def __init__(self, topology: Topology, directory: Path) -> None:
        self.topology = topology
        self.directory = directory
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "wb")  # noqa: SIM115  (the child has it)
        process = self.topology.popen("hp", argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} exited:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def get(self, url: str) -> Any:
        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=10) as response:
                return bytes(response.read())

        return self.topology.run_in("hp", fetch)

    def query(self, expr: str) -> dict[str, Any]:
        """Prometheus's answer to an instant query (status error included)."""

        def ask() -> dict[str, Any]:
            data = urllib.parse.urlencode({"query": expr}).encode()
            url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query"
            try:
                with urllib.request.urlopen(url, data=data, timeout=10) as response:
                    return dict(json.loads(response.read()))
            except urllib.error.HTTPError as exc:  # 400: the expression does not parse
                return dict(json.loads(exc.read()))

        return self.topology.run_in("hp", ask)

    def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def qemu_side(directory: Path, name: str) -> Iterator[socket.socket]:
    """QEMU's end of a chardev primary: the secondary_in listener (the daemon connects)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(directory / f"{name}-sin"))
    listener.listen(1)
    try:
        yield listener
    finally:
        listener.close()


def feed(directory: Path, listener: socket.socket) -> None:
    """Datagrams on both sides, every third pair different: divergences, requests."""
    listener.settimeout(20)
    secondary, _ = listener.accept()
    primary = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outdev = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        primary.connect(str(directory / "chardev-pin"))
        outdev.connect(str(directory / "chardev-out"))
        for n in range(9):
            packet = ETH + udp(b"answer %d" % n, sport=5000 + n)
            other = packet if n % 3 else ETH + udp(b"ANSWER %d" % n, sport=5000 + n)
            primary.sendall(encode_frames([packet]))
            secondary.sendall(encode_frames([other]))
        outdev.settimeout(20)
        received = b""
        while received.count(b"answer") + received.count(b"ANSWER") < 9:
            chunk = outdev.recv(65536)
            assert chunk, "outdev closed"
            received += chunk
    finally:
        for sock in (primary, outdev, secondary):
            sock.close()


def test_prometheus_evaluates_every_alert_and_dashboard_query_on_real_daemons() -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("needs prometheus (Debian's package; scripts/setup test installs it)")
    with (
        topology_fixture() as topology,
        tempfile.TemporaryDirectory(prefix="mon-") as name,
    ):
        directory = Path(name)
        world = World(topology, directory)
        engines: list[Engine] = []
        run = [sys.executable, "-m", "coloproxy", "run", "-c"]
        nfqueue = directory / "nfqueue.yaml"
        nfqueue.write_text(
            PRIMARY_CONFIG.format(
                socket=directory / "nfqueue.sock",
                compare_timeout=3.0,
                max_held_packets=4096,
                max_held_bytes=64 << 20,
            )
        )
        try:
            with qemu_side(directory, "chardev") as listener:
                for daemon in ("chardev", "engine"):
                    text = CHARDEV.format(name=daemon, dir=directory, port=DAEMONS[daemon])
                    if daemon == "engine":
                        key = directory / "heartbeat.key"
                        key.write_bytes(os.urandom(32))
                        key.chmod(0o600)
                        text += (
                            f"engine: {{qmp: {directory}/no-qemu.sock, heartbeat_port: 9478,"
                            f" heartbeat_key: {key}}}\n"
                        )
                    (directory / f"{daemon}.yaml").write_text(text)
                world.spawn("nfqueue", [*run, str(nfqueue)])
                world.spawn("chardev", [*run, str(directory / "chardev.yaml"), "--no-setup"])
                world.spawn("engine", [*run, str(directory / "engine.yaml"), "--no-setup"])
                for daemon in ("nfqueue", "chardev"):
                    sock = directory / f"{daemon}.sock"
                    world.wait(sock.exists, f"{daemon}'s control socket")
                    engines.append(Engine(sock))
                world.wait(lambda: all(e.completed >= 1 for e in engines), "restart checkpoints")
                feed(directory, listener)
            start_prometheus(world, prometheus)
            check_everything(world)
        finally:
            for engine in engines:
                engine.close()
            world.stop()
            subprocess.run(
                topology_command(topology, [*run[:-2], "teardown", "-c", str(nfqueue)]),
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip


def topology_command(topology: Topology, argv: list[str]) -> list[str]:
    return netns.command(topology.ns("hp"), argv)


def start_prometheus(world: World, prometheus: str) -> None:
    directory = world.directory
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "coloproxy",
                "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in DAEMONS.values()]}],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    world.spawn(
        "prometheus",
        [
            prometheus,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
            "--storage.tsdb.retention.time=1h",
        ],
    )

    def ready() -> bool:
        try:
            answer = world.query('count(up{job="coloproxy"} == 1)')
        except OSError:
            return False
        result = answer.get("data", {}).get("result", [])
        return bool(result) and result[0]["value"][1] == str(len(DAEMONS))

    world.wait(ready, "Prometheus scraping the three daemons", timeout=60)

    def rated() -> bool:  # two scrapes at least, and a rule evaluation after them
        answer = world.query("count(count_over_time(coloproxy_protected[1m]) >= 4)")
        result = answer.get("data", {}).get("result", [])
        return bool(result) and result[0]["value"][1] == str(len(DAEMONS))

    world.wait(rated, "a few scrapes", timeout=60)


def exported(world: World) -> set[str]:
    """The names the three daemons export now, as Prometheus stored them."""
    answer = world.query('group by (__name__) ({job="coloproxy", __name__=~"coloproxy_.+"})')
    return {series["metric"]["__name__"] for series in answer["data"]["result"]}


def check_everything(world: World) -> None:
    live = exported(world)
    samples, histograms = metric_names.exportable()
    # The synthetic exposition the document checks use knows every live name.
    assert live <= samples, sorted(live - samples)
    for needed in (
        "coloproxy_nfqueue_packets",  # the kernel's queue counters
        "coloproxy_rules_restored_total",  # the rules' watch
        "coloproxy_divergences_total",
        "coloproxy_engine_checkpoint_pause_seconds_bucket",  # the engine's families
        "coloproxy_chardev_frames_total",
        "coloproxy_max_held_packets",
    ):
        assert needed in live, f"{needed} not exported by any daemon here: {sorted(live)}"

    def base(name: str) -> str:
        return f"{name}_bucket" if name in histograms else name

    problems: list[str] = []
    expressions = [(f"alert {rule['alert']}", str(rule["expr"])) for rule in alerts()]
    expressions += [
        (f"dashboard query {n}", query.replace("$__rate_interval", "10s").replace(
            "$instance", ".+"))
        for n, query in enumerate(dashboard_queries())
    ]  # fmt: skip
    for what, expr in expressions:
        answer = world.query(expr)
        if answer.get("status") != "success":
            problems.append(f"{what}: {answer.get('error')}: {expr}")
            continue
        names = metric_names.mentioned(expr)
        for name in names:
            if base(name) in live:
                found = world.query(base(name))["data"]["result"]
                if not found:
                    problems.append(f"{what}: {name} returns no series")
        # A query (not a condition) whose every metric is exported shows something.
        conditional = any(op in expr for op in (" > ", " < ", " == ", " and ", "absent("))
        if not conditional and names and all(base(n) in live for n in names):
            if not answer["data"]["result"]:
                problems.append(f"{what}: no series: {expr}")
    assert not problems, "\n".join(problems)

    rules = json.loads(world.get(f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/rules"))
    evaluated = [rule for group in rules["data"]["groups"] for rule in group["rules"]]
    assert len(evaluated) == len(alerts())
    for rule in evaluated:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule

    # What the daemons did is visible: the divergences the test caused, the restart requests.
    divergences = world.query('sum(coloproxy_divergences_total{job="coloproxy"})')
    assert float(divergences["data"]["result"][0]["value"][1]) >= 3
    restarts = world.query('coloproxy_checkpoint_requests_total{reason="restart"}')
    assert len(restarts["data"]["result"]) == len(DAEMONS)
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "coloproxy"
