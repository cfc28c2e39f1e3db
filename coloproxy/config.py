"""The YAML configuration of one proxy: one file per host pair and role (shell).

Theory of operation
-------------------
The file is composed into YAML's node tree (``yaml.compose`` with the safe loader), not
loaded into plain dicts, so that every key keeps the line it is on. The tree is then
walked against a schema: each section is a table of keys, each key a rule that turns the
YAML value into a typed value or says what is allowed, plus a default or "required".
Every problem is collected, as ``FILE:LINE: key 'dotted.key': what is wrong``, and all of
them are raised together in one :class:`ConfigError`, so an operator fixes a file in one
round. Only when there is no problem are the frozen dataclasses built.

The ``compare`` section is derived from :class:`coloproxy.compare.CompareConfig` itself
(field names, types and defaults), so a new comparator setting is configurable without an
edit here; the comparator's own validation still runs and its complaints are reported
with the section's line.

Reading is bounded before the schema sees anything, so that no file can make the reader
hang, trace back or take the host's memory: only a regular file is opened (never waiting on
a FIFO or reading a device for ever), at most ``MAX_CONFIG_BYTES``; the composer refuses
nesting deeper than ``MAX_DEPTH`` (it recurses once per level), lists or mappings of more
than ``MAX_ENTRIES`` and more than ``MAX_VALUES`` values in all, an alias counting as every
value of its anchor (so a few anchors cannot stand for millions); a value longer than
``MAX_SCALAR`` characters is not converted, and a value YAML cannot convert (``!!int abc``)
is a problem of its key like any other. Each of these is one line naming the file and,
where known, the line and the key.

docs/configuration.md describes every key; configs/ holds commented examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import grp
import ipaddress
import math
import os
import re
import stat
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from coloproxy.compare.config import CompareConfig, Framing, PassthroughRule, SecondarySeq
from coloproxy.engine.heartbeat import MIN_HEARTBEAT_KEY_BYTES
from coloproxy.errors import InputError, UsageError
from coloproxy.protocol import ClientRole
from coloproxy.role import Role

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_SOCKET_DIR: Final = Path("/run/coloproxy")
MAX_SOCKET_PATH: Final = 107  # sun_path holds 108 bytes with the terminating NUL
MAX_SECONDS: Final = 86400.0  # no timeout of the comparator is sensibly longer than a day
MAX_COUNT: Final = 2**40  # bounds: 1 Ti packets or bytes is beyond any host
# Bounds of the reader (module docstring). A real configuration is a few KiB, nests five
# levels and has a few hundred values.
MAX_CONFIG_BYTES: Final = 1 << 20
MAX_DEPTH: Final = 32  # lists and mappings inside one another
MAX_ENTRIES: Final = 4096  # entries of one list or mapping
MAX_VALUES: Final = 16384  # values of the whole file, an alias counted as its anchor's
MAX_SCALAR: Final = 4096  # characters of one value: PATH_MAX; also below Python's int limit
MAX_PASSTHROUGH: Final = 256  # compare.passthrough rules: each is tried for every new flow
MAX_OBJECT_IDS: Final = 64  # engine.failover_object_del
MAX_ALLOW: Final = 64  # chardev.*.allow
MAX_SHOWN: Final = 60  # characters of a value or key shown in a message


class ConfigError(InputError):
    """A configuration file that cannot be used; ``problems`` holds one line per problem,
    in file order, each naming the file, the line and the key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class Transport(StrEnum):
    NETFILTERQUEUE = "netfilterqueue"  # the netfilterqueue binding (libnetfilter_queue)
    NETLINK = "netlink"  # our own nfnetlink socket


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class PairConfig:
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    local: IPAddress
    remote: IPAddress


@dataclass(frozen=True, slots=True)
class NetConfig:
    guest_port: str
    replication: ReplicationConfig
    prefix: str = "cp"
    lan_bridge: str | None = None
    vxlan_id: int = 77
    vxlan_port: int = 4789
    underlay: str | None = None
    rules_check_ms: int = 5000  # how often the NFQUEUE rules are checked; 0: never


@dataclass(frozen=True, slots=True)
class QueuesConfig:
    primary_out: int = 10
    secondary_out: int = 11
    secondary_in: int = 12
    secondary_egress: int = 13
    primary_split: int = 14
    max_len: int = 8192
    copy_range: int = 65535
    rcvbuf: int = 8 << 20
    transport: Transport = Transport.NETLINK


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: Path
    group: str | None = None  # may connect: status, manual checkpoints (group_role)
    max_clients: int = 16
    client_queue: int = 256
    engine_group: str | None = None  # engine credentials: may be the engine, steer it
    group_role: ClientRole = ClientRole.CLI  # the most a member of group may be
    idle_timeout_ms: int = 60000  # 0: never


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9477
    enabled: bool = True

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class QuorumService(StrEnum):
    ETCD = "etcd"
    TWO_HOST = "two-host"  # no quorum service: for labs (docs/engine.md, split brain)


