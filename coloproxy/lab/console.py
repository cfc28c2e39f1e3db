"""The lab guest's serial console, read from the host: the memory checker's status lines
and the guest's TCP counters (guest/README.md). The disk checker's lines:
:mod:`coloproxy.lab.diskcheck`.
"""

from __future__ import annotations

import re

from coloproxy.lab import vms
from coloproxy.lab.configs import LabPaths

_MEMCHECK = re.compile(rb"memcheck seq=(\d+) steps=\d+ writes=\d+ passes=(\d+) errors=(\d+)")


_TCPSTAT = re.compile(rb"tcpstat retrans=(\d+)")


def guest_retransmissions(paths: LabPaths, role: str) -> int | None:
    """The guest's TCP RetransSegs as it last printed it (once a second, guest/init), or None."""
    found = _TCPSTAT.findall(vms.console(paths, role))
    return int(found[-1]) if found else None


def memcheck_lines(console: bytes) -> list[tuple[int, int, int]]:
    """The memory checker's status lines (guest/README.md): (seq, passes, errors) each."""
    return [(int(m[1]), int(m[2]), int(m[3])) for m in _MEMCHECK.finditer(console)]


def memcheck_summary(console: bytes) -> str:
    """What the guest's memory checker printed: lines, passes, errors."""
    found = memcheck_lines(console)
    trouble = [word.decode() for word in vms.KERNEL_TROUBLE if word in console]
    if not found:
        return "no status line" + (f"; kernel: {', '.join(trouble)}" if trouble else "")
    errors = max(line[2] for line in found)
    text = (
        f"seq {found[0][0]}..{found[-1][0]}, {found[-1][1] - found[0][1]} more full passes, "
        f"{errors} errors"
    )
    return text + (f"; kernel: {', '.join(trouble)}" if trouble else "")
