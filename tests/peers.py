"""A control-socket peer with other credentials: a forked child that drops to a uid, a gid
and supplementary groups, connects, sends lines and reports the lines it got back.

Tests run as root; this is how they play an unprivileged member of ``control.group`` or of
``control.engine_group`` against a real socket (``SO_PEERCRED``/``SO_PEERGROUPS`` are the
kernel's, nothing is faked). The socket's directory must be searchable by that uid.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from coloproxy.protocol import Message, ProtocolError, decode_line

NOBODY = 65534
NOGROUP = 65534
USERS_GID = grp.getgrnam("users").gr_gid
STAFF_GID = grp.getgrnam("staff").gr_gid

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes uid in a child: needs root")


@dataclass(frozen=True, slots=True)
class PeerResult:
    replies: list[Message | ProtocolError]
    closed: bool  # the proxy ended the connection after those replies
    errno: int | None = None  # connect() failed with it


def _child(
    path: str, uid: int, gid: int, groups: list[int], lines: bytes, replies: int, out: int
) -> None:
    """In the forked child. No asyncio and no logging here (fork copied their state)."""
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(lines)
            data = b""
            closed = False
            while data.count(b"\n") < replies:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
            if not closed:
                # Whether the proxy closes after the replies: a refusal closes at once, a
                # connection that stays is seen to stay for half a second.
                sock.settimeout(0.5)
                try:
                    closed = sock.recv(1) == b""
                except TimeoutError:
                    closed = False
        os.write(out, json.dumps({"data": data.decode(), "closed": closed}).encode())
    except OSError as exc:
        os.write(out, json.dumps({"errno": exc.errno}).encode())
    finally:
        os._exit(0)


async def talk_as(
    path: Path,
    uid: int,
    gid: int,
    groups: list[int],
    messages: list[Message],
    replies: int | None = None,
) -> PeerResult:
    """Send ``messages`` (encoded, in one write) as that user; read ``replies`` lines
    (default: one per message)."""
    from coloproxy.protocol import encode

    lines = b"".join(encode(message) for message in messages)
    wanted = len(messages) if replies is None else replies
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(os.fspath(path), uid, gid, groups, lines, wanted, write_end)
    os.close(write_end)

    def wait() -> bytes:
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        return data

    result = json.loads(await asyncio.to_thread(wait))
    if "errno" in result:
        return PeerResult([], True, result["errno"])
    decoded = [
        decode_line(line.encode()) for line in str(result["data"]).split("\n") if line.strip()
    ]
    return PeerResult(decoded, bool(result["closed"]))
