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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import subprocess
from typing import Any

from coloproxy.net import NetError

log = logging.getLogger(__name__)

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

    def __init__(self, prefix: str, guest_port: str) -> None:
        self.table = f"{prefix}lease"
        self.guest_port = guest_port
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

    def open_for(self, seconds: float) -> None:
        """Let the guest's non-IP frames pass for ``seconds`` more (kernel clock); closed
        at once when not positive."""
        set_name = f"bridge {self.table} lease"
        text = f"flush set {set_name}\n"
        milliseconds = int(min(seconds, 3600.0) * 1000) if seconds > 0 else 0
        if milliseconds > 0:
            text += f'add element {set_name} {{ "{self.guest_port}" timeout {milliseconds}ms }}\n'
        self._run(text)

    def remove(self) -> None:
        try:
            self._run(f"delete table bridge {self.table}\n")
        except NetError as exc:
            log.debug("%s", exc)


__all__ = ["LeaseGate"]
