"""Both variants of the comparator are what the suite tests: compiled here, pure in a child.

setup.py compiles the comparator with mypyc whenever a C compiler is present (scripts/setup
installs one), so the suite itself must be running compiled code: a build that silently fell
back to pure Python would otherwise pass unnoticed and ship slow. The pure variant (what runs
where no compiler is) is tested by running the comparator's test files again in a child
process with ``COLOPROXY_PURE=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coloproxy import cli, variant

ROOT = Path(__file__).resolve().parent.parent
# The tests of every module setup.py compiles: the comparator's, the framing's, the packet
# layer's, host S's rewrites, the two proxies, the netlink queue (its codec, its reader) and
# the timer pump (coloproxy/variant.py COMPILED_MODULES).
PURE_TESTS = sorted(
    str(path.relative_to(ROOT))
    for pattern in (
        "test_compare*.py",
        "test_colo_frames.py",
        "test_chardev.py",
        "test_packet_*.py",
        "test_rewrite_*.py",
        "test_daemon_primary.py",
        "test_daemon_secondary.py",
        "test_netlink_codec.py",
        "test_capture_nfqueue.py",
        "test_pump.py",
    )
    for path in (ROOT / "tests").glob(pattern)
)


def test_the_suite_runs_the_compiled_comparator_where_a_compiler_is_present() -> None:
    if variant.pure_forced():
        pytest.skip("COLOPROXY_PURE is set: this run tests the pure variant")
    if not variant.compiler_present():
        pytest.skip("no C compiler: the install is pure Python by design")
    assert variant.variant() == variant.COMPILED, (
        f"{variant.describe()}: rebuild with `pip install -e .` or scripts/build-fast "
        "(scripts/setup does it)"
    )


def test_version_names_the_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("coloproxy ")
    expected = "compiled (mypyc)" if variant.variant() == variant.COMPILED else "pure Python"
    assert f"comparator: {expected}" in out


def _child_env() -> dict[str, str]:
    env = dict(os.environ, COLOPROXY_PURE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_pure_forced_in_a_child_loads_every_module_from_source() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coloproxy", "--version"],
        env=_child_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("comparator: pure Python (COLOPROXY_PURE set)")


def test_the_comparator_tests_pass_in_the_pure_variant() -> None:
    assert len(PURE_TESTS) >= 10, PURE_TESTS
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *PURE_TESTS],
        cwd=ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert " passed" in output and " failed" not in output, output[-2000:]


def test_check_reports_a_stale_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/setup rebuilds when this says so: a source newer than its extension module."""
    if variant.variant() != variant.COMPILED:
        pytest.skip("needs the compiled build")
    source = variant.source_path("coloproxy.compare.tcp")
    extension = next(source.parent.glob("tcp.cpython-*.so"))
    copy = tmp_path / "compare"
    copy.mkdir()
    (copy / source.name).write_bytes(source.read_bytes())
    (copy / extension.name).write_bytes(extension.read_bytes())
    os.utime(copy / extension.name, (1_000_000, 1_000_000))
    monkeypatch.setattr(variant, "PACKAGE", tmp_path)
    assert variant.stale_modules() == ["coloproxy.compare.tcp"]
    assert variant.main(["--check"]) == 1
    os.utime(copy / extension.name)  # now: newer than the source
    assert variant.stale_modules() == []
    assert variant.main(["--check"]) == 0


def test_check_asks_for_a_build_where_a_compiler_is_present(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(variant, "variant", lambda: variant.PURE)
    monkeypatch.delenv("COLOPROXY_PURE", raising=False)
    monkeypatch.setattr(variant, "compiler_present", lambda: True)
    assert variant.main(["--check"]) == 1
    assert "a C compiler is present but the comparator is not compiled" in capsys.readouterr().out
    monkeypatch.setattr(variant, "compiler_present", lambda: False)
    assert variant.main(["--check"]) == 0  # no compiler: pure by design
    monkeypatch.setenv("COLOPROXY_PURE", "1")
    monkeypatch.setattr(variant, "compiler_present", lambda: True)
    assert variant.main(["--check"]) == 0  # pure on purpose


def test_a_compiler_rejecting_the_tuning_option_still_builds_the_compiled_comparator(
    tmp_path: Path,
) -> None:
    """setup.py passes GCC an inlining option; where it is refused, the build is retried
    without it rather than falling back to pure Python. Here the option is one GCC refuses."""
    if not variant.compiler_present():
        pytest.skip("no C compiler: nothing to compile")
    files = subprocess.run(
        ["git", "ls-files", "setup.py", "pyproject.toml", "coloproxy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    setup_py = tmp_path / "setup.py"
    text = setup_py.read_text()
    tuning = '_TUNING: tuple[str, ...] = ("--param=early-inlining-insns=200",)'
    assert tuning in text
    setup_py.write_text(text.replace(tuning, '_TUNING: tuple[str, ...] = ("--param=no-such=1",)'))
    env = {k: v for k, v in os.environ.items() if k != "COLOPROXY_PURE"}
    built = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,  # the asserts below say what went wrong
    )
    assert "compiling with --param=no-such=1 failed; again without it" in built.stderr
    assert "pure-Python" not in built.stderr, built.stderr[-2000:]
    described = subprocess.run(
        [sys.executable, "-c", "from coloproxy import variant; print(variant.describe())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(tmp_path)},
        check=True,
    )
    assert "compiled (mypyc)" in described.stdout
