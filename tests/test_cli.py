"""The command line is built from its table of subcommands (coloproxy/cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coloproxy import __version__, variant
from coloproxy.cli import SUBCOMMANDS, build_parser, main
from coloproxy.commands.subcommand import EXIT_TROUBLE


def test_every_subcommand_is_listed_in_order_with_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"\n    {sub.name}") for sub in SUBCOMMANDS]
    assert positions == sorted(positions)
    assert out.index("\n    lab ") > positions[-1]  # the lab comes last
    flowing = " ".join(out.split())  # argparse wraps long help lines
    for sub in SUBCOMMANDS:
        assert f"{sub.name} {sub.help}" in flowing


def test_each_subcommand_runs_its_own_handler() -> None:
    parser = build_parser()
    minimal = {
        "compare-pcap": ["a.pcap", "b.pcap"],
        "check-config": ["x.yaml"],
        "set-period": ["100"],
        "reprotect": ["--migrate-uri", "tcp:10.0.0.1:7790"],
        "run": ["-c", "x.yaml"],
        "teardown": ["-c", "x.yaml"],
    }
    assert {sub.name for sub in SUBCOMMANDS} >= minimal.keys()
    for sub in SUBCOMMANDS:
        args = parser.parse_args([sub.name, *minimal.get(sub.name, [])])
        assert args.command == sub.name
        assert args.handler is sub.run


def test_an_unreachable_proxy_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--socket", f"{tmp_path}/none.sock"]) == EXIT_TROUBLE
    err = capsys.readouterr().err
    assert err.startswith("status: cannot connect to ")
    assert err.count("\n") == 1


def test_the_version_is_one_line_on_a_narrow_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse's version action wraps its text to the terminal: the pure build's line (the
    # longer one) came out cut in two under COLUMNS=40.
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"coloproxy {__version__}, {variant.describe()}\n"
