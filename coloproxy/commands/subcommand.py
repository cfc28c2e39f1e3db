"""What a subcommand of the ``coloproxy`` command line is: its record, the exit codes, and
the argument types more than one subcommand uses (shell).

Exit codes follow diff(1): 0 same, 1 different, 2 trouble.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

EXIT_EQUIVALENT: Final = 0
EXIT_DIVERGED: Final = 1
EXIT_TROUBLE: Final = 2

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True, slots=True)
class Subcommand:
    """One subcommand: its name and help, its arguments, and what runs it (an exit code)."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler


def seconds(text: str) -> float:
    """An argument type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value
