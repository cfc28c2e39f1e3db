"""``coloproxy compare-pcap``: replay two captures through the comparator and report (shell)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from coloproxy.commands.subcommand import EXIT_DIVERGED, EXIT_EQUIVALENT, Subcommand, seconds
from coloproxy.pcap import LINK_TYPE_NAMES, SUPPORTED_LINK_TYPES
from coloproxy.replay import compare_captures
from coloproxy.report import format_text, to_json


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 address: {text!r}") from None


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


def _arguments(parser: argparse.ArgumentParser) -> None:
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
        type=seconds,
        metavar="SECONDS",
        help="how long a primary packet may stay unmatched (default: the comparator's, 3 s)",
    )
    parser.add_argument(
        "--link-type",
        type=_link_type,
        metavar="TYPE",
        help="read both files as this link type, whatever they say",
    )


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


COMPARE_PCAP = Subcommand(
    "compare-pcap",
    help="compare the guest output in two captures, as the live proxy would",
    description=(
        "Replay a primary and a secondary capture (pcap or pcapng; Ethernet, raw IP or"
        " Linux cooked) through the comparator. Exit 0 when equivalent, 1 when they"
        " diverge, 2 when a file cannot be used."
    ),
    add_arguments=_arguments,
    run=_compare_pcap,
)
