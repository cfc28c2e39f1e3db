"""The daemon notices its NFQUEUE rules removed behind its back and puts them back (root).

Host P's daemon runs in its namespace with ``net.rules_check_ms: 100``; the test plays the
other firewall manager with iptables and ip6tables. Restored, logged, counted in
``coloproxy_rules_restored_total``, and a checkpoint asked for (``rules-restored``): output
went out uncompared meanwhile.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from coloproxy.lab.topology import Topology
from netfixtures import topology_fixture
from pairworld import PRIMARY_CONFIG, Engine

pytestmark = pytest.mark.root


def metrics(topology: Topology) -> str:
    def fetch() -> str:
        with urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=5) as response:
            return str(response.read().decode())

    return topology.run_in("hp", fetch)


def wait(predicate: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not predicate():
        assert process.poll() is None, f"the daemon exited ({process.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def jumps(topology: Topology, command: str = "iptables-save") -> int:
    return topology.exec("hp", [command, "-t", "filter"]).stdout.count("-A FORWARD -j CP-T1")


def test_removed_rules_are_restored_counted_and_followed_by_a_checkpoint() -> None:
    with topology_fixture() as topology, tempfile.TemporaryDirectory(prefix="rw-") as name:
        directory = Path(name)
        config = directory / "primary.yaml"
        text = PRIMARY_CONFIG.format(
            socket=directory / "ctl.sock",
            compare_timeout=3.0,
            max_held_packets=4096,
            max_held_bytes=64 << 20,
        ).replace("  underlay: repl\n", "  underlay: repl\n  rules_check_ms: 100\n")
        config.write_text(text)
        log = open(directory / "log", "wb")  # noqa: SIM115  (closed below)
        process = topology.popen(
            "hp",
            [sys.executable, "-m", "coloproxy", "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        engine: Engine | None = None
        try:
            wait((directory / "ctl.sock").exists, "the control socket", process)
            engine = Engine(directory / "ctl.sock")
            wait(lambda: engine is not None and engine.completed >= 1, "the restart", process)
            assert jumps(topology) == 1

            # Another firewall manager deletes the jump: nothing is queued any more.
            topology.exec("hp", ["iptables", "-D", "FORWARD", "-j", "CP-T1"])
            wait(lambda: jumps(topology) == 1, "the jump back", process)
            wait(lambda: "rules-restored" in engine.reasons(), "a checkpoint", process)
            assert 'coloproxy_rules_restored_total{family="ipv4"} 1.0' in metrics(topology)

            # ... or flushes the chain, in IPv6 this time.
            topology.exec("hp", ["ip6tables", "-F", "CP-T1"])
            wait(
                lambda: 'coloproxy_rules_restored_total{family="ipv6"} 1.0' in metrics(topology),
                "the IPv6 rules back",
                process,
            )
            save = topology.exec("hp", ["ip6tables-save", "-t", "filter"]).stdout
            assert "-j NFQUEUE --queue-num 7710" in save and "--queue-num 7711" in save
            assert jumps(topology, "ip6tables-save") == 1
            assert 'coloproxy_rules_restored_total{family="ipv4"} 1.0' in metrics(topology)
            assert "coloproxy_rules_check_failures_total 0.0" in metrics(topology)
            text = (directory / "log").read_text()
            assert "were changed behind our back (ipv4: no jump from FORWARD to CP-T1)" in text
            assert "(ipv6: CP-T1 holds 0 of our 3 rules)" in text
        finally:
            if engine is not None:
                engine.close()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
            log.close()
            topology.exec(
                "hp",
                [sys.executable, "-m", "coloproxy", "teardown", "-c", str(config)],
                check=False,
            )
