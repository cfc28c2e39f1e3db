"""systemd's notifications from the real daemon: READY=1 once its sockets are in place, the
watchdog petted from the event loop, STOPPING=1 at SIGTERM; and, as root, the daemon setting
up both hosts of a pair as an unprivileged user with only the two capabilities the unit
gives it (deploy/systemd/coloproxy@.service).

The test plays systemd: it binds the notification socket and passes ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloproxy.daemon.notify import Notifier
from coloproxy.lab.topology import Topology
from coloproxy.net import netns
from netfixtures import topology_fixture
from pairworld import PRIMARY_CONFIG, SECONDARY_CONFIG, SPLIT_QUEUE

ROOT = Path(__file__).resolve().parent.parent

CHARDEV_CONFIG = """\
pair: {{name: notify, role: primary}}
net:
  guest_port: nt-guest
  replication: {{local: 10.255.6.1, remote: 10.255.6.2}}
control: {{socket: {dir}/ctl.sock}}
metrics: {{enabled: false}}
chardev:
  primary_in: {{unix: {dir}/pin, server: true}}
  secondary_in: {{unix: {dir}/sin, server: false}}
  outdev: {{unix: {dir}/out, server: true}}
"""


class FakeSystemd:
    """The notification socket of a service manager: what the daemon sent, in order."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        os.chmod(self.path, 0o777)  # an unprivileged daemon sends here too
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(4096)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(message)
        return message

    def wait_for(
        self, key: str, process: subprocess.Popen[bytes], timeout: float = 30.0
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(0.1)
            if message is not None and key in message:
                return message
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"the daemon exited ({process.returncode}):\n{output}")
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.socket.close()


@contextlib.contextmanager
def daemon_process(
    argv: list[str], env: dict[str, str], **kwargs: object
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,  # type: ignore[call-overload]
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def _env(systemd: FakeSystemd, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NOTIFY_SOCKET": str(systemd.path),
        **extra,
    }


# -- the notifier ------------------------------------------------------------------------------


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")


def test_the_variables_are_read_once_and_removed_for_the_commands_the_daemon_runs() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environment(env)
    assert env == {}
    assert notifier.enabled
    assert notifier.watchdog_interval == 4.0


def test_a_watchdog_meant_for_another_process_is_not_ours() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environment(env).watchdog_interval is None


def test_an_abstract_socket_address_gets_the_message() -> None:
    name = f"coloproxy-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    try:
        notifier = Notifier("@" + name)
        assert notifier.ready("pair x")
        receiver.settimeout(5)
        assert receiver.recv(4096) == b"READY=1\nSTATUS=pair x\n"
        notifier.close()
    finally:
        receiver.close()


def test_a_socket_that_went_away_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert not notifier.watchdog()
    assert not notifier.watchdog()
    notifier.close()


# -- the daemon --------------------------------------------------------------------------------


def test_ready_after_the_control_socket_then_the_watchdog_then_stopping() -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        config = directory / "chardev.yaml"
        config.write_text(CHARDEV_CONFIG.format(dir=directory))
        systemd = FakeSystemd(directory)
        argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(config), "--no-setup"]
        env = _env(systemd, WATCHDOG_USEC="200000")
        try:
            with daemon_process(argv, env) as process:
                ready = systemd.wait_for("READY", process)
                assert ready["READY"] == "1"
                assert ready["STATUS"] == "pair notify: primary, protected"
                # Everything a client or QEMU connects to exists when systemd hears READY.
                for socket_name in ("ctl.sock", "pin", "out"):
                    assert (directory / socket_name).exists(), socket_name
                before = [m for m in systemd.messages if "WATCHDOG" in m]
                for _ in range(3):  # every 0.1 s: half of WATCHDOG_USEC
                    systemd.wait_for("WATCHDOG", process, timeout=5)
                assert len([m for m in systemd.messages if "WATCHDOG" in m]) >= len(before) + 3
                process.send_signal(signal.SIGTERM)
                systemd.wait_for("STOPPING", process, timeout=10)
                assert process.wait(timeout=10) == 0
        finally:
            systemd.close()


