"""The leader key's gate for the PVM's non-IP frames, in the kernel (shell; quorum mode).

Theory of operation
-------------------
P-out queues only IP: ARP and other non-IP frames of the PVM pass the bridge unqueued
(docs/data-path.md), so the proxy's gate cannot hold them. A primary past its leader key's
deadline must not put a single frame of its guest on the LAN: one ARP of an old PVM moves
the switch's MAC entry of the guest to the old host, away from the new primary.

So host P keeps an nftables table of its own (bridge family, ``<prefix>lease``): a rule drops
every non-IP frame that enters the bridge from the guest port unless the port's name is in
the set ``lease``, and the set's one element carries a *kernel* timeout: the time left to
the key's deadline, refreshed at every acknowledged renewal. The kernel expires it by its own
clock, so the gate closes on time even when the daemon is stopped or hung (a frozen host's
guest resumes before its daemon notices anything). Without the element nothing non-IP of the
PVM leaves: the gate starts closed.

libnftables is called in process (``ctypes``): a renewal every 100 ms must not fork.

Each call still costs about half a millisecond of CPU (libnftables parses the text and
fetches its cache from the kernel), so :meth:`LeaseGate.hold_until` does not touch the kernel
at every renewal: the kernel's expiry may lag the key's deadline, never lead it. It is moved
forward only once the deadline has gone ahead of it by at least ``lag`` (a fraction, half by
default) of the time the key has left, and it is moved back (or the element removed) at
once whenever the key's deadline falls before it. With the defaults (TTL 1 s, margin 250
ms, renewals every 100 ms: about 0.75 s left after each) that is one kernel update in four
renewals, and when the renewals stop the gate closes up to ``lag`` of that time (about 0.37
s) *before* the key's deadline, never after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import subprocess
from typing import Any

from coloproxy.net import NetError

log = logging.getLogger(__name__)

# hold_until asks the kernel for this much less than the time left: the kernel counts the
# timeout from when it gets the update (after ``now``: the call's own time, and an event
# loop's clock may be that of the iteration's start) and in jiffies (up to 4 ms at HZ 250).
KERNEL_SLACK = 0.01

_lib: Any = None


def _library() -> Any:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            _lib = False
            return None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
    return _lib or None


class LeaseGate:
    """The table of one pair on host P (see the module docstring)."""

    def __init__(self, prefix: str, guest_port: str, lag: float = 0.5) -> None:
        if not 0 <= lag < 1:
            raise ValueError("the lease gate's lag is a fraction from 0 (every renewal) to below 1")
        self.table = f"{prefix}lease"
        self.guest_port = guest_port
        self.lag = lag
        # When the kernel's element expires, in the caller's clock (-inf: no element). Only
        # an update the kernel accepted changes it: a failed one leaves the earlier truth.
        self.until = -math.inf
        self.updates = 0  # kernel updates by hold_until (a figure for benchmarks and tests)
        lib = _library()
        self._ctx: Any = None
        if lib is not None:
            self._ctx = lib.nft_ctx_new(0)
            lib.nft_ctx_buffer_error(self._ctx)

    def _run(self, text: str) -> None:
        lib = _library()
        if lib is not None and self._ctx is not None:
            if lib.nft_run_cmd_from_buffer(self._ctx, text.encode()) != 0:
                error = lib.nft_ctx_get_error_buffer(self._ctx) or b""
                raise NetError(f"nft ({self.table}): {error.decode(errors='replace').strip()}")
            return
        try:
            done = subprocess.run(
                ["nft", "-f", "-"], input=text, text=True, capture_output=True, check=False
            )
        except FileNotFoundError as exc:
            raise NetError(
                f"nft ({self.table}): nftables is not installed (neither libnftables nor the"
                " nft command found): install the Debian package nftables (scripts/setup"
                " daemon does)"
            ) from exc
        if done.returncode != 0:
            raise NetError(f"nft ({self.table}): {done.stderr.strip()}")

    def hold_until(self, deadline: float, now: float) -> bool:
        """Keep the gate open no later than ``deadline`` (the key's, in the clock of ``now``),
        touching the kernel only when it must (see the module docstring); True when it did.
        Raises :class:`NetError` when the kernel refused (the gate is then as it was)."""
        until = self.until
        if deadline <= now:
            if until <= now:  # nothing open (the kernel expired it by itself, or never set)
                return False
            self._run(f"flush set bridge {self.table} lease\n")
            self.until = -math.inf
            self.updates += 1
            return True
        if deadline == until:
            return False
        if until < deadline and until > now and deadline - until < self.lag * (deadline - now):
            return False  # the kernel's expiry lags a little: safe, it is earlier
        milliseconds = self.open_for(deadline - now - KERNEL_SLACK)
        self.until = now + milliseconds / 1000 if milliseconds > 0 else -math.inf
        self.updates += 1
        return True

    def install(self) -> None:
        """Create (or recreate) the table, closed."""
        table = f"bridge {self.table}"
        self._run(
            f"add table {table}\ndelete table {table}\n"
            f"table {table} {{\n"
            "  set lease { type ifname; flags timeout; }\n"
            "  chain forward {\n"
            "    type filter hook forward priority -300; policy accept;\n"
            f'    iifname "{self.guest_port}" meta protocol != {{ ip, ip6 }}'
            " iifname != @lease drop\n"
            "  }\n}\n"
        )
        self.until = -math.inf

    def open_for(self, seconds: float) -> int:
        """Let the guest's non-IP frames pass for ``seconds`` more (kernel clock; whole
        milliseconds, rounded down: returned); closed at once when not positive."""
        set_name = f"bridge {self.table} lease"
        text = f"flush set {set_name}\n"
        milliseconds = int(min(seconds, 3600.0) * 1000) if seconds > 0 else 0
        if milliseconds > 0:
            text += f'add element {set_name} {{ "{self.guest_port}" timeout {milliseconds}ms }}\n'
        self._run(text)
        return milliseconds

    def remove(self) -> None:
        try:
            self._run(f"delete table bridge {self.table}\n")
        except NetError as exc:
            log.debug("%s", exc)


__all__ = ["LeaseGate"]
