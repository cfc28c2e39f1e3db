"""Operator habits: SIGHUP reloads what can change live and never stops the daemon, says what
it did not change; ``--log-level``; ``coloproxy set-period``; journald-friendly lines.

The daemon here is a primary on the chardev transport with nothing connected to it (no root,
no QEMU); a FakeEngine is its checkpoint engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from coloproxy import cli
from coloproxy.commands.subcommand import EXIT_TROUBLE
from coloproxy.compare import Comparator, CompareConfig, Side
from coloproxy.compare.config import MalformedPolicy, PassthroughRule
from coloproxy.config import load_config
from coloproxy.daemon import logs
from coloproxy.daemon import reload as reloading
from coloproxy.daemon.run import Daemon
from coloproxy.errors import UsageError
from craft import udp
from engine_double import FakeEngine

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
pair: {{name: reload, role: primary}}
net:
  guest_port: rl-guest
  replication: {{local: 10.255.7.1, remote: 10.255.7.2}}
control: {{socket: {dir}/ctl.sock}}
metrics: {{enabled: false}}
engine: {{period_ms: {period}}}
compare: {{compare_timeout: {timeout}}}
log: {{level: {level}}}
chardev:
  primary_in: {{unix: {dir}/pin, server: true}}
  secondary_in: {{unix: {dir}/sin, server: false}}
  outdev: {{unix: {dir}/out, server: true}}
"""


def write(path: Path, **values: object) -> None:
    settings = {"period": 20000, "timeout": 3.0, "level": "info"} | values
    path.write_text(CONFIG.format(dir=path.parent, **settings))


# -- what may change (pure) --------------------------------------------------------------------


