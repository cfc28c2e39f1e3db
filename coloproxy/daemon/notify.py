"""systemd's service notifications and watchdog, spoken directly (shell).

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a unix datagram socket, and waits
for ``READY=1`` before it calls the unit started; with ``WatchdogSec=`` it passes
``$WATCHDOG_USEC`` and kills and restarts a service that sends no ``WATCHDOG=1`` within that
time (sd_notify(3), sd_watchdog_enabled(3)). The protocol is one ``sendto`` of newline-
separated assignments, so it is spoken here rather than through libsystemd or a package.

The daemon pets the watchdog from a timer on its event loop, at half the interval: a loop
that stalls (a callback that never returns, a deadlock) stops the petting and systemd
restarts the daemon, which is what the watchdog is for. A thread could not tell.

Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing. A notification that cannot
be sent is logged once and otherwise ignored: systemd's bookkeeping must never stop the data
path.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping
from typing import Final

log = logging.getLogger(__name__)

# The variables sd_notify(3) reads; removed from the environment once read, as
# sd_notify(unset_environment=1) does, so that the commands the daemon runs do not
# notify on its behalf.
NOTIFY_VARIABLES: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """The daemon's end of systemd's notification socket; a no-op without one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        if address:
            # "@name" is a socket in the abstract namespace (a leading NUL byte).
            self._address = b"\0" + address[1:].encode() if address[0] == "@" else address
        self.watchdog_interval = (
            watchdog_usec / 1e6 if watchdog_usec is not None and watchdog_usec > 0 else None
        )
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read (and remove) systemd's variables. The watchdog is ours only when
        ``$WATCHDOG_PID`` is unset or names this process."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        usec: int | None = None
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", ""))
            except ValueError:
                usec = None
        for name in NOTIFY_VARIABLES:
            env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``NAME=value`` lines (``ready=1`` becomes ``READY=1``); whether it went."""
        if self._address is None:
            return False
        text = "".join(f"{name.upper()}={value}\n" for name, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(text.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self._address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd 253+ (Type=notify-reload) match the READY=1 that ends
        # the reload; older systemd ignores it.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(reloading=1, monotonic_usec=now_usec)

    def stopping(self) -> bool:
        return self.notify(stopping=1)

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


__all__ = ["NOTIFY_VARIABLES", "Notifier"]
