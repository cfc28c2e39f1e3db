"""``coloproxy check-config``: read configuration files as the proxy would (shell)."""

from __future__ import annotations

import argparse
import sys

from coloproxy.commands.subcommand import EXIT_EQUIVALENT, EXIT_TROUBLE, Subcommand
from coloproxy.config import ConfigError, check_files, describe, load_config


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="a configuration file")


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


CHECK_CONFIG = Subcommand(
    "check-config",
    help="check configuration files",
    description=(
        "Read each file as the proxy would and print 'FILE: ok (pair NAME, role ROLE)',"
        " or every problem as FILE:LINE: key 'KEY': what is wrong; the key files it names"
        " must exist and be private (mode 0600). Exit 2 on a problem."
    ),
    add_arguments=_arguments,
    run=_check_config,
)
