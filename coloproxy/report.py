"""The result of comparing two captures, and its two renderings: JSON and text (pure).

:mod:`coloproxy.replay` builds a :class:`CompareResult`; :func:`to_json` gives the object
``compare-pcap --json`` prints, :func:`format_text` the human report: per divergence its
reason, flow, stream offset and a short two-sided hexdump with the first differing byte marked,
then the malformed packets, the warnings and one summary line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from coloproxy.compare.config import Framing
from coloproxy.compare.events import CheckpointNeeded, Side
from coloproxy.packet.parse import MalformedReason

HEXDUMP_WIDTH: Final = 16
# The text report lists this many malformed packets; the counts are always complete.
MALFORMED_SHOWN: Final = 10


class SkipReason(StrEnum):
    """Why a captured record was not fed to the comparator (also a JSON count key)."""

    NOT_GUEST = "not-guest"  # its IP source is not one of the --guest addresses
    NON_IP = "non-ip"  # not IP, where only IP is compared (guest filter, or IP framing)
    BAD_LINK_HEADER = "bad-link-header"  # shorter than its own link-layer header


@dataclass(frozen=True, slots=True)
class PacketRef:
    """A record by side and number (1-based, as Wireshark numbers frames)."""

    side: Side
    number: int

    def __str__(self) -> str:
        return f"{self.side.value} packet {self.number}"


@dataclass(frozen=True, slots=True)
class CaptureSummary:
    file: str
    format: str  # "pcap" or "pcapng"
    link_types: tuple[int, ...]
    packets: int  # records read
    compared: int  # fed to the comparator
    skipped: Mapping[str, int]  # by SkipReason
    malformed: Mapping[str, int]  # by MalformedReason
    truncated: str | None  # where and why reading stopped early, if it did


@dataclass(frozen=True, slots=True)
class Divergence:
    """A CheckpointNeeded, when it came (relative seconds; None: at the end) and what fed it."""

    event: CheckpointNeeded
    time: float | None
    packet: PacketRef | None


@dataclass(frozen=True, slots=True)
class MalformedInput:
    side: Side
    packet: PacketRef | None
    reason: MalformedReason
    detail: str


@dataclass(frozen=True, slots=True)
class CompareResult:
    primary: CaptureSummary
    secondary: CaptureSummary
    framing: Framing
    guests: tuple[str, ...]
    divergences: tuple[Divergence, ...]
    malformed: tuple[MalformedInput, ...]  # the first ones; the summaries count them all

    @property
    def equivalent(self) -> bool:
        return not self.divergences

    @property
    def warnings(self) -> list[str]:
        return [
            f"{summary.file}: {summary.truncated}"
            for summary in (self.primary, self.secondary)
            if summary.truncated
        ]


def first_difference(primary: bytes, secondary: bytes) -> int:
    """Index of the first byte that differs (or that one side lacks); the length if equal."""
    for index, (left, right) in enumerate(zip(primary, secondary, strict=False)):
        if left != right:
            return index
    return min(len(primary), len(secondary))


def hexdump_pair(
    primary: bytes, secondary: bytes, start: int = 0, first: int | None = None
) -> list[str]:
    """Both sides row by row, offsets from ``start``, a caret line under byte ``first``.

    ``first`` is the index of the first difference; by default where the two sides differ.
    """
    if first is None:
        first = first_difference(primary, secondary)
    total = max(len(primary), len(secondary))
    width = max(6, len(str(start + total)))
    hex_width = HEXDUMP_WIDTH * 3 - 1
    lines = [f"  {'offset':>{width}}  {'side':<9}  {'bytes':<{hex_width}}  text"]
    # A side with no bytes (a timeout, a secondary-only output) gets no rows and no caret.
    sides = [
        (name, data) for name, data in (("primary", primary), ("secondary", secondary)) if data
    ]
    for row in range(0, total, HEXDUMP_WIDTH):
        for name, data in sides:
            chunk = data[row : row + HEXDUMP_WIDTH]
            hex_part = " ".join(f"{byte:02x}" for byte in chunk)
            text = "".join(chr(byte) if 0x20 <= byte < 0x7F else "." for byte in chunk)
            lines.append(f"  {start + row:>{width}}  {name:<9}  {hex_part:<{hex_width}}  |{text}|")
        if len(sides) == 2 and row <= first < row + HEXDUMP_WIDTH:
            column = first - row
            hex_at = 2 + width + 2 + 9 + 2 + column * 3
            text_at = 2 + width + 2 + 9 + 2 + hex_width + 3 + column
            lines.append(" " * hex_at + "^^" + " " * (text_at - hex_at - 2) + "^")
    return lines


def _divergence_json(divergence: Divergence) -> dict[str, object]:
    event = divergence.event
    evidence = event.evidence
    return {
        "reason": str(event.reason),
        "protocol": event.protocol,
        "flow": None if event.flow is None else str(event.flow),
        "coalesced": event.coalesced,
        "time": divergence.time,
        "packet": _packet_json(divergence.packet),
        "offset": None if evidence is None else evidence.offset,
        "before": None if evidence is None else evidence.before,
        "primary_length": None if evidence is None else evidence.primary_length,
        "secondary_length": None if evidence is None else evidence.secondary_length,
        "primary_hex": None if evidence is None else evidence.primary.hex(),
        "secondary_hex": None if evidence is None else evidence.secondary.hex(),
        "detail": "" if evidence is None else evidence.detail,
    }


def _packet_json(packet: PacketRef | None) -> dict[str, object] | None:
    return None if packet is None else {"side": packet.side.value, "number": packet.number}


def _counts_json(summary: CaptureSummary) -> dict[str, object]:
    return {
        "read": summary.packets,
        "compared": summary.compared,
        "skipped": dict(summary.skipped),
        "malformed": dict(summary.malformed),
    }


def _capture_json(summary: CaptureSummary) -> dict[str, object]:
    return {
        "file": summary.file,
        "format": summary.format,
        "link_types": list(summary.link_types),
        "truncated": summary.truncated,
    }


def to_json(result: CompareResult) -> dict[str, object]:
    """The ``--json`` object (plain dicts, lists, strings, numbers, None)."""
    return {
        "equivalent": result.equivalent,
        "divergences": [_divergence_json(divergence) for divergence in result.divergences],
        "malformed": [
            {
                "side": item.side.value,
                "packet": _packet_json(item.packet),
                "reason": str(item.reason),
                "detail": item.detail,
            }
            for item in result.malformed
        ],
        "counts": {
            "primary": _counts_json(result.primary),
            "secondary": _counts_json(result.secondary),
        },
        "captures": {
            "primary": _capture_json(result.primary),
            "secondary": _capture_json(result.secondary),
        },
        "framing": str(result.framing),
        "guests": list(result.guests),
        "warnings": result.warnings,
    }


def _divergence_text(index: int, divergence: Divergence) -> list[str]:
    event = divergence.event
    evidence = event.evidence
    what = str(event.flow) if event.flow is not None else event.protocol
    coalesced = " (coalesced)" if event.coalesced else ""
    lines = [f"divergence {index}: {event.reason}: {what}{coalesced}"]
    if divergence.time is None:
        when = "at the end of the captures"
    else:
        seen = f"{divergence.packet}, " if divergence.packet is not None else ""
        when = f"{seen}t={divergence.time:.6f} s"
    if evidence is None:
        lines.append(f"  {when}")
        return lines
    if evidence.offset is None:
        where = ""
    elif event.protocol == "tcp":
        where = f"stream offset {evidence.offset}; "
    else:
        where = f"datagram offset {evidence.offset}; "
    lines.append(
        f"  {where}primary {evidence.primary_length} bytes,"
        f" secondary {evidence.secondary_length} bytes; {when}"
    )
    if evidence.detail:
        lines.append(f"  {evidence.detail}")
    if evidence.primary or evidence.secondary:
        # Both windows start ``before`` bytes ahead of the first difference at ``offset``.
        start = 0 if evidence.offset is None else evidence.offset - evidence.before
        lines.extend(
            hexdump_pair(evidence.primary, evidence.secondary, start, first=evidence.before)
        )
    return lines


def _side_text(name: str, summary: CaptureSummary) -> str:
    text = f"{name} {summary.packets} read, {summary.compared} compared"
    for label, counts in (("skipped", summary.skipped), ("malformed", summary.malformed)):
        total = sum(counts.values())
        if total:
            detail = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
            text += f", {total} {label} ({detail})"
    return text


def format_text(result: CompareResult) -> str:
    """The human report, ending in one summary line (and a newline)."""
    lines: list[str] = []
    for index, divergence in enumerate(result.divergences, 1):
        lines.extend(_divergence_text(index, divergence))
    for item in result.malformed[:MALFORMED_SHOWN]:
        where = str(item.packet) if item.packet is not None else item.side.value
        detail = f" ({item.detail})" if item.detail else ""
        lines.append(f"malformed: {where}: {item.reason}{detail}")
    hidden = len(result.malformed) - MALFORMED_SHOWN
    if hidden > 0:
        lines.append(f"malformed: {hidden} more not shown (see --json)")
    lines.extend(f"warning: {warning}" for warning in result.warnings)
    sides = f"{_side_text('primary', result.primary)}; {_side_text('secondary', result.secondary)}"
    if result.equivalent:
        lines.append(f"equivalent: {sides}")
    else:
        reasons = Counter(str(divergence.event.reason) for divergence in result.divergences)
        detail = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
        count = len(result.divergences)
        plural = "" if count == 1 else "s"
        lines.append(f"diverged: {count} divergence{plural} ({detail}); {sides}")
    return "\n".join(lines) + "\n"
