"""The two roles of a host pair: the one vocabulary for config, rules, engine and wire."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """Which side of the pair a host (its daemon, its rules, its engine) is."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
