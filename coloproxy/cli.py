"""The ``coloproxy`` command line: the parser built from the subcommands' table, and the
entry point that runs one (shell).

Each subcommand lives in a module of :mod:`coloproxy.commands` named for it (the lab's is
below). Exit codes follow diff(1): 0 same, 1 different, 2 trouble. Unusable input (an
:class:`~coloproxy.errors.InputError`) is one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from coloproxy import __version__, variant
from coloproxy.commands.check_config import CHECK_CONFIG
from coloproxy.commands.compare_pcap import COMPARE_PCAP
from coloproxy.commands.control import CHECKPOINT, REPROTECT, SET_PERIOD, STATUS
from coloproxy.commands.daemon import RUN, TEARDOWN
from coloproxy.commands.subcommand import (
    EXIT_DIVERGED,
    EXIT_EQUIVALENT,
    EXIT_TROUBLE,
    Handler,
    Subcommand,
    seconds,
)
from coloproxy.errors import InputError

# In the order `coloproxy --help` lists them (the lab last).
SUBCOMMANDS: Final[tuple[Subcommand, ...]] = (
    COMPARE_PCAP,
    CHECK_CONFIG,
    STATUS,
    CHECKPOINT,
    SET_PERIOD,
    REPROTECT,
    RUN,
    TEARDOWN,
)


# -- lab -----------------------------------------------------------------------------------------


def _lab(args: argparse.Namespace) -> int:
    import os

    from coloproxy.errors import ColoproxyError
    from coloproxy.lab.demo import demo, format_summary
    from coloproxy.lab.lab import Lab, running_lab
    from coloproxy.lab.qemu import repo_root

    if not (repo_root() / "qemu" / "build.sh").is_file():
        # An installed wheel has the Python package only; the lab builds its QEMU and guest
        # with the scripts of the source tree.
        print(
            "lab: needs coloproxy's source tree (its qemu/ and guest/ build scripts are not"
            " installed with the package): run it from a clone after `./scripts/setup lab`",
            file=sys.stderr,
        )
        return EXIT_TROUBLE
    if os.geteuid() != 0:
        print("lab: run as root (namespaces, QEMU, NFQUEUE)", file=sys.stderr)
        return EXIT_TROUBLE
    lab = Lab(
        args.prefix,
        Path(args.run_dir),
        qemu_filters=getattr(args, "qemu_filters", False),
        chardev=getattr(args, "chardev", False),
        two_host=getattr(args, "two_host", False),
        disk=not getattr(args, "no_disk", False),
    )
    try:
        if args.lab_command == "up":
            lab.up()
            print(f"lab up; `coloproxy lab down` ends it (state in {lab.paths.state})")
        elif args.lab_command == "partition":
            print(lab.partition(args.name, freeze=args.freeze))
        elif args.lab_command == "heal":
            print(lab.heal())
        elif args.lab_command == "down":
            lab.down()
            print("lab down")
        elif args.lab_command == "reprotect":
            took = lab.reprotect()
            print(f"lab protected again in {took:.1f} s: host S primary, host P secondary")
        else:
            with running_lab(lab, keep=args.keep):
                result = demo(lab, traffic_s=args.traffic, after_failover_s=args.after)
                sys.stdout.write(format_summary(result, lab))
            return EXIT_EQUIVALENT if result.ok else EXIT_DIVERGED
    except ColoproxyError as exc:  # what did not happen in time, a missing build, the network
        print(f"lab {args.lab_command}: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    return EXIT_EQUIVALENT


def _add_lab(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from coloproxy.lab.configs import DEFAULT_RUN_DIR
    from coloproxy.lab.lab import DEFAULT_PREFIX

    parser = commands.add_parser(
        "lab",
        help="a protected VM pair serving a client, on this machine (namespaces, QEMU)",
        description=(
            "Hosts as network namespaces, a real COLO VM pair under QEMU, coloproxy between"
            " them and a client (docs/lab.md). As root."
        ),
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace prefix (%(default)s)")
    parser.add_argument(
        "--run-dir", default=str(DEFAULT_RUN_DIR), help="sockets, logs, state (%(default)s)"
    )
    actions = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    up = actions.add_parser(
        "up", help="build what is missing, start the pair, wait until it serves the client"
    )
    up.add_argument(
        "--qemu-filters",
        action="store_true",
        help="wire the pair with QEMU's colo-compare and filters instead of coloproxy",
    )
    up.add_argument(
        "--chardev",
        action="store_true",
        help="QEMU's filters, with coloproxy's chardev transport in place of colo-compare",
    )
    up.add_argument(
        "--two-host",
        action="store_true",
        help="no witness and no etcd: the two-host mode, for labs only (split brain possible)",
    )
    up.add_argument(
        "--no-disk",
        action="store_true",
        help="a diskless guest: no block replication (the default gives it a replicated disk)",
    )
    actions.add_parser("down", help="stop everything the lab started, delete its namespaces")
    from coloproxy.lab.partition import CUTS

    cut = actions.add_parser(
        "partition",
        help="cut a link silently: " + ", ".join(CUTS) + " (docs/lab.md, partitions)",
    )
    cut.add_argument("name", choices=sorted(CUTS), help="what to cut")
    cut.add_argument(
        "--freeze", action="store_true", help="also stop (SIGSTOP) every process of that host"
    )
    actions.add_parser("heal", help="remove every cut, resume every frozen process")
    actions.add_parser(
        "reprotect",
        help="after host P's QEMU died: a new secondary on host P, host S the primary, COLO",
    )
    demo = actions.add_parser(
        "demo", help="up, client traffic, a divergence, SIGKILL of the primary, summary, down"
    )
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    demo.add_argument(
        "--qemu-filters", action="store_true", help="the same with QEMU's own colo-compare"
    )
    demo.add_argument(
        "--chardev",
        action="store_true",
        help="the same with QEMU's filters and coloproxy's chardev transport",
    )
    demo.add_argument(
        "--two-host", action="store_true", help="the same without the quorum (labs only)"
    )
    demo.add_argument("--no-disk", action="store_true", help="the same with a diskless guest")
    demo.add_argument(
        "--traffic", type=seconds, default=20.0, metavar="SECONDS",
        help="client traffic before the divergence and the kill (%(default)s)",
    )  # fmt: skip
    demo.add_argument(
        "--after", type=seconds, default=10.0, metavar="SECONDS",
        help="client traffic after the kill (%(default)s)",
    )  # fmt: skip
    parser.set_defaults(handler=_lab)


class _Version(argparse.Action):
    """``--version``: one line as it is (argparse's own version action wraps it to the
    terminal, cutting the pure build's longer line in two)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"coloproxy {__version__}, {variant.describe()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coloproxy",
        description="The network half of COLO VM fault tolerance.",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        help="print the version and which comparator runs (compiled or pure Python), and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        sub = commands.add_parser(
            subcommand.name, help=subcommand.help, description=subcommand.description
        )
        subcommand.add_arguments(sub)
        sub.set_defaults(handler=subcommand.run)
    _add_lab(commands)
    return parser


def _exit_code(code: object) -> int:
    """What a SystemExit from argparse means as a return value."""
    if code is None:
        return 0
    return code if isinstance(code, int) else EXIT_TROUBLE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed
        return _exit_code(exc.code)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("coloproxy: error: a command is required", file=sys.stderr)
        return EXIT_TROUBLE
    handler: Handler = args.handler
    try:
        return handler(args)
    except InputError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    except BrokenPipeError:
        # The reader of our output went away (`| head`): not worth a traceback.
        return EXIT_TROUBLE
