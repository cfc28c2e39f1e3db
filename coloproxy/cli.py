"""The ``coloproxy`` command line: argparse subcommands, one function each (shell).

Exit codes follow diff(1): 0 same, 1 different, 2 trouble. Unusable input (an
:class:`~coloproxy.errors.InputError`) is one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
from collections.abc import Callable, Sequence

from coloproxy import __version__
from coloproxy.errors import InputError
from coloproxy.pcap import LINK_TYPE_NAMES, SUPPORTED_LINK_TYPES, compare_captures
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coloproxy",
        description="The network half of COLO VM fault tolerance.",
    )
    parser.add_argument("--version", action="version", version=f"coloproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_compare_pcap(commands)
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
