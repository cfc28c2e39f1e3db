"""``coloproxy status``, ``checkpoint``, ``set-period`` and ``reprotect``: a running proxy,
asked over its control socket (shell).

Each connects (as ``monitor`` for status, ``cli`` for the others), sends one request, prints
the answer and exits 0; a proxy that cannot be reached or refuses is one line on stderr and
exit 2 (:func:`_talk`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Final, TypeVar

from coloproxy import __version__
from coloproxy.commands.subcommand import EXIT_EQUIVALENT, EXIT_TROUBLE, Subcommand
from coloproxy.config import load_config
from coloproxy.control import ControlClient, ControlError, ControlRefusedError
from coloproxy.protocol import (
    Ack,
    CheckpointNow,
    ClientRole,
    Command,
    Reprotect,
    SetPeriod,
    Status,
    StatusRequest,
    Welcome,
    to_json,
)
from coloproxy.protocol.messages import REASON_PATTERN

# Where these commands look without --socket or --config. A config's own default is
# /run/coloproxy/<pair>.sock: pass -c to reach a proxy started with defaults.
DEFAULT_SOCKET: Final = "/run/coloproxy/coloproxy.sock"
CLIENT_NAME: Final = f"coloproxy-cli {__version__}"
T = TypeVar("T")


# -- arguments -------------------------------------------------------------------------------


def _socket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", metavar="PATH", help=f"the proxy's control socket (default {DEFAULT_SOCKET})"
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="take the socket from this configuration file"
    )


def _reason(text: str) -> str:
    if not REASON_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a reason token (a-z, 0-9 and '-', at most 32): {text!r}"
        )
    return text


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


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _socket_options(parser)
    parser.add_argument("--json", action="store_true", help="print the status message as JSON")


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    _socket_options(parser)
    parser.add_argument(
        "--reason",
        type=_reason,
        default="manual",
        help="the reason the request carries (a token; default manual)",
    )


def _set_period_arguments(parser: argparse.ArgumentParser) -> None:
    _socket_options(parser)
    parser.add_argument("period_ms", type=_period, metavar="MS", help="the period in ms")


def _reprotect_arguments(parser: argparse.ArgumentParser) -> None:
    _socket_options(parser)
    parser.add_argument(
        "--migrate-uri",
        required=True,
        help="where the new secondary QEMU listens (its -incoming), e.g. tcp:10.0.0.1:7790",
    )


# -- talking to the proxy --------------------------------------------------------------------


def _control_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.config:
        return str(load_config(args.config).control.socket)
    return DEFAULT_SOCKET


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
    client = await ControlClient.connect(path, ClientRole.MONITOR, name=CLIENT_NAME)
    async with client:
        status = await client.request(StatusRequest())
        if client.welcome is None:  # connect() only returns welcomed clients
            raise ControlError("no welcome")
        return client.welcome, status


def _command(args: argparse.Namespace, message: Command, said: Callable[[Ack], str]) -> int:
    """Send one command to the proxy as the CLI and print what ``said`` makes of its ack."""

    async def ask(path: str) -> Ack:
        client = await ControlClient.connect(path, ClientRole.CLI, name=CLIENT_NAME)
        async with client:
            return await client.request(message)

    ack = _talk(args, ask)
    if ack is None:
        return EXIT_TROUBLE
    print(said(ack))
    return EXIT_EQUIVALENT


# -- status ----------------------------------------------------------------------------------


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
        sys.stdout.write(json.dumps(to_json(status, welcome.version), indent=2) + "\n")
    else:
        sys.stdout.write(format_status(welcome, status))
    return EXIT_EQUIVALENT


# -- commands --------------------------------------------------------------------------------


def _checkpoint(args: argparse.Namespace) -> int:
    def said(ack: Ack) -> str:
        which = f": request {ack.request}" if ack.request is not None else ""
        return f"checkpoint requested{which}"

    return _command(args, CheckpointNow(reason=args.reason), said)


def _set_period(args: argparse.Namespace) -> int:
    return _command(
        args,
        SetPeriod(period_ms=args.period_ms),
        lambda ack: f"checkpoint period {args.period_ms} ms: {ack.detail or 'set'}",
    )


def _reprotect(args: argparse.Namespace) -> int:
    return _command(
        args, Reprotect(migrate_uri=args.migrate_uri), lambda ack: ack.detail or "reprotecting"
    )


STATUS = Subcommand(
    "status",
    help="show a running proxy's state",
    description="Ask a running proxy for its state over the control socket. Exit 2 if"
    " it cannot be reached.",
    add_arguments=_status_arguments,
    run=_status,
)

CHECKPOINT = Subcommand(
    "checkpoint",
    help="ask a running proxy for a checkpoint now",
    description="Ask a running primary proxy to have its engine checkpoint now. Exit 2 if"
    " it cannot be reached or refuses.",
    add_arguments=_checkpoint_arguments,
    run=_checkpoint,
)

SET_PERIOD = Subcommand(
    "set-period",
    help="change the periodic checkpoint's interval of a running pair",
    description="Tell a running proxy's checkpoint engines to checkpoint every MS"
    " milliseconds from now on (until the next set-period, reload or restart: the file's"
    " engine.period_ms is not changed). Needs engine credentials (root, the daemon's"
    " user, control.engine_group). Exit 2 if the proxy cannot be reached, refuses, or"
    " has no engine connected.",
    add_arguments=_set_period_arguments,
    run=_set_period,
)

REPROTECT = Subcommand(
    "reprotect",
    help="protect again after a failover: this host becomes the primary",
    description="Tell the daemon that runs the guest alone (after a failover) to protect"
    " it again: it becomes the primary of its pair, sets up host P's data path on its"
    " host and its engine migrates into the new secondary QEMU waiting on --migrate-uri"
    " (start that QEMU with -incoming and its host's daemon, role secondary, first)."
    " Exit 2 if the daemon cannot be reached or refuses. docs/operations.md.",
    add_arguments=_reprotect_arguments,
    run=_reprotect,
)
