"""The ``coloproxy`` command line: argparse subcommands, one function each (shell).

Exit codes follow diff(1): 0 same, 1 different, 2 trouble. Unusable input (an
:class:`~coloproxy.errors.InputError`) is one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TypeVar

from coloproxy import __version__, variant
from coloproxy.config import ConfigError, LogLevel, check_files, describe, load_config
from coloproxy.control import ControlClient, ControlError, ControlRefusedError
from coloproxy.control.client import Command
from coloproxy.errors import InputError
from coloproxy.pcap import LINK_TYPE_NAMES, SUPPORTED_LINK_TYPES, compare_captures
from coloproxy.protocol import (
    Ack,
    CheckpointNow,
    ClientRole,
    Reprotect,
    SetPeriod,
    Status,
    StatusRequest,
    Welcome,
)
from coloproxy.protocol import to_json as message_json
from coloproxy.protocol.messages import REASON_PATTERN
from coloproxy.report import format_text, to_json

EXIT_EQUIVALENT = 0
EXIT_DIVERGED = 1
EXIT_TROUBLE = 2

Handler = Callable[[argparse.Namespace], int]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 address: {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _link_type(text: str) -> int:
    value = LINK_TYPE_NAMES.get(text.lower())
    if value is None and text.isdigit() and int(text) in SUPPORTED_LINK_TYPES:
        value = int(text)
    if value is None:
        names = ", ".join(LINK_TYPE_NAMES)
        raise argparse.ArgumentTypeError(
            f"unsupported link type {text!r} (one of {names}, or its number)"
        )
    return value


def _compare_pcap(args: argparse.Namespace) -> int:
    result = compare_captures(
        args.primary,
        args.secondary,
        guests=args.guest,
        compare_timeout=args.compare_timeout,
        link_type_override=args.link_type,
    )
    if args.json:
        sys.stdout.write(json.dumps(to_json(result), indent=2) + "\n")
    else:
        sys.stdout.write(format_text(result))
    return EXIT_EQUIVALENT if result.equivalent else EXIT_DIVERGED


def _add_compare_pcap(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "compare-pcap",
        help="compare the guest output in two captures, as the live proxy would",
        description=(
            "Replay a primary and a secondary capture (pcap or pcapng; Ethernet, raw IP or"
            " Linux cooked) through the comparator. Exit 0 when equivalent, 1 when they"
            " diverge, 2 when a file cannot be used."
        ),
    )
    parser.add_argument("primary", help="capture of the primary VM's output")
    parser.add_argument("secondary", help="capture of the secondary VM's output")
    parser.add_argument(
        "--guest",
        action="append",
        type=_address,
        default=[],
        metavar="ADDR",
        help="a guest address (repeatable): compare only packets from it; default: all",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--compare-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="how long a primary packet may stay unmatched (default: the comparator's, 3 s)",
    )
    parser.add_argument(
        "--link-type",
        type=_link_type,
        metavar="TYPE",
        help="read both files as this link type, whatever they say",
    )
    parser.set_defaults(handler=_compare_pcap)


# -- check-config, status, checkpoint -------------------------------------------------------

# Where status and checkpoint look without --socket or --config. A config's own default is
# /run/coloproxy/<pair>.sock: pass -c to reach a proxy started with defaults.
DEFAULT_SOCKET = "/run/coloproxy/coloproxy.sock"
T = TypeVar("T")


def _check_config(args: argparse.Namespace) -> int:
    status = EXIT_EQUIVALENT
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            status = EXIT_TROUBLE
            continue
        problems = check_files(config)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            status = EXIT_TROUBLE
        else:
            print(describe(config))
    return status


def _add_check_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "check-config",
        help="check configuration files",
        description=(
            "Read each file as the proxy would and print 'FILE: ok (pair NAME, role ROLE)',"
            " or every problem as FILE:LINE: key 'KEY': what is wrong; the key files it names"
            " must exist and be private (mode 0600). Exit 2 on a problem."
        ),
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="a configuration file")
    parser.set_defaults(handler=_check_config)


def _control_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.config:
        return str(load_config(args.config).control.socket)
    return DEFAULT_SOCKET


def _reason(text: str) -> str:
    if not REASON_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a reason token (a-z, 0-9 and '-', at most 32): {text!r}"
        )
    return text


def _talk(
    args: argparse.Namespace, exchange: Callable[[str], Coroutine[object, object, T]]
) -> T | None:
    """Run one exchange with the proxy; None (after one line on stderr) if it failed."""
    try:
        return asyncio.run(exchange(_control_socket(args)))
    except ControlRefusedError as exc:
        reply = exc.reply
        print(f"{args.command}: the proxy refused ({reply.code}): {reply.message}", file=sys.stderr)
    except ControlError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
    return None


async def _fetch_status(path: str) -> tuple[Welcome, Status]:
    client = await ControlClient.connect(
        path, ClientRole.MONITOR, name=f"coloproxy-cli {__version__}"
    )
    async with client:
        status = await client.request(StatusRequest())
        if client.welcome is None:  # connect() only returns welcomed clients
            raise ControlError("no welcome")
        return client.welcome, status


def _age(seconds: float | None, none: str) -> str:
    return none if seconds is None else f"{seconds:.3f} s"


def format_status(welcome: Welcome, status: Status) -> str:
    checkpoint = "idle"
    if status.checkpointing:
        checkpoint = "running"
    elif status.checkpoint_requested:
        checkpoint = "requested"
    rows = [
        ("epoch", str(status.epoch)),
        (
            "held packets",
            f"{status.held_packets} (oldest {_age(status.oldest_held_age, 'none')})"
            if status.held_packets
            else "0",
        ),
        ("stored bytes", str(status.stored_bytes)),
        ("flows", str(status.flows)),
        (
            "checkpoint",
            checkpoint + (" (saturated: holding everything)" if status.saturated else ""),
        ),
        ("period", "unknown" if status.period_ms is None else f"{status.period_ms} ms"),
        (
            "last checkpoint",
            "never"
            if status.last_checkpoint_age is None
            else f"{status.last_checkpoint_age:.3f} s ago",
        ),
        ("clients", f"{status.clients} ({status.engines} engines)"),
        ("uptime", f"{status.uptime:.0f} s"),
        *((name, str(value)) for name, value in sorted(status.counters.items())),
    ]
    if status.quorum is not None:
        rows.insert(0, ("quorum", status.quorum))
    head = (
        f"pair {status.pair}: {status.role}, {status.mode}"
        f"{', FENCED (holding everything)' if status.fenced else ''}"
        f" ({welcome.software}, protocol v{welcome.version})"
    )
    return "\n".join([head, *(f"{label:<20} {value}" for label, value in rows)]) + "\n"


def _status(args: argparse.Namespace) -> int:
    found = _talk(args, _fetch_status)
    if found is None:
        return EXIT_TROUBLE
    welcome, status = found
    if args.json:
        sys.stdout.write(json.dumps(message_json(status, welcome.version), indent=2) + "\n")
    else:
        sys.stdout.write(format_status(welcome, status))
    return EXIT_EQUIVALENT


def _add_socket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", metavar="PATH", help=f"the proxy's control socket (default {DEFAULT_SOCKET})"
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="take the socket from this configuration file"
    )


def _add_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "status",
        help="show a running proxy's state",
        description="Ask a running proxy for its state over the control socket. Exit 2 if"
        " it cannot be reached.",
    )
    _add_socket_options(parser)
    parser.add_argument("--json", action="store_true", help="print the status message as JSON")
    parser.set_defaults(handler=_status)


def _command(args: argparse.Namespace, message: Command) -> Ack | None:
    """Send one command to the proxy as the CLI; its ack, or None (said on stderr)."""

    async def ask(path: str) -> Ack:
        client = await ControlClient.connect(
            path, ClientRole.CLI, name=f"coloproxy-cli {__version__}"
        )
        async with client:
            return await client.request(message)

    return _talk(args, ask)


def _checkpoint(args: argparse.Namespace) -> int:
    ack = _command(args, CheckpointNow(reason=args.reason))
    if ack is None:
        return EXIT_TROUBLE
    which = f": request {ack.request}" if ack.request is not None else ""
    print(f"checkpoint requested{which}")
    return EXIT_EQUIVALENT


def _add_checkpoint(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "checkpoint",
        help="ask a running proxy for a checkpoint now",
        description="Ask a running primary proxy to have its engine checkpoint now. Exit 2 if"
        " it cannot be reached or refuses.",
    )
    _add_socket_options(parser)
    parser.add_argument(
        "--reason",
        type=_reason,
        default="manual",
        help="the reason the request carries (a token; default manual)",
    )
    parser.set_defaults(handler=_checkpoint)


def _period(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 2**32 - 1:  # QEMU's x-checkpoint-delay is a uint32 of ms
        raise argparse.ArgumentTypeError(
            f"not a period in milliseconds from 1 to 4294967295: {text!r}"
        )
    return value


def _set_period(args: argparse.Namespace) -> int:
    ack = _command(args, SetPeriod(period_ms=args.period_ms))
    if ack is None:
        return EXIT_TROUBLE
    print(f"checkpoint period {args.period_ms} ms: {ack.detail or 'set'}")
    return EXIT_EQUIVALENT


def _add_set_period(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "set-period",
        help="change the periodic checkpoint's interval of a running pair",
        description="Tell a running proxy's checkpoint engines to checkpoint every MS"
        " milliseconds from now on (until the next set-period, reload or restart: the file's"
        " engine.period_ms is not changed). Needs engine credentials (root, the daemon's"
        " user, control.engine_group). Exit 2 if the proxy cannot be reached, refuses, or"
        " has no engine connected.",
    )
    _add_socket_options(parser)
    parser.add_argument("period_ms", type=_period, metavar="MS", help="the period in ms")
    parser.set_defaults(handler=_set_period)


def _reprotect(args: argparse.Namespace) -> int:
    ack = _command(args, Reprotect(migrate_uri=args.migrate_uri))
    if ack is None:
        return EXIT_TROUBLE
    print(ack.detail or "reprotecting")
    return EXIT_EQUIVALENT


def _add_reprotect(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "reprotect",
        help="protect again after a failover: this host becomes the primary",
        description="Tell the daemon that runs the guest alone (after a failover) to protect"
        " it again: it becomes the primary of its pair, sets up host P's data path on its"
        " host and its engine migrates into the new secondary QEMU waiting on --migrate-uri"
        " (start that QEMU with -incoming and its host's daemon, role secondary, first)."
        " Exit 2 if the daemon cannot be reached or refuses. docs/operations.md.",
    )
    _add_socket_options(parser)
    parser.add_argument(
        "--migrate-uri",
        required=True,
        help="where the new secondary QEMU listens (its -incoming), e.g. tcp:10.0.0.1:7790",
    )
    parser.set_defaults(handler=_reprotect)


# -- run, teardown -----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from coloproxy.daemon.run import run  # the daemon's dependencies load only when needed

    record = Path(args.record) if args.record else None
    return run(
        load_config(args.config),
        setup_net=not args.no_setup,
        record=record,
        log_level=args.log_level,
    )


def _teardown(args: argparse.Namespace) -> int:
    from coloproxy.daemon.run import teardown

    config = load_config(args.config)
    teardown(config)
    print(f"{args.config}: host set-up of pair {config.pair.name} removed")
    return 0


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "run",
        help="run the proxy daemon of one host",
        description=(
            "Set up this host's part of the pair, then compare and release (role primary) or"
            " serve the secondary's side (role secondary) until SIGTERM. SIGHUP reads the file"
            " again and changes what can change live (docs/operations.md). The set-up stays"
            " when the daemon stops, so the host fails closed; `coloproxy teardown` removes it."
        ),
    )
    parser.add_argument("-c", "--config", required=True, metavar="FILE", help="the pair's config")
    parser.add_argument(
        "--no-setup", action="store_true", help="do not touch links, tc or rules (already set up)"
    )
    parser.add_argument(
        "--record",
        metavar="DIR",
        help="debugging: write every compared packet to DIR/primary.pcap and DIR/secondary.pcap",
    )
    parser.add_argument(
        "--log-level",
        choices=[level.value for level in LogLevel],
        help="the least severe messages logged; wins over the file's log.level, also at a"
        " reload (SIGHUP)",
    )
    parser.set_defaults(handler=_run)


def _add_teardown(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "teardown",
        help="remove this host's set-up (links, tc, rules)",
        description=(
            "Remove what `coloproxy run` set up on this host. On host P the guest's output then"
            " flows uncompared: run it only when the pair is being taken apart."
        ),
    )
    parser.add_argument("-c", "--config", required=True, metavar="FILE", help="the pair's config")
    parser.set_defaults(handler=_teardown)


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
        "--traffic", type=_seconds, default=20.0, metavar="SECONDS",
        help="client traffic before the divergence and the kill (%(default)s)",
    )  # fmt: skip
    demo.add_argument(
        "--after", type=_seconds, default=10.0, metavar="SECONDS",
        help="client traffic after the kill (%(default)s)",
    )  # fmt: skip
    parser.set_defaults(handler=_lab)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coloproxy",
        description="The network half of COLO VM fault tolerance.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"coloproxy {__version__}, {variant.describe()}",
        help="print the version and which comparator runs (compiled or pure Python), and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_compare_pcap(commands)
    _add_check_config(commands)
    _add_status(commands)
    _add_checkpoint(commands)
    _add_set_period(commands)
    _add_reprotect(commands)
    _add_run(commands)
    _add_teardown(commands)
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
