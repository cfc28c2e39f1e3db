"""The production install on a plain Debian 12 and 13 (scripts/check-debian-install).

A minimal Debian chroot from the Debian archive, this checkout copied in, ``scripts/setup
daemon`` run there with Debian's own externally managed python3; then ``coloproxy
--version``, ``coloproxy check-config`` and the rest of what the script checks. About a
minute and a half per release on this kind of machine; needs root, mmdebstrap and the
network (deb.debian.org, pypi.org).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from coloproxy import cli
from coloproxy.commands.subcommand import EXIT_TROUBLE

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check-debian-install"


@pytest.mark.debian
@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_daemon_installs_on_plain_debian(suite: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds a chroot")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("needs mmdebstrap (scripts/setup test installs it)")
    done = subprocess.run(
        [str(SCRIPT), suite],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    # What the operator sees, checked here too so that a script that checks nothing fails.
    assert "configs/pair-primary.yaml: ok (pair web1, role primary)" in output
    assert "the venv's interpreter is /usr/bin/python3" in output
    assert "comparator: compiled (mypyc)" in output  # built from PyPI's mypy and Debian's gcc
    assert "coloproxy lab demo: exit 2: lab: needs coloproxy's source tree" in output
    assert f"check-debian-install: {suite}: passed" in output


def test_lab_without_the_source_tree_says_what_it_needs_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An installed wheel: the package without qemu/ and guest/ beside it.
    monkeypatch.setattr("coloproxy.lab.qemu.repo_root", lambda: tmp_path)
    assert cli.main(["lab", "demo"]) == EXIT_TROUBLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs coloproxy's source tree" in err, err