@dataclass(frozen=True, slots=True)
class QuorumConfig:
    """Where the leader key lives (docs/engine.md, "Failover by quorum")."""

    service: QuorumService
    endpoints: tuple[tuple[str, int], ...] = ()  # etcd client endpoints, tried in turn
    prefix: str = "/coloproxy"  # keys under <prefix>/<pair>/
    ttl_ms: int = 1000
    renew_ms: int = 100
    margin_ms: int = 250
    retry_ms: int = 20
    timeout_ms: int = 250
    ca_file: str | None = None  # TLS when set
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None  # etcd's own authentication
    password_file: str | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The checkpoint engine (docs/engine.md). No ``qmp``: no engine runs in the daemon."""

    qmp: str | None = None
    period_ms: int = 20000
    min_gap_ms: int = 100
    migrate_uri: str | None = None  # primary: where the secondary QEMU listens (-incoming)
    heartbeat_port: int = 9478
    heartbeat_interval_ms: int = 50
    failover_timeout_ms: int = 300
    checkpoint_timeout_ms: int = 10000
    bring_up: bool = True
    lan_heartbeat: ReplicationConfig | None = None  # a second heartbeat path, on the LAN
    heartbeat_key: str | None = None  # the heartbeats' HMAC key file (required with qmp)
    quorum: QuorumConfig | None = None  # None: the two-host mode (labs only)
    failover_object_del: tuple[str, ...] = ()  # QEMU objects deleted at failover (filters)


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """The protected VM's disk, replicated by QEMU's block replication (docs/engine.md, "The
    disk"). The same section on both hosts: each names its own files."""

    image: str  # this host's copy of the guest's disk (the quorum's child, or the SVM's base)
    active: str  # the secondary's active disk (qcow2, the image's virtual size)
    hidden: str  # the secondary's hidden disk (qcow2, the image's virtual size)
    format: DiskFormat = DiskFormat.RAW  # the image's format
    nbd_port: int = 8889  # the secondary's NBD export, on its replication address
    drive: str = "colo-disk0"  # the quorum drive the guest's disk device uses
    export: str = "parent0"  # the secondary's base drive, exported over NBD under this name
    sync_timeout_ms: int = 600000  # the full copy before COLO (bring-up, reprotect)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = LogLevel.INFO


@dataclass(frozen=True, slots=True)
class ChardevSocket:
    """One stream socket of the chardev transport: a unix path or a TCP address, and which
    side listens (``server``: coloproxy listens and QEMU's chardev connects)."""

    server: bool
    path: Path | None = None  # unix
    host: str | None = None  # tcp
    port: int = 0
    allow: tuple[IPNetwork, ...] = ()  # tcp, server: the peers it accepts; () any

    def __str__(self) -> str:
        if self.path is not None:
            where = f"unix:{self.path}"
        else:
            host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
            where = f"tcp:{host}:{self.port}"
        return f"{where},{'server' if self.server else 'client'}"


@dataclass(frozen=True, slots=True)
class ChardevConfig:
    """The chardev transport (docs/chardev.md): QEMU's own filters feed coloproxy over
    colo-compare's three sockets instead of NFQUEUE."""

    primary_in: ChardevSocket
    secondary_in: ChardevSocket
    outdev: ChardevSocket
    notify: ChardevSocket | None = None  # the Xen COLO frame's notify channel
    vnet_hdr: bool = False  # the filters' vnet_hdr_support
    reconnect_ms: int = 1000  # client sockets: time between connection attempts
    outdev_buffer_bytes: int = 16 << 20  # released frames kept while outdev is down or slow
    group: str | None = None  # unix sockets coloproxy listens on: mode 0660 and this group


@dataclass(frozen=True, slots=True)
class Config:
    path: str  # the file it was read from, for messages
    pair: PairConfig
    net: NetConfig
    queues: QueuesConfig | None
    compare: CompareConfig
    control: ControlConfig
    metrics: MetricsConfig
    engine: EngineConfig
    log: LogConfig
    chardev: ChardevConfig | None = None  # set: the primary's packets come over QEMU's chardevs
    disk: DiskConfig | None = None  # set: the guest's disk is replicated (block replication)


# -- rules: YAML value in, typed value out, or _Bad saying what is allowed -------------------


class _BadError(Exception):
    """A value that breaks its rule; the message is "expected ..., got ..."."""


Rule = Callable[[object], object]


def _shown(value: object) -> str:
    """A value as the operator wrote it (near enough), for "got ..."."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(_cut(value))
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, int | float):
        return _cut(f"{value:g}" if isinstance(value, float) else str(value))
    return f"a {type(value).__name__}"


def _cut(text: str) -> str:
    """At most ``MAX_SHOWN`` characters of ``text`` for a message."""
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _one_line(text: str) -> str:
    """A message from a library as one line (PyYAML's span several)."""
    return " ".join(text.split())


def _bad(allowed: str, value: object) -> _BadError:
    return _BadError(f"expected {allowed}, got {_shown(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(low: int, high: int, allowed: str | None = None) -> Rule:
    allowed = allowed or f"an integer from {low} to {high}"

    def rule(value: object) -> object:
        if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
            raise _bad(allowed, value)
        return value

    return rule


def _seconds(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("a positive number of seconds", value)
    if not (math.isfinite(value) and value > 0):
        raise _bad("a positive number of seconds", value)
    if value > MAX_SECONDS:
        raise _bad(f"a positive number of seconds, at most {MAX_SECONDS:g}", value)
    return float(value)


def _boolean(value: object) -> object:
    if not isinstance(value, bool):
        raise _bad("true or false", value)
    return value


def _optional(rule: Rule) -> Rule:
    def optional(value: object) -> object:
        return None if value is None else rule(value)

    return optional


def _choice(kind: type[StrEnum], only: Sequence[StrEnum] | None = None) -> Rule:
    members = list(kind) if only is None else list(only)
    allowed = "one of " + ", ".join(member.value for member in members)
    values = {member.value for member in members}

    def rule(value: object) -> object:
        if isinstance(value, str) and value in values:
            return kind(value)
        raise _bad(allowed, value)

    return rule


def _pattern(regex: str, allowed: str) -> Rule:
    compiled = re.compile(regex)

    def rule(value: object) -> object:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise _bad(allowed, value)
        return value

    return rule


def _interface(value: object) -> object:
    # Linux dev_valid_name(): 1-15 bytes, not "." or "..", no '/', ':' or white space.
    if (
        not isinstance(value, str)
        or not 1 <= len(value.encode()) <= 15
        or value in (".", "..")
        or any(c in value for c in "/:")
        or any(c.isspace() for c in value)
    ):
        raise _bad("an interface name (1 to 15 characters, no '/', ':' or spaces)", value)
    return value


def _address(value: object) -> object:
    try:
        if not isinstance(value, str):
            raise ValueError
        return ipaddress.ip_address(value)
    except ValueError:
        raise _bad("an IPv4 or IPv6 address", value) from None


def _socket_path(value: object) -> object:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _bad("an absolute path", value)
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise _bad(f"a path of at most {MAX_SOCKET_PATH} bytes (a Unix socket address)", value)
    return Path(value)


def _absolute_path(value: object) -> object:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _bad("an absolute path", value)
    return value


def _group(value: object) -> object:
    if not isinstance(value, str) or not value:
        raise _bad("a group name", value)
    try:
        grp.getgrnam(value)
    except KeyError:
        raise _BadError(f"group {value!r} does not exist on this host") from None
    return value


_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_LISTEN: Final = "HOST:PORT (an address or host name, IPv6 in brackets; port 0 to 65535)"


def _listen(value: object) -> object:
    """ "host:port" -> (host, port); "[v6]:port" for IPv6."""
    if not isinstance(value, str):
        raise _bad(_LISTEN, value)
    if value.startswith("["):
        host, bracket, port = value[1:].partition("]:")
        valid_host = bool(bracket)
        if valid_host:
            try:
                valid_host = ipaddress.ip_address(host).version == 6
            except ValueError:
                valid_host = False
    else:
        host, colon, port = value.rpartition(":")
        if ":" in host:
            raise _BadError(
                f"expected IPv6 addresses in brackets, e.g. '[::1]:9477', got {value!r}"
            )
        valid_host = bool(colon) and bool(_HOSTNAME.fullmatch(host))
    if not valid_host or not port.isdigit() or int(port) > 65535:
        raise _bad(_LISTEN, value)
    return (host, int(port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _passthrough_protocol(value: object) -> object:
    if isinstance(value, str):
        if value in ("tcp", "udp", "icmp", "icmpv6"):
            return value
        match = re.fullmatch(r"ip-proto-(\d{1,3})", value)
        if match and int(match.group(1)) <= 255:
            return value
    raise _bad("one of tcp, udp, icmp, icmpv6 or ip-proto-N (N from 0 to 255)", value)


def _network(value: object) -> object:
    try:
        if not isinstance(value, str):
            raise ValueError
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _bad("a network in CIDR notation, e.g. 10.0.0.0/24", value) from None
    return value


# -- the schema ------------------------------------------------------------------------------

_REQUIRED: Final = object()


@dataclass(frozen=True, slots=True)
class _Key:
    rule: Rule | None  # None: a nested section, handled by its own reader
    default: object = _REQUIRED
    allowed: str = ""  # for "missing" messages; defaults to the rule's own wording

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


_PAIR_NAME: Final = "a name of 1 to 12 characters a-z, 0-9 and '-'"
_PREFIX: Final = "1 to 5 characters a-z and 0-9, starting with a letter"
_QUEUE: Final = _integer(0, 65535, "a queue number from 0 to 65535")

PAIR_KEYS: Final[Mapping[str, _Key]] = {
    "name": _Key(_pattern(r"[a-z0-9-]{1,12}", _PAIR_NAME), allowed=_PAIR_NAME),
    "role": _Key(_choice(Role), allowed="one of primary, secondary"),
}
REPLICATION_KEYS: Final[Mapping[str, _Key]] = {
    "local": _Key(_address, allowed="an IPv4 or IPv6 address (this host on the link)"),
    "remote": _Key(_address, allowed="an IPv4 or IPv6 address (the peer host on the link)"),
}
NET_KEYS: Final[Mapping[str, _Key]] = {
    "prefix": _Key(_pattern(r"[a-z][a-z0-9]{0,4}", _PREFIX), "cp"),
    "guest_port": _Key(_interface, allowed="an interface name (the host side of the guest's NIC)"),
    "lan_bridge": _Key(_optional(_interface), None),
    "replication": _Key(None, allowed="a mapping with local and remote"),
    "vxlan_id": _Key(_integer(1, 16777215), 77),
    "vxlan_port": _Key(_integer(1, 65535), 4789),
    "underlay": _Key(_optional(_interface), None),
    "rules_check_ms": _Key(_integer(0, 3600000), 5000),
}
# The queues each role binds (the rest of the section is shared settings).
QUEUE_ROLES: Final[Mapping[Role, tuple[str, ...]]] = {
    Role.PRIMARY: ("primary_out", "secondary_out", "primary_split"),
    Role.SECONDARY: ("secondary_in", "secondary_egress"),
}
QUEUES_KEYS: Final[Mapping[str, _Key]] = {
    "primary_out": _Key(_QUEUE, 10),
    "secondary_out": _Key(_QUEUE, 11),
    "secondary_in": _Key(_QUEUE, 12),
    "secondary_egress": _Key(_QUEUE, 13),
    "primary_split": _Key(_QUEUE, 14),
    "max_len": _Key(_integer(1, 1 << 20), 8192),
    "copy_range": _Key(_integer(64, 65535), 65535),
    "rcvbuf": _Key(
        _integer(1 << 16, 1 << 30, "a number of bytes from 65536 to 1073741824"), 8 << 20
    ),
    "transport": _Key(_choice(Transport), Transport.NETLINK),
}
PASSTHROUGH_KEYS: Final[Mapping[str, _Key]] = {
    "protocol": _Key(_optional(_passthrough_protocol), None),
    "guest_port": _Key(_optional(_integer(0, 65535, "a port from 0 to 65535")), None),
    "peer_port": _Key(_optional(_integer(0, 65535, "a port from 0 to 65535")), None),
    "guest_network": _Key(_optional(_network), None),
    "peer_network": _Key(_optional(_network), None),
}
CONTROL_KEYS: Final[Mapping[str, _Key]] = {
    "socket": _Key(_socket_path, None),  # default: /run/coloproxy/<pair>.sock
    "group": _Key(_optional(_group), None),
    "engine_group": _Key(_optional(_group), None),
    "group_role": _Key(_choice(ClientRole, (ClientRole.CLI, ClientRole.MONITOR)), ClientRole.CLI),
    # At least 2: the last slot is kept for an engine.
    "max_clients": _Key(_integer(2, 1024), 16),
    "client_queue": _Key(_integer(1, 1 << 16), 256),
    "idle_timeout_ms": _Key(
        _integer(0, 2**32 - 1, "a non-negative integer of milliseconds (0: never)"), 60000
    ),
}
METRICS_KEYS: Final[Mapping[str, _Key]] = {
    "listen": _Key(_listen, ("127.0.0.1", 9477)),
    "enabled": _Key(_boolean, True),
}
_QEMU_ID: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_MIGRATE_URI: Final = (
    "a QEMU migration URI (tcp:HOST:PORT, unix:PATH, rdma:, vsock:, exec:, fd: or file:)"
)
_MILLISECONDS: Final = "a positive integer of milliseconds"
ENGINE_KEYS: Final[Mapping[str, _Key]] = {
    "qmp": _Key(_optional(_absolute_path), None),
    "period_ms": _Key(_integer(1, 2**32 - 1, _MILLISECONDS), 20000),
    "min_gap_ms": _Key(_integer(0, 2**32 - 1, "a non-negative integer of milliseconds"), 100),
    "migrate_uri": _Key(
        _optional(_pattern(r"(?:tcp|unix|rdma|vsock|exec|fd|file):\S+", _MIGRATE_URI)), None
    ),
    "heartbeat_port": _Key(_integer(1, 65535, "a UDP port from 1 to 65535"), 9478),
    "heartbeat_interval_ms": _Key(_integer(1, 60000, f"{_MILLISECONDS}, at most 60000"), 50),
    "failover_timeout_ms": _Key(_integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 300),
    "checkpoint_timeout_ms": _Key(_integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 10000),
    "bring_up": _Key(_boolean, True),
    "lan_heartbeat": _Key(None, None, allowed="a mapping with local and remote"),
    "heartbeat_key": _Key(_optional(_absolute_path), None),
    "quorum": _Key(None, None, allowed="a mapping with service (etcd or two-host)"),
    "failover_object_del": _Key(None, None, allowed="a list of QEMU object ids"),
}
QUORUM_KEYS: Final[Mapping[str, _Key]] = {
    "service": _Key(_choice(QuorumService), allowed="one of etcd, two-host"),
    "endpoints": _Key(None, None, allowed="a list of HOST:PORT"),
    "prefix": _Key(
        _pattern(r"/[A-Za-z0-9/_.-]{0,200}", "a key prefix starting with '/'"), "/coloproxy"
    ),
    "ttl_ms": _Key(
        _integer(1000, 3600000, "an integer of milliseconds from 1000 to 3600000"), 1000
    ),
    "renew_ms": _Key(_integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 100),
    "margin_ms": _Key(_integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 250),
    "retry_ms": _Key(_integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 20),
    "timeout_ms": _Key(_integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 250),
    "ca_file": _Key(_optional(_absolute_path), None),
    "cert_file": _Key(_optional(_absolute_path), None),
    "key_file": _Key(_optional(_absolute_path), None),
    "user": _Key(_optional(_pattern(r"[^\s:]{1,64}", "an etcd user name")), None),
    "password_file": _Key(_optional(_absolute_path), None),
}
MAX_ENDPOINTS: Final = 16
LOG_KEYS: Final[Mapping[str, _Key]] = {"level": _Key(_choice(LogLevel), LogLevel.INFO)}


_DISK_FILE: Final = "an absolute path (a file or a block device)"
_QEMU_NAME: Final = "a QEMU id: a letter, then letters, digits, '_', '.' or '-' (at most 31)"
DISK_KEYS: Final[Mapping[str, _Key]] = {
    "image": _Key(_absolute_path, allowed=_DISK_FILE + ": this host's copy of the disk"),
    "active": _Key(_absolute_path, allowed="an absolute path: the secondary's active disk"),
    "hidden": _Key(_absolute_path, allowed="an absolute path: the secondary's hidden disk"),
    "format": _Key(_choice(DiskFormat), DiskFormat.RAW),
    "nbd_port": _Key(_integer(1, 65535, "a TCP port from 1 to 65535"), 8889),
    "drive": _Key(_pattern(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", _QEMU_NAME), "colo-disk0"),
    "export": _Key(_pattern(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", _QEMU_NAME), "parent0"),
    "sync_timeout_ms": _Key(
        _integer(1000, 86400000, "an integer of milliseconds from 1000 to 86400000"), 600000
    ),
}


def _tcp_address(value: object) -> object:
    """ "host:port" -> (host, port), port 1 to 65535 (QEMU's chardev needs a real port)."""
    allowed = "HOST:PORT (an address or host name, IPv6 in brackets; port 1 to 65535)"
    try:
        host, port = typing.cast(tuple[str, int], _listen(value))
    except _BadError:
        raise _bad(allowed, value) from None
    if port == 0:
        raise _bad(allowed, value)
    return (host, port)


CHARDEV_SOCKET_KEYS: Final[Mapping[str, _Key]] = {
    "unix": _Key(_optional(_socket_path), None),
    "tcp": _Key(_optional(_tcp_address), None),
    "server": _Key(
        _boolean,
        allowed="true (coloproxy listens, QEMU's chardev connects) or false (coloproxy connects)",
    ),
    "allow": _Key(None, None, allowed="a list of addresses or networks"),
}
_CHARDEV_SOCKET: Final = "a mapping with unix (a path) or tcp (HOST:PORT), and server"
CHARDEV_KEYS: Final[Mapping[str, _Key]] = {
    "primary_in": _Key(None, allowed=_CHARDEV_SOCKET),
    "secondary_in": _Key(None, allowed=_CHARDEV_SOCKET),
    "outdev": _Key(None, allowed=_CHARDEV_SOCKET),
    "notify": _Key(None, None, allowed=_CHARDEV_SOCKET),
    "vnet_hdr": _Key(_boolean, False),
    "reconnect_ms": _Key(
        _integer(1, 3600000, "a positive integer of milliseconds, at most 3600000"), 1000
    ),
    "outdev_buffer_bytes": _Key(
        _integer(1 << 16, 1 << 30, "a number of bytes from 65536 to 1073741824"), 16 << 20
    ),
    "group": _Key(_optional(_group), None),
}


def _compare_keys() -> dict[str, _Key]:
    """One key per CompareConfig field, the rule from its annotation, the default its own."""
    hints = typing.get_type_hints(CompareConfig)
    keys: dict[str, _Key] = {}
    for item in dataclasses.fields(CompareConfig):
        annotation = hints[item.name]
        rule: Rule | None
        if isinstance(annotation, type) and issubclass(annotation, StrEnum):
            rule = _choice(annotation)
        elif annotation is float:
            rule = _seconds
        elif annotation == float | None:
            rule = _optional(_seconds)
        elif annotation is int:
            rule = _integer(1, MAX_COUNT, "a positive integer")
        elif item.name == "passthrough":
            rule = None
        else:  # a new kind of comparator setting: teach this function about it
            raise TypeError(f"CompareConfig.{item.name}: no YAML rule for {annotation!r}")
        default = item.default if item.default is not dataclasses.MISSING else ()
        keys[item.name] = _Key(rule, default)
    return keys


COMPARE_KEYS: Final[Mapping[str, _Key]] = _compare_keys()

SECTIONS: Final[Mapping[str, Mapping[str, _Key]]] = {
    "pair": PAIR_KEYS,
    "net": NET_KEYS,
    "queues": QUEUES_KEYS,
    "compare": COMPARE_KEYS,
    "control": CONTROL_KEYS,
    "metrics": METRICS_KEYS,
    "engine": ENGINE_KEYS,
    "log": LOG_KEYS,
    "chardev": CHARDEV_KEYS,
    "disk": DISK_KEYS,
}
REQUIRED_SECTIONS: Final = frozenset({"pair", "net"})


# -- the walk --------------------------------------------------------------------------------


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


@dataclass(slots=True)
class _Read:
    """One mapping, read: checked values (defaults filled in), the nodes of nested keys, and
    the line of every key present."""

    values: dict[str, object]
    nested: dict[str, Node]
    lines: dict[str, int]
    line: int  # the line to blame for the mapping as a whole (its key's)

    def line_of(self, name: str) -> int:
        return self.lines.get(name, self.line)


class _Reader:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[tuple[int, int, str]] = []  # (line, order, text)
        self._constructor = yaml.SafeLoader("")

    def problem(self, line: int, key: str, message: str) -> None:
        where = f"key '{key}': " if key else ""
        self.problems.append(
            (line, len(self.problems), f"{self.filename}:{line}: {where}{message}")
        )

    def shown(self, node: Node) -> str:
        """A node for "got ...": its value if it is a readable scalar."""
        if isinstance(node, ScalarNode):
            if len(node.value) > MAX_SCALAR:
                return f"a value of {len(node.value)} characters"
            try:
                return _shown(self._constructor.construct_object(node, deep=True))
            except (yaml.YAMLError, ValueError, ArithmeticError):
                return _shown(str(node.value))
        return "a list" if isinstance(node, SequenceNode) else "a mapping"

    def scalar(self, node: Node, key: str) -> tuple[bool, object]:
        """The plain value of a node; lists and mappings become [] / {} stand-ins so that
        rules can say "got a list"."""
        if isinstance(node, SequenceNode):
            return True, []
        if isinstance(node, MappingNode):
            return True, {}
        if isinstance(node, ScalarNode) and len(node.value) > MAX_SCALAR:
            self.problem(
                _line(node), key, f"a value of {len(node.value)} characters; at most {MAX_SCALAR}"
            )
            return False, None
        try:
            return True, self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None
            self.problem(_line(node), key, f"unreadable value: {_one_line(problem or str(exc))}")
            return False, None
        except (ValueError, ArithmeticError) as exc:
            # PyYAML's constructors raise these for an explicit tag on a value that does not
            # fit it (!!int abc, !!timestamp 2020-99-99).
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            self.problem(
                _line(node),
                key,
                f"unreadable value: {_shown(str(node.value))} is not a valid {tag}"
                f" ({_one_line(str(exc))})",
            )
            return False, None

    def mapping(
        self, node: Node | None, key: str, keys: Mapping[str, _Key], line: int
    ) -> _Read | None:
        """Read a mapping against ``keys``; None (and a problem) if it is no mapping. A
        missing or null node is an empty mapping."""
        if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
            node = MappingNode("tag:yaml.org,2002:map", [])
        if not isinstance(node, MappingNode):
            self.problem(
                line, key, f"expected a mapping ({', '.join(keys)}), got {self.shown(node)}"
            )
            return None
        read = _Read({}, {}, {}, line)
        for key_node, value_node in node.value:
            key_line = _line(key_node)
            if not isinstance(key_node, ScalarNode):
                self.problem(key_line, key, "keys must be plain names")
                continue
            name = str(key_node.value)
            dotted = f"{key}.{_cut(name)}" if key else _cut(name)
            if name in read.lines:
                self.problem(key_line, dotted, f"duplicate key (first at line {read.lines[name]})")
                continue
            read.lines[name] = key_line
            spec = keys.get(name)
            if spec is None:
                close = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ";"
                self.problem(key_line, dotted, f"unknown key{hint} allowed keys: {', '.join(keys)}")
                continue
            if spec.rule is None:
                read.nested[name] = value_node
                continue
            readable, value = self.scalar(value_node, dotted)
            if not readable:
                continue
            try:
                read.values[name] = spec.rule(value)
            except _BadError as exc:
                self.problem(key_line, dotted, str(exc))
        for name, spec in keys.items():
            if name in read.lines:
                continue
            if spec.required:
                dotted = f"{key}.{name}" if key else name
                self.problem(line, dotted, f"missing; expected {spec.allowed or 'a value'}")
            elif spec.rule is not None:
                read.values[name] = spec.default
        return read

    def sequence(
        self, node: Node, key: str, line: int, most: int = MAX_ENTRIES, items: str = "items"
    ) -> list[Node] | None:
        """A list of at most ``most`` ``items``; None (and a problem) otherwise."""
        if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
            return []
        if not isinstance(node, SequenceNode):
            self.problem(line, key, f"expected a list, got {self.shown(node)}")
            return None
        if len(node.value) > most:
            self.problem(line, key, f"{len(node.value)} {items}; at most {most}")
            return None
        return list(node.value)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError([text for _, _, text in sorted(self.problems)])


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a configuration file; :class:`ConfigError` lists every problem."""
    filename = os.fspath(path)
    return parse_config(_read_file(filename), filename)


_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(filename: str, mode: int) -> ConfigError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
    return ConfigError([f"{filename}: not a regular file ({kind})"])


def _read_file(filename: str) -> str:
    """The text of a regular file of at most ``MAX_CONFIG_BYTES``. Opened without waiting
    (O_NONBLOCK: a FIFO nobody writes to would block open() for ever) and refused unless
    fstat says it is a regular file (a FIFO or /dev/zero would be read for ever)."""
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        # A socket cannot be opened at all (ENXIO): say what it is rather than why.
        with contextlib.suppress(OSError):
            mode = os.stat(filename).st_mode
            if not stat.S_ISREG(mode):
                raise _not_regular(filename, mode) from exc
        raise ConfigError([f"{filename}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(filename, info.st_mode)
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                [f"{filename}: {info.st_size} bytes; a configuration file is at most"
                 f" {MAX_CONFIG_BYTES}"]
            )  # fmt: skip
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:  # the file may grow while it is read
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                [f"{filename}: more than {MAX_CONFIG_BYTES} bytes; a configuration file is at"
                 f" most {MAX_CONFIG_BYTES}"]
            )  # fmt: skip
    except OSError as exc:
        raise ConfigError([f"{filename}: cannot read: {exc.strerror or exc}"]) from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"{filename}:{line}: not UTF-8: byte 0x{data[exc.start]:02x} at byte {exc.start}:"
             f" {exc.reason}"]
        ) from exc  # fmt: skip


class _LimitError(Exception):
    """The file passes a bound of the reader (module docstring) at ``line``."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    """The safe loader whose composer counts what it builds (module docstring). PyYAML's
    scanner and parser keep their state in lists; only the composer recurses, once per
    level, so bounding it here bounds the stack."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._values = 0
        self._weights: dict[int, int] = {}  # id(anchored node) -> values it stands for

    def _count(self, values: int, line: int) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise _LimitError(line, f"more than {MAX_VALUES} values, aliases counted at each use")

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        line = int(event.start_mark.line) + 1 if event.start_mark is not None else 1
        if parent is not None and len(parent.value) >= MAX_ENTRIES:
            raise _LimitError(line, f"a list or mapping of more than {MAX_ENTRIES} entries")
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)  # None: PyYAML reports it below
            self._count(self._weights.get(id(anchored), 1), line)
            return super().compose_node(parent, index)
        collection = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        if collection and self._depth >= MAX_DEPTH:
            raise _LimitError(line, f"nested deeper than {MAX_DEPTH} levels")
        before = self._values
        self._count(1, line)
        self._depth += collection
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= collection
        if node is not None and getattr(event, "anchor", None) is not None:
            self._weights[id(node)] = self._values - before
        return node


def _compose(text: str) -> Node | None:
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Check a configuration given as text; ``filename`` is what messages call it."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{filename}: {len(text)} characters; a configuration is at most {MAX_CONFIG_BYTES}"]
        )
    try:
        root = _compose(text)
    except _LimitError as exc:
        raise ConfigError([f"{filename}:{exc.line}: {exc.message}"]) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "unreadable"
        if exc.problem and exc.context and not exc.context.startswith("while"):
            problem = f"{exc.context}, {exc.problem}"  # "expected a single document, but..."
        raise ConfigError([f"{filename}:{line}: not valid YAML: {_one_line(problem)}"]) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, ...)
        line = text.count("\n", 0, exc.position) + 1
        problem = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise ConfigError([f"{filename}:{line}: not valid YAML: {_one_line(problem)}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{filename}:1: not valid YAML: {_one_line(str(exc))}"]) from exc
    reader = _Reader(filename)
    top = reader.mapping(root, "", {name: _Key(None, None) for name in SECTIONS}, 1)
    config = _Builder(reader, top).build() if top is not None else None
    reader.raise_if_any()
    if config is None:  # every path to None records a problem first
        raise UsageError(f"{filename}: rejected without a reason (a bug in coloproxy.config)")
    return dataclasses.replace(config, path=filename)


class _Builder:
    """Reads each section and builds the dataclasses (only when nothing is wrong)."""

    def __init__(self, reader: _Reader, top: _Read) -> None:
        self.reader = reader
        self.top = top
        self.queues_read: _Read | None = None

    def section(self, name: str) -> _Read | None:
        keys = SECTIONS[name]
        if name not in self.top.nested and name in REQUIRED_SECTIONS:
            needed = ", ".join(key for key, spec in keys.items() if spec.required)
            self.reader.problem(1, name, f"missing; expected a mapping with {needed}")
            return None
        return self.reader.mapping(self.top.nested.get(name), name, keys, self.top.line_of(name))

    def build(self) -> Config | None:
        pair = self.section("pair")
        net = self.section("net")
        compare = self.section("compare")
        control = self.section("control")
        metrics = self.section("metrics")
        engine = self.section("engine")
        log = self.section("log")
        role = pair.values.get("role") if pair is not None else None
        queues = self._queues(role)
        replication = self._replication(net)
        compare_config = self._compare(compare)
        chardev = self._chardev(role, compare)
        if chardev is not None:
            queues = None  # the chardev transport replaces the queues
            if compare_config is not None:
                compare_config = dataclasses.replace(
                    compare_config,
                    framing=Framing.ETHERNET,
                    # QEMU's filter-rewriter is part of the QEMU-filters wiring.
                    secondary_seq=compare_config.secondary_seq
                    if compare is not None and "secondary_seq" in compare.lines
                    else SecondarySeq.REWRITTEN,
                )
        lan_heartbeat = self._engine(engine, role)
        object_ids = self._object_ids(engine)
        quorum = self._quorum(engine)
        disk = self._disk(engine)
        if role is Role.PRIMARY and queues is not None and compare_config is not None:
            self._held_within_queue(queues, compare_config, compare)
        if (
            self.reader.problems
            or pair is None
            or net is None
            or control is None
            or metrics is None
            or engine is None
            or log is None
            or replication is None
            or compare_config is None
            or (queues is None and role is Role.PRIMARY and chardev is None)
        ):
            return None
        pair_config = PairConfig(**pair.values)  # type: ignore[arg-type]  # rules typed them
        control_values = dict(control.values)
        if control_values["socket"] is None:
            control_values["socket"] = DEFAULT_SOCKET_DIR / f"{pair_config.name}.sock"
        host, port = typing.cast(tuple[str, int], metrics.values["listen"])
        return Config(
            path="",
            pair=pair_config,
            net=NetConfig(replication=replication, **net.values),  # type: ignore[arg-type]
            queues=queues,
            compare=compare_config,
            control=ControlConfig(**control_values),  # type: ignore[arg-type]
            metrics=MetricsConfig(host=host, port=port, enabled=bool(metrics.values["enabled"])),
            engine=EngineConfig(
                **engine.values,  # type: ignore[arg-type]
                lan_heartbeat=lan_heartbeat,
                failover_object_del=object_ids,
                quorum=quorum,
            ),
            log=LogConfig(**log.values),  # type: ignore[arg-type]
            chardev=chardev,
            disk=disk,
        )

    def _disk(self, engine: _Read | None) -> DiskConfig | None:
        """The ``disk`` section, and its checks across sections (the engine drives it)."""
        if "disk" not in self.top.nested:
            return None
        line = self.top.line_of("disk")
        read = self.section("disk")
        if read is None:
            return None
        if engine is not None and engine.values.get("qmp") is None:
            self.reader.problem(
                line,
                "disk",
                "needs engine.qmp: the checkpoint engine drives the block replication"
                ' (docs/engine.md, "The disk")',
            )
        seen: dict[object, str] = {}
        for name in ("image", "active", "hidden"):
            path = read.values.get(name)
            if path is None:
                continue
            if path in seen:
                self.reader.problem(
                    read.line_of(name), f"disk.{name}", f"same file as disk.{seen[path]}"
                )
            seen[path] = name
        if read.values.get("drive") == read.values.get("export") and "drive" in read.values:
            blamed = "export" if "export" in read.lines else "drive"
            self.reader.problem(
                read.line_of(blamed), f"disk.{blamed}", "disk.drive and disk.export must differ"
            )
        uri = engine.values.get("migrate_uri") if engine is not None else None
        port = read.values.get("nbd_port")
        if isinstance(uri, str) and uri.startswith("tcp:") and uri.rsplit(":", 1)[-1] == str(port):
            self.reader.problem(
                read.line_of("nbd_port"),
                "disk.nbd_port",
                f"{port} is engine.migrate_uri's port: the secondary's NBD export and its"
                " -incoming listen on the same address",
            )
        if any(name not in read.values for name in DISK_KEYS):
            return None  # a missing or bad value, reported already
        return DiskConfig(**read.values)  # type: ignore[arg-type]  # the rules typed them

    def _held_within_queue(
        self, queues: QueuesConfig, compare: CompareConfig, compare_read: _Read | None
    ) -> None:
        """Host P holds PVM packets in the kernel's queue: a queue no longer than the
        comparator's bound lets the kernel drop what the comparator means to hold, where the
        bound would have led to an overflow checkpoint (I2, docs/configuration.md)."""
        if queues.max_len > compare.max_held_packets:
            return
        why = "the kernel would drop PVM packets the comparator means to hold (I2)"
        read = self.queues_read
        if (read is not None and "max_len" in read.lines) or compare_read is None:
            line = read.line_of("max_len") if read is not None else 1
            self.reader.problem(
                line,
                "queues.max_len",
                f"must be above compare.max_held_packets ({compare.max_held_packets}): {why}",
            )
        else:
            self.reader.problem(
                compare_read.line_of("max_held_packets"),
                "compare.max_held_packets",
                f"must be below queues.max_len ({queues.max_len}): {why}",
            )

    def _queues(self, role: object) -> QueuesConfig | None:
        read = self.section("queues")
        self.queues_read = read
        if read is None:
            return None
        # Each role binds its own queues (docs/data-path.md); naming the other role's in a
        # file is a mistake worth saying (host P's S-in queue moved to host S in 0.3).
        own, other = QUEUE_ROLES[Role.PRIMARY], QUEUE_ROLES[Role.SECONDARY]
        if role is Role.SECONDARY:
            own, other = other, own
        for name in other:
            if name in read.lines:
                self.reader.problem(
                    read.line_of(name),
                    f"queues.{name}",
                    f"is a queue of the other role's host; role {role} uses {', '.join(own)}",
                )
        numbers: dict[object, str] = {}
        for name in own:
            number = read.values.get(name)
            if number is None:
                continue
            if number in numbers:
                self.reader.problem(
                    read.line_of(name),
                    f"queues.{name}",
                    f"queue {number} is also queues.{numbers[number]}",
                )
            numbers[number] = name
        return QueuesConfig(**read.values)  # type: ignore[arg-type]

    def _chardev(self, role: object, compare: _Read | None) -> ChardevConfig | None:
        """The chardev transport's section, and its checks across sections."""
        if "chardev" not in self.top.nested:
            return None
        line = self.top.line_of("chardev")
        if role is Role.SECONDARY:
            self.reader.problem(
                line, "chardev", "only a primary has the chardev transport (role is secondary)"
            )
            return None
        if "queues" in self.top.nested:
            self.reader.problem(
                self.top.line_of("queues"),
                "queues",
                "a primary with the chardev transport has no queues (give chardev or queues)",
            )
        if compare is not None and compare.values.get("framing") is Framing.IP:
            if "framing" in compare.lines:
                self.reader.problem(
                    compare.line_of("framing"),
                    "compare.framing",
                    "must be ethernet with the chardev transport (QEMU's chardevs carry "
                    "Ethernet frames), got 'ip'",
                )
        read = self.section("chardev")
        if read is None:
            return None
        sockets: dict[str, ChardevSocket] = {}
        seen: dict[object, str] = {}
        for name in ("primary_in", "secondary_in", "outdev", "notify"):
            node = read.nested.get(name)
            if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
                continue  # a missing required socket is reported by the mapping's read
            key = f"chardev.{name}"
            chardev_socket = self._chardev_socket(node, key, read.line_of(name))
            if chardev_socket is None:
                continue
            address = (
                chardev_socket.path
                if chardev_socket.path is not None
                else (chardev_socket.host, chardev_socket.port)
            )
            if address in seen:
                self.reader.problem(
                    read.line_of(name), key, f"same address as chardev.{seen[address]}"
                )
            seen[address] = name
            sockets[name] = chardev_socket
        if any(name not in sockets for name in ("primary_in", "secondary_in", "outdev")):
            return None
        return ChardevConfig(
            primary_in=sockets["primary_in"],
            secondary_in=sockets["secondary_in"],
            outdev=sockets["outdev"],
            notify=sockets.get("notify"),
            **read.values,  # type: ignore[arg-type]  # the rules typed them
        )

    def _chardev_socket(self, node: Node, key: str, line: int) -> ChardevSocket | None:
        read = self.reader.mapping(node, key, CHARDEV_SOCKET_KEYS, line)
        if read is None:
            return None
        # Written and not null; a value that broke its rule is reported already.
        written = [
            name
            for name in ("unix", "tcp")
            if name in read.lines and (name not in read.values or read.values[name] is not None)
        ]
        given = [name for name in written if read.values.get(name) is not None]
        if len(written) != 1:
            shown = " and ".join(written) if written else "neither"
            self.reader.problem(
                line, key, f"give exactly one of unix (a path) or tcp (HOST:PORT), got {shown}"
            )
            return None
        if len(given) != 1 or "server" not in read.values:
            return None  # a bad or missing value, reported already
        path, address = read.values.get("unix"), read.values.get("tcp")
        server = bool(read.values["server"])
        allow = self._allow(read, key, address is not None and server)
        if allow is None:
            return None
        if address is not None:
            host, port = typing.cast(tuple[str, int], address)
            if server and not _is_ip(host):
                # asyncio binds every address a name resolves to.
                self.reader.problem(
                    read.line_of("tcp"),
                    f"{key}.tcp",
                    f"a listening socket binds one address: give an IP address, not the host"
                    f" name {host!r}",
                )
                return None
            return ChardevSocket(server=server, host=host, port=port, allow=allow)
        return ChardevSocket(server=server, path=typing.cast(Path, path))

    def _allow(self, read: _Read, key: str, listening_tcp: bool) -> tuple[IPNetwork, ...] | None:
        """``allow``: the peers a listening TCP socket accepts (addresses or networks)."""
        node = read.nested.get("allow")
        if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
            return ()
        key, line = f"{key}.allow", read.line_of("allow")
        if not listening_tcp:
            self.reader.problem(
                line,
                key,
                "only a listening TCP socket (tcp, server: true) has an allow list; a unix"
                " socket is kept to its owner (and chardev.group) by its mode",
            )
            return None
        items = self.reader.sequence(node, key, line, MAX_ALLOW, "entries")
        if items is None:
            return None
        networks: list[IPNetwork] = []
        for index, item in enumerate(items):
            readable, value = self.reader.scalar(item, f"{key}[{index}]")
            if not readable:
                return None
            try:
                if not isinstance(value, str):
                    raise ValueError
                networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                self.reader.problem(
                    _line(item),
                    f"{key}[{index}]",
                    f"expected an IP address or a network (10.0.0.0/24), got {_shown(value)}",
                )
                return None
        if not networks:
            self.reader.problem(line, key, "an empty list would refuse every peer")
            return None
        return tuple(networks)

    def _replication(self, net: _Read | None) -> ReplicationConfig | None:
        if net is None or "replication" not in net.nested:
            return None
        return self._addresses(
            net.nested["replication"], "net.replication", net.line_of("replication")
        )

    def _addresses(self, node: Node, key: str, line: int) -> ReplicationConfig | None:
        """A mapping of this host's and the peer's address on one network."""
        read = self.reader.mapping(node, key, REPLICATION_KEYS, line)
        if read is None or "local" not in read.values or "remote" not in read.values:
            return None
        local = typing.cast(IPAddress, read.values["local"])
        remote = typing.cast(IPAddress, read.values["remote"])
        if local.version != remote.version:
            self.reader.problem(line, key, "local and remote must both be IPv4 or both IPv6")
        elif local == remote:
            self.reader.problem(line, key, f"local and remote are both {local}")
        return ReplicationConfig(local=local, remote=remote)

    def _engine(self, engine: _Read | None, role: object) -> ReplicationConfig | None:
        """Checks across the engine's keys; the LAN heartbeat path."""
        if engine is None:
            return None
        values = engine.values
        if role is Role.SECONDARY and values.get("migrate_uri") is not None:
            self.reader.problem(
                engine.line_of("migrate_uri"),
                "engine.migrate_uri",
                "only a primary migrates (role is secondary)",
            )
        if values.get("qmp") is not None and values.get("heartbeat_key") is None:
            self.reader.problem(
                engine.line_of("qmp"),
                "engine.heartbeat_key",
                "missing; an engine (engine.qmp) needs the file of the key that"
                " authenticates its heartbeats (docs/engine.md)",
            )
        interval, timeout = values.get("heartbeat_interval_ms"), values.get("failover_timeout_ms")
        if isinstance(interval, int) and isinstance(timeout, int) and timeout <= interval:
            self.reader.problem(
                engine.line_of("failover_timeout_ms"),
                "engine.failover_timeout_ms",
                f"must be longer than engine.heartbeat_interval_ms ({interval})",
            )
        node = engine.nested.get("lan_heartbeat")
        if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
            return None
        return self._addresses(node, "engine.lan_heartbeat", engine.line_of("lan_heartbeat"))

    def _quorum(self, engine: _Read | None) -> QuorumConfig | None:
        """``engine.quorum``: None (and no problem) when absent, the two-host mode."""
        if engine is None or "quorum" not in engine.nested:
            return None
        key, line = "engine.quorum", engine.line_of("quorum")
        read = self.reader.mapping(engine.nested["quorum"], key, QUORUM_KEYS, line)
        if read is None or "service" not in read.values:
            return None
        values = dict(read.values)
        endpoints: list[tuple[str, int]] = []
        if "endpoints" in read.nested:
            at = read.line_of("endpoints")
            items = self.reader.sequence(
                read.nested["endpoints"], f"{key}.endpoints", at, MAX_ENDPOINTS, "endpoints"
            )
            for index, item in enumerate(items or ()):
                readable, value = self.reader.scalar(item, f"{key}.endpoints[{index}]")
                if not readable:
                    continue
                try:
                    endpoints.append(typing.cast(tuple[str, int], _tcp_address(value)))
                except _BadError as exc:
                    self.reader.problem(_line(item), f"{key}.endpoints[{index}]", str(exc))
        values.pop("endpoints", None)
        service = values["service"]
        if service is QuorumService.ETCD and not endpoints and "endpoints" not in read.nested:
            self.reader.problem(line, f"{key}.endpoints", "missing; etcd needs its endpoints")
        ttl, renew, margin = values["ttl_ms"], values["renew_ms"], values["margin_ms"]
        if isinstance(ttl, int) and isinstance(renew, int) and isinstance(margin, int):
            if margin >= ttl or renew >= ttl - margin:
                self.reader.problem(
                    read.line_of("margin_ms"),
                    key,
                    f"renew_ms ({renew}) must be shorter than ttl_ms ({ttl}) less margin_ms"
                    f" ({margin})",
                )
        if (values["cert_file"] is None) != (values["key_file"] is None):
            self.reader.problem(line, key, "cert_file and key_file go together")
        if (values["user"] is None) != (values["password_file"] is None):
            self.reader.problem(line, key, "user and password_file go together")
        return QuorumConfig(endpoints=tuple(endpoints), **values)  # type: ignore[arg-type]

    def _object_ids(self, engine: _Read | None) -> tuple[str, ...]:
        """``engine.failover_object_del``: QEMU object ids (QEMU's id_wellformed: a letter,
        then letters, digits, '-', '.', '_')."""
        if engine is None or "failover_object_del" not in engine.nested:
            return ()
        key = "engine.failover_object_del"
        line = engine.line_of("failover_object_del")
        items = self.reader.sequence(
            engine.nested["failover_object_del"], key, line, MAX_OBJECT_IDS, "ids"
        )
        ids: list[str] = []
        for index, item in enumerate(items or ()):
            readable, value = self.reader.scalar(item, f"{key}[{index}]")
            if not readable:
                continue
            if not isinstance(value, str) or not _QEMU_ID.fullmatch(value):
                self.reader.problem(
                    _line(item),
                    f"{key}[{index}]",
                    f"expected a QEMU object id (a letter, then letters, digits, '-', '.' or"
                    f" '_'), got {_shown(value)}",
                )
                continue
            ids.append(value)
        return tuple(ids)

    def _passthrough(self, compare: _Read) -> tuple[PassthroughRule, ...] | None:
        if "passthrough" not in compare.nested:
            return ()
        line = compare.line_of("passthrough")
        items = self.reader.sequence(
            compare.nested["passthrough"], "compare.passthrough", line, MAX_PASSTHROUGH, "rules"
        )
        if items is None:
            return None
        rules = []
        for index, item in enumerate(items):
            key = f"compare.passthrough[{index}]"
            read = self.reader.mapping(item, key, PASSTHROUGH_KEYS, _line(item))
            if read is None:
                continue
            try:
                rules.append(PassthroughRule(**read.values))  # type: ignore[arg-type]
            except UsageError as exc:  # its own checks, should ours ever fall behind
                self.reader.problem(_line(item), key, str(exc))
        return tuple(rules)

    def _compare(self, compare: _Read | None) -> CompareConfig | None:
        if compare is None:
            return None
        passthrough = self._passthrough(compare)
        if passthrough is None:
            return None
        try:
            return CompareConfig(**compare.values, passthrough=passthrough)  # type: ignore[arg-type]
        except UsageError as exc:
            # Our rules mirror the comparator's; if it still refuses, blame the section.
            self.reader.problem(compare.line, "compare", str(exc))
            return None


# A key file holds a secret, not a document: bound what is read.
MAX_KEY_BYTES: Final = 4096


def read_key_file(path: str, key: str, least: int = MIN_HEARTBEAT_KEY_BYTES) -> bytes:
    """The secret in ``path`` (config key ``key``): its bytes, a final newline stripped.
    Refused (:class:`ConfigError`, one line saying why) unless it is a regular file that no
    group or other user may read or write (mode 0600 or 0400), and of at least
    ``least`` bytes."""

    def bad(why: str) -> ConfigError:
        return ConfigError([f"{path} ({key}): {why}"])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise bad("not a regular file")
        if info.st_mode & 0o077:
            raise bad(
                f"mode {stat.S_IMODE(info.st_mode):04o} lets other users read or change the"
                f" key; chmod 600 {path}"
            )
        data = os.read(fd, MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise bad(f"more than {MAX_KEY_BYTES} bytes; a key file holds one secret")
    secret = data[:-1] if data.endswith(b"\n") else data
    if len(secret) < least:
        raise bad(
            f"{len(secret)} bytes; at least {least} (e.g. head -c 32 /dev/urandom | base64 >"
            f" {path})"
        )
    return secret


def check_files(config: Config) -> list[str]:
    """What ``check-config`` checks beyond the text: the files the config names that the
    daemon reads at start (secrets: present, private, long enough; certificates: present)."""
    problems: list[str] = []
    secrets = [(config.engine.heartbeat_key, "engine.heartbeat_key", MIN_HEARTBEAT_KEY_BYTES)]
    quorum = config.engine.quorum
    if quorum is not None:
        secrets += [
            (quorum.key_file, "engine.quorum.key_file", 1),
            (quorum.password_file, "engine.quorum.password_file", 1),
        ]
        for path, name in ((quorum.ca_file, "ca_file"), (quorum.cert_file, "cert_file")):
            if path is not None and not os.path.isfile(path):
                problems.append(f"{path} (engine.quorum.{name}): not a readable file")
    for path, name, least in secrets:
        if path is None:
            continue
        try:
            read_key_file(path, name, least)
        except ConfigError as exc:
            problems.extend(exc.problems)
    disk = config.disk
    if disk is not None:
        # The QEMU of this host opens these when it starts: the image always, the active and
        # hidden disks when it starts as the secondary.
        wanted = [(disk.image, "disk.image")]
        if config.pair.role is Role.SECONDARY:
            wanted += [(disk.active, "disk.active"), (disk.hidden, "disk.hidden")]
        for path, name in wanted:
            if not os.path.exists(path):
                problems.append(f"{path} ({name}): does not exist")
    return problems


def describe(config: Config) -> str:
    """The one line ``check-config`` prints for a good file."""
    return f"{config.path}: ok (pair {config.pair.name}, role {config.pair.role})"
