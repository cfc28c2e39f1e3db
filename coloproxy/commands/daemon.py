"""``coloproxy run`` and ``coloproxy teardown``: the daemon of one host and the removal of
its host set-up (shell; the daemon's dependencies load only when one of them runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from coloproxy.commands.subcommand import EXIT_EQUIVALENT, Subcommand
from coloproxy.config import LogLevel, load_config


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, metavar="FILE", help="the pair's config")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
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


def _run(args: argparse.Namespace) -> int:
    from coloproxy.daemon.run import run

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
    return EXIT_EQUIVALENT


RUN = Subcommand(
    "run",
    help="run the proxy daemon of one host",
    description=(
        "Set up this host's part of the pair, then compare and release (role primary) or"
        " serve the secondary's side (role secondary) until SIGTERM. SIGHUP reads the file"
        " again and changes what can change live (docs/operations.md). The set-up stays"
        " when the daemon stops, so the host fails closed; `coloproxy teardown` removes it."
    ),
    add_arguments=_run_arguments,
    run=_run,
)

TEARDOWN = Subcommand(
    "teardown",
    help="remove this host's set-up (links, tc, rules)",
    description=(
        "Remove what `coloproxy run` set up on this host. On host P the guest's output then"
        " flows uncompared: run it only when the pair is being taken apart."
    ),
    add_arguments=_config_argument,
    run=_teardown,
)