def test_the_plan_sorts_live_keys_from_those_that_need_a_restart(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml")
    old = load_config(tmp_path / "a.yaml")
    write(tmp_path / "a.yaml", period=5000, timeout=1.5, level="debug")
    new = load_config(tmp_path / "a.yaml")
    new = dataclasses.replace(new, pair=dataclasses.replace(new.pair, name="other"))
    plan = reloading.plan(old, new)
    assert {(c.key, c.new) for c in plan.live} == {
        ("engine.period_ms", 5000),
        ("compare.compare_timeout", 1.5),
        ("log.level", new.log.level),
    }
    assert [(c.key, c.old, c.new) for c in plan.refused] == [("pair.name", "reload", "other")]
    applied = reloading.apply(old, plan.live)
    assert (applied.engine.period_ms, applied.compare.compare_timeout) == (5000, 1.5)
    assert applied.pair.name == "reload"  # refused: the running value stays


def test_the_same_file_is_no_change(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml")
    config = load_config(tmp_path / "a.yaml")
    assert reloading.plan(config, load_config(tmp_path / "a.yaml")) == reloading.ReloadPlan((), ())


def test_the_comparator_takes_new_timeouts_and_passthrough_rules_live() -> None:
    comparator = Comparator(CompareConfig(compare_timeout=3.0, secondary_timeout=None))
    comparator.feed(Side.PRIMARY, udp(b"a", sport=1000), 10.0, "p1")
    assert comparator.get_timer() == pytest.approx(13.0)
    comparator.reconfigure(dataclasses.replace(comparator.config, compare_timeout=0.5))
    assert comparator.get_timer() == pytest.approx(10.5)
    rule = PassthroughRule(protocol="udp", peer_port=9)
    held = comparator.feed(Side.PRIMARY, udp(b"b", sport=1001, dport=9), 11.0, "p2")
    assert [type(event).__name__ for event in held] == []  # no rule yet: held
    comparator.reconfigure(dataclasses.replace(comparator.config, passthrough=(rule,)))
    released = comparator.feed(Side.PRIMARY, udp(b"c", sport=1002, dport=9), 11.0, "p3")
    assert [type(event).__name__ for event in released] == ["Release"]
    with pytest.raises(UsageError, match="max_flows cannot change while running"):
        comparator.reconfigure(dataclasses.replace(comparator.config, max_flows=10))
    comparator.reconfigure(
        dataclasses.replace(comparator.config, malformed_policy=MalformedPolicy.RELEASE)
    )


# -- the daemon --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(path: Path, log_level: str | None = None) -> AsyncIterator[Daemon]:
    daemon = Daemon(load_config(path), setup_net=False, log_level=log_level)
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + 10
    while not (path.parent / "ctl.sock").exists():
        assert time.monotonic() < deadline and not task.done(), "the daemon did not start"
        await asyncio.sleep(0.01)
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rl-") as name:  # short: unix socket paths
        yield Path(name)


@pytest.mark.asyncio
async def test_a_reload_changes_the_live_keys_and_names_the_others(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = directory / "reload.yaml"
    write(path)
    async with running(path) as daemon, FakeEngine(directory / "ctl.sock") as engine:
        await engine.wait_for(1)  # the restart request
        write(path, period=5000, timeout=0.75, level="debug")
        path.write_text(path.read_text().replace("rl-guest", "rl-other"))
        caplog.set_level(logging.INFO)
        plan = await daemon.reload()
        assert plan is not None
        assert daemon.state.comparator is not None
        assert daemon.state.comparator.config.compare_timeout == 0.75
        assert daemon.state.period_ms == 5000
        deadline = time.monotonic() + 5
        while engine.periods != [5000]:  # pushed to the engine
            assert time.monotonic() < deadline, engine.periods
            await asyncio.sleep(0.01)
        assert logging.getLogger().level == logging.DEBUG
        assert "reload: engine.period_ms 20000 -> 5000 (sent to 1 engine(s))" in caplog.text
        assert (
            "reload: net.guest_port rl-guest -> rl-other not changed: it needs a restart"
            in caplog.text
        )
        assert daemon.state.config.net.guest_port == "rl-guest"
        # Asked again, the refused key is still different and still said.
        caplog.clear()
        plan = await daemon.reload()
        assert plan is not None and not plan.live
        assert [c.key for c in plan.refused] == ["net.guest_port"]
    logging.getLogger().setLevel(logging.WARNING)


@pytest.mark.asyncio
async def test_a_file_that_does_not_load_changes_nothing(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = directory / "reload.yaml"
    write(path)
    async with running(path) as daemon:
        path.write_text(path.read_text().replace("period_ms: 20000", "period_ms: soon"))
        assert await daemon.reload() is None
        assert "period_ms': expected a positive integer of milliseconds, got 'soon'" in caplog.text
        assert "does not load; the daemon goes on unchanged" in caplog.text
        assert daemon.state.config.engine.period_ms == 20000


@pytest.mark.asyncio
async def test_log_level_from_the_command_line_wins_over_the_file(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = directory / "reload.yaml"
    write(path)
    async with running(path, log_level="warning") as daemon:
        write(path, level="debug")
        caplog.set_level(logging.INFO)
        await daemon.reload()
        assert "reload: log.level info -> debug (--log-level warning wins)" in caplog.text


@pytest.mark.asyncio
async def test_set_period_on_the_command_line_reaches_the_engine(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = directory / "reload.yaml"
    write(path)
    async with running(path), FakeEngine(directory / "ctl.sock") as engine:
        socket_path = str(directory / "ctl.sock")
        code = await asyncio.to_thread(cli.main, ["set-period", "1500", "--socket", socket_path])
        assert code == 0, capsys.readouterr().err
        assert capsys.readouterr().out == "checkpoint period 1500 ms: sent to 1 engine(s)\n"
        deadline = time.monotonic() + 5
        while engine.periods != [1500]:
            assert time.monotonic() < deadline, engine.periods
            await asyncio.sleep(0.01)
    assert cli.main(["set-period", "0"]) == EXIT_TROUBLE
    assert "not a period in milliseconds" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_set_period_without_an_engine_says_so(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = directory / "reload.yaml"
    write(path)
    async with running(path):
        socket_path = str(directory / "ctl.sock")
        code = await asyncio.to_thread(cli.main, ["set-period", "1500", "--socket", socket_path])
        assert code == EXIT_TROUBLE
        assert "no checkpoint engine connected" in capsys.readouterr().err


# -- SIGHUP, and the lines journald gets ---------------------------------------------------------


def test_sighup_reloads_and_the_daemon_goes_on_with_journal_lines(directory: Path) -> None:
    """The real command under systemd's conventions: stderr is the journal stream."""
    path = directory / "reload.yaml"
    write(path)
    log_path = directory / "stderr"
    with open(log_path, "w") as stderr:
        info = os.fstat(stderr.fileno())
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}",
        }
        argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(path), "--no-setup"]
        process = subprocess.Popen(argv, stderr=stderr, stdout=stderr, env=env)
    try:
        wait_for_text(log_path, "running: pair reload", process)
        write(path, timeout=1.25)
        path.write_text(path.read_text().replace("rl-guest", "rl-other"))
        process.send_signal(signal.SIGHUP)
        text = wait_for_text(log_path, "net.guest_port", process)
        process.send_signal(signal.SIGHUP)  # again: still there
        wait_for_text(log_path, "net.guest_port", process, count=2)
        assert process.poll() is None
        lines = text.splitlines()
        # <N>logger: message, no timestamp of our own; the priority from the level.
        assert "<6>coloproxy.daemon.run: reload: compare.compare_timeout 3.0 -> 1.25" in lines
        assert (
            "<4>coloproxy.daemon.run: reload: net.guest_port rl-guest -> rl-other not changed:"
            " it needs a restart of the daemon" in lines
        )
        assert all(line.startswith("<") for line in lines if line), text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes], count: int = 1) -> str:
    deadline = time.monotonic() + 20
    while True:
        content = path.read_text()
        if content.count(text) >= count:
            return content
        assert process.poll() is None, f"the daemon exited ({process.returncode}):\n{content}"
        assert time.monotonic() < deadline, f"no {text!r} in:\n{content}"
        time.sleep(0.05)


def test_log_level_on_the_command_line_outside_journald(directory: Path) -> None:
    path = directory / "reload.yaml"
    write(path)
    argv = [sys.executable, "-m", "coloproxy", "run", "-c", str(path), "--no-setup"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JOURNAL_STREAM", None)
    with open(directory / "stderr", "w") as stderr:
        process = subprocess.Popen([*argv, "--log-level", "warning"], stderr=stderr, env=env)
    try:
        text = wait_for_text(directory / "stderr", "holding output", process)
        assert " WARNING " in text and " INFO " not in text, text  # the file says info
        assert text.splitlines()[0][:4].isdigit()  # each line with its own time
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    done = subprocess.run(
        [*argv, "--log-level", "loud"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 2 and "invalid choice: 'loud'" in done.stderr


def test_the_journal_format_prefixes_every_line_with_its_priority() -> None:
    formatter = logs.JournalFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = formatter.format(record).splitlines()
    assert lines[0] == "<3>x.y: failed"
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert [logs.priority(level) for level in (5, 10, 20, 25, 30, 40, 50)] == [7, 7, 6, 6, 4, 3, 2]


def test_journal_stream_counts_only_for_the_stream_it_names(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        info = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert logs.to_journal(a, env)
        assert not logs.to_journal(b, env)  # stderr redirected since systemd started us
        assert not logs.to_journal(a, {})
        assert not logs.to_journal(a, {"JOURNAL_STREAM": "garbage"})
