"""Who may use the control socket, and as what (shell: reads the peer's credentials and the
group database).

Each peer's credentials (``SO_PEERCRED``, and ``SO_PEERGROUPS`` for its supplementary groups)
decide what it may be (:class:`AccessPolicy`): root, the proxy's own user and members of the
engine group have *engine credentials* and may claim any role; members of the control group
may claim ``cli`` and ``monitor`` (or ``monitor`` only); anyone else may not connect. See
docs/control-protocol.md, "Who may send what".
"""

from __future__ import annotations

import errno
import grp
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Final

from coloproxy.control.errors import ControlError
from coloproxy.errors import UsageError
from coloproxy.protocol import ClientRole

# Linux's SO_PEERGROUPS (since 4.13); the socket module does not name it.
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_GID: Final = struct.Struct("I")

# What each class of credentials may claim in its hello.
_EVERY_ROLE: Final = frozenset(ClientRole)
MAY_CLAIM: Final = {
    ClientRole.ENGINE: _EVERY_ROLE,
    ClientRole.CLI: frozenset({ClientRole.CLI, ClientRole.MONITOR}),
    ClientRole.MONITOR: frozenset({ClientRole.MONITOR}),
}


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None  # supplementary groups; None when the kernel cannot say


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connecting process's pid, uid, gid (at connect time) and supplementary groups.

    ``sock`` may also be asyncio's TransportSocket, which offers the same ``getsockopt``.
    """
    getsockopt = sock.getsockopt
    pid, uid, gid = _UCRED.unpack(getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    groups: tuple[int, ...] | None = None
    for count in (64, 65536):  # NGROUPS_MAX is 65536; try a small buffer first
        try:
            raw = getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * _GID.size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break  # ENOPROTOOPT on old kernels: fall back to the group database
        groups = tuple(value for (value,) in _GID.iter_unpack(raw))
        break
    return PeerCredentials(pid, uid, gid, groups)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Which roles a peer's credentials allow (docs/control-protocol.md, "Who may send what").

    Engine credentials: root, the proxy's own user (it owns the socket file anyway), a member
    (primary or supplementary group) of ``engine_group``; they allow every role. A member of
    ``group`` may claim ``group_role`` (``cli``: status and manual checkpoints, or
    ``monitor``: status only) and the roles below it. Nobody else may connect.
    """

    own_uid: int
    group: int | None = None  # control.group
    engine_group: int | None = None  # control.engine_group
    group_role: ClientRole = ClientRole.CLI  # control.group_role

    def __post_init__(self) -> None:
        if self.group_role is ClientRole.ENGINE:
            raise UsageError("control.group_role is cli or monitor, not engine")

    def engine_credentials(self, credentials: PeerCredentials) -> bool:
        return credentials.uid in (0, self.own_uid) or _in_group(credentials, self.engine_group)

    def roles(self, credentials: PeerCredentials) -> frozenset[ClientRole]:
        """Every role the peer may claim; empty: it may not connect at all."""
        if self.engine_credentials(credentials):
            return _EVERY_ROLE
        if _in_group(credentials, self.group):
            return MAY_CLAIM[self.group_role]
        return frozenset()

    def refusal(self, credentials: PeerCredentials) -> str | None:
        """Why a peer may not use the socket at all, or None when it may."""
        if self.roles(credentials):
            return None
        return f"uid {credentials.uid} is not root and in no control group"

    def claim_refusal(self, credentials: PeerCredentials, role: ClientRole) -> str | None:
        """Why the peer may not be ``role`` (what its hello claims), or None when it may."""
        allowed = self.roles(credentials)
        if role in allowed:
            return None
        engine_group = "none is configured" if self.engine_group is None else self.engine_group
        who = (
            f"root, the proxy's own user (uid {self.own_uid}) and members of"
            f" control.engine_group ({engine_group})"
        )
        if role is ClientRole.CLI:
            group = "none is configured" if self.group is None else self.group
            who = (
                f"root, the proxy's own user (uid {self.own_uid}), members of"
                f" control.engine_group ({engine_group}) and of control.group ({group}) when"
                " control.group_role is cli"
            )
        may = " or ".join(sorted(allowed)) or "nothing"
        return (
            f"uid {credentials.uid} may not claim role {role}: it is for {who}; this peer may"
            f" be {may}"
        )


def _in_group(credentials: PeerCredentials, gid: int | None) -> bool:
    if gid is None:
        return False
    if credentials.gid == gid:
        return True
    if credentials.groups is not None:
        return gid in credentials.groups
    return _member_by_name(credentials.uid, gid)


def _member_by_name(uid: int, gid: int) -> bool:
    """Group membership from the databases, for kernels without SO_PEERGROUPS."""
    try:
        return pwd.getpwuid(uid).pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def resolve_group(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(f"control group {group!r} does not exist") from None
