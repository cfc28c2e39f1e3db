"""The control socket's file (shell): made private before anyone can connect, a stale one
left by a crash removed, and removed again only while it is still ours.

The file is created with mode 0660 (group: the configured one) before ``listen()``, so no
connection can slip in with the umask's mode; who may then connect is
:mod:`coloproxy.control.access`'s to say, which still holds if someone loosens the mode.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path
from typing import Final

from coloproxy.control.errors import ControlError

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_SOCKET_PATH: Final = 107


class SocketFile:
    """The socket file at ``path``: :meth:`listen` creates it, :meth:`remove` removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of our file

    def listen(self, group: int | None, backlog: int) -> socket.socket:
        """A non-blocking listening socket on a new file of mode 0660 and ``group``."""
        path = os.fsencode(self.path)
        if len(path) > MAX_SOCKET_PATH:
            raise ControlError(
                f"control socket path {self.path} is {len(path)} bytes; at most"
                f" {MAX_SOCKET_PATH} fit in a Unix socket address"
            )
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            _remove_stale(self.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise ControlError(f"cannot prepare control socket {self.path}: {exc}") from exc
        try:
            listener.bind(os.fspath(self.path))
            info = os.stat(self.path)
            self._inode = (info.st_dev, info.st_ino)
            # Mode and group before listen(): until then every connect() is refused.
            os.chmod(self.path, 0o660)
            if group is not None:
                os.chown(self.path, -1, group)
            listener.listen(backlog)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            self.remove()
            raise ControlError(f"cannot listen on control socket {self.path}: {exc}") from exc
        return listener

    def remove(self) -> None:
        """Remove the socket file if it is still the one we created."""
        if self._inode is None:
            return
        try:
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove control socket %s: %s", self.path, exc)
        self._inode = None


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on (left by a crash); refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full backlog must not block us: EAGAIN means alive
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        log.info("removing stale control socket %s", path)
        os.unlink(path)
        return
    except BlockingIOError:
        pass
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise ControlError(f"another process is listening on {path}")