def test_without_watchdog_usec_no_watchdog_messages() -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        config = directory / "chardev.yaml"
        config.write_text(CHARDEV_CONFIG.format(dir=directory))
        systemd = FakeSystemd(directory)
        argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(config), "--no-setup"]
        try:
            with daemon_process(argv, _env(systemd)) as process:
                systemd.wait_for("READY", process)
                process.send_signal(signal.SIGTERM)
                systemd.wait_for("STOPPING", process, timeout=10)
                assert process.wait(timeout=10) == 0
            assert not [m for m in systemd.messages if "WATCHDOG" in m], systemd.messages
        finally:
            systemd.close()


# -- as the unit runs it: an unprivileged user with CAP_NET_ADMIN and CAP_NET_RAW --------------

CAPABILITIES = "net_admin,net_raw"  # CapabilityBoundingSet= and AmbientCapabilities= of the unit


def _limited(argv: list[str], capabilities: str | None, user: bool = True) -> list[str]:
    """``argv`` with only ``capabilities`` (none: no capability at all), as the user nobody,
    or with ``user`` False as uid 0 (root's files stay readable, its capabilities do not)."""
    caps = f"-all,+{capabilities.replace(',', ',+')}" if capabilities else "-all"
    who = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"] if user else []
    return [
        "setpriv", *who,
        f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}",
        "--no-new-privs", "--", *argv,
    ]  # fmt: skip


def _in(topology: Topology, host: str, argv: list[str]) -> list[str]:
    return netns.command(topology.ns(host), argv)


def _queues_bound(topology: Topology, host: str) -> set[int]:
    text = topology.exec(host, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return {int(line.split()[0]) for line in text.splitlines() if line.strip()}


@pytest.mark.root
def test_both_hosts_set_up_as_an_unprivileged_user_with_two_capabilities() -> None:
    """The unit's claim: User=coloproxy with CAP_NET_ADMIN and CAP_NET_RAW is enough for
    links, VXLAN, tc, rules, sysctls and queues on both hosts; with neither it is not."""
    # As nobody when the interpreter and this checkout are readable by it; else (a checkout
    # or an interpreter under /root) as uid 0 with the same two capabilities only. The unit's
    # own user is tried under a real systemd by scripts/check-systemd-unit.
    probe = subprocess.run(
        _limited([sys.executable, "-c", "import pyroute2, coloproxy.daemon.run"], None),
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, check=False,
        cwd="/",
    )  # fmt: skip
    as_nobody = probe.returncode == 0
    with topology_fixture() as topology, tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        if as_nobody:  # the daemon's control socket goes here
            nobody = pwd.getpwnam("nobody")
            os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        directory.chmod(0o755)
        configs = {}
        for role, template in (("secondary", SECONDARY_CONFIG), ("primary", PRIMARY_CONFIG)):
            path = directory / f"{role}.yaml"
            path.write_text(
                template.format(
                    socket=directory / f"{role}.sock",
                    compare_timeout=3.0,
                    max_held_packets=4096,
                    max_held_bytes=64 << 20,
                )
            )
            configs[role] = path
        systemd = FakeSystemd(directory)
        run = [sys.executable, "-m", "coloproxy", "run", "-c"]
        try:
            # Without the capabilities the set-up fails at once.
            denied = subprocess.run(
                _in(topology, "hs", _limited([*run, str(configs["secondary"])], None, as_nobody)),
                env=_env(systemd), capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert denied.returncode != 0, denied.stdout + denied.stderr
            with contextlib.ExitStack() as stack:
                for role, host in (("secondary", "hs"), ("primary", "hp")):
                    argv = _limited([*run, str(configs[role])], CAPABILITIES, as_nobody)
                    process = stack.enter_context(
                        daemon_process(_in(topology, host, argv), _env(systemd))
                    )
                    systemd.wait_for("READY", process)
                    save = topology.exec(host, ["iptables-save", "-t", "filter"]).stdout
                    assert ":CP-T1 " in save and "-A FORWARD -j CP-T1" in save, save
                    wanted = {7712, 7713} if role == "secondary" else {7710, 7711, SPLIT_QUEUE}
                    assert wanted <= _queues_bound(topology, host)
                    assert (directory / f"{role}.sock").exists()
        finally:
            systemd.close()
            for role, host in (("primary", "hp"), ("secondary", "hs")):
                if role in configs:
                    teardown = [sys.executable, "-m", "coloproxy", "teardown", "-c"]
                    subprocess.run(
                        _in(topology, host, [*teardown, str(configs[role])]),
                        env={**os.environ, "PYTHONPATH": str(ROOT)},
                        capture_output=True, timeout=60, check=False,
                    )  # fmt: skip
