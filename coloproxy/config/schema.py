"""The schema of the configuration file: each section a table of keys, each key a rule
(coloproxy.config.rules) with a default or "required" (shell).

The ``compare`` section is derived from :class:`coloproxy.compare.CompareConfig` itself
(field names, types and defaults), so a new comparator setting is configurable without an
edit here; the comparator's own validation still runs (coloproxy.config.build).

A key whose rule is None is a nested section or list, read by coloproxy.config.build; the
``MAX_*`` bounds here are the lengths of those lists.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from coloproxy.compare.config import CompareConfig
from coloproxy.config.model import DiskFormat, LogLevel, QuorumService, Transport
from coloproxy.config.rules import (
    MAX_COUNT,
    Rule,
    absolute_path,
    address,
    boolean,
    choice,
    group,
    integer,
    interface,
    listen,
    network,
    optional,
    passthrough_protocol,
    pattern,
    seconds,
    socket_path,
    tcp_address,
)
from coloproxy.protocol import ClientRole
from coloproxy.role import Role

MAX_PASSTHROUGH: Final = 256  # compare.passthrough rules: each is tried for every new flow
MAX_OBJECT_IDS: Final = 64  # engine.failover_object_del
MAX_ALLOW: Final = 64  # chardev.*.allow
MAX_ENDPOINTS: Final = 16  # engine.quorum.endpoints

REQUIRED: Final = object()  # the default of a key that must be given


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a section: its rule, and its default or :data:`REQUIRED`."""

    rule: Rule | None  # None: a nested section, handled by its own reader
    default: object = REQUIRED
    allowed: str = ""  # for "missing" messages; defaults to the rule's own wording

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


_PAIR_NAME: Final = "a name of 1 to 12 characters a-z, 0-9 and '-'"
_PREFIX: Final = "1 to 5 characters a-z and 0-9, starting with a letter"
_QUEUE: Final = integer(0, 65535, "a queue number from 0 to 65535")

PAIR_KEYS: Final[Mapping[str, Key]] = {
    "name": Key(pattern(r"[a-z0-9-]{1,12}", _PAIR_NAME), allowed=_PAIR_NAME),
    "role": Key(choice(Role), allowed="one of primary, secondary"),
}
REPLICATION_KEYS: Final[Mapping[str, Key]] = {
    "local": Key(address, allowed="an IPv4 or IPv6 address (this host on the link)"),
    "remote": Key(address, allowed="an IPv4 or IPv6 address (the peer host on the link)"),
}
NET_KEYS: Final[Mapping[str, Key]] = {
    "prefix": Key(pattern(r"[a-z][a-z0-9]{0,4}", _PREFIX), "cp"),
    "guest_port": Key(interface, allowed="an interface name (the host side of the guest's NIC)"),
    "lan_bridge": Key(optional(interface), None),
    "replication": Key(None, allowed="a mapping with local and remote"),
    "vxlan_id": Key(integer(1, 16777215), 77),
    "vxlan_port": Key(integer(1, 65535), 4789),
    "underlay": Key(optional(interface), None),
    "rules_check_ms": Key(integer(0, 3600000), 5000),
}
# The queues each role binds (the rest of the section is shared settings).
QUEUE_ROLES: Final[Mapping[Role, tuple[str, ...]]] = {
    Role.PRIMARY: ("primary_out", "secondary_out", "primary_split"),
    Role.SECONDARY: ("secondary_in", "secondary_egress"),
}
QUEUES_KEYS: Final[Mapping[str, Key]] = {
    "primary_out": Key(_QUEUE, 10),
    "secondary_out": Key(_QUEUE, 11),
    "secondary_in": Key(_QUEUE, 12),
    "secondary_egress": Key(_QUEUE, 13),
    "primary_split": Key(_QUEUE, 14),
    "max_len": Key(integer(1, 1 << 20), 8192),
    "copy_range": Key(integer(64, 65535), 65535),
    "rcvbuf": Key(integer(1 << 16, 1 << 30, "a number of bytes from 65536 to 1073741824"), 8 << 20),
    "transport": Key(choice(Transport), Transport.NETLINK),
}
PASSTHROUGH_KEYS: Final[Mapping[str, Key]] = {
    "protocol": Key(optional(passthrough_protocol), None),
    "guest_port": Key(optional(integer(0, 65535, "a port from 0 to 65535")), None),
    "peer_port": Key(optional(integer(0, 65535, "a port from 0 to 65535")), None),
    "guest_network": Key(optional(network), None),
    "peer_network": Key(optional(network), None),
}
CONTROL_KEYS: Final[Mapping[str, Key]] = {
    "socket": Key(socket_path, None),  # default: /run/coloproxy/<pair>.sock
    "group": Key(optional(group), None),
    "engine_group": Key(optional(group), None),
    "group_role": Key(choice(ClientRole, (ClientRole.CLI, ClientRole.MONITOR)), ClientRole.CLI),
    # At least 2: the last slot is kept for an engine.
    "max_clients": Key(integer(2, 1024), 16),
    "client_queue": Key(integer(1, 1 << 16), 256),
    "idle_timeout_ms": Key(
        integer(0, 2**32 - 1, "a non-negative integer of milliseconds (0: never)"), 60000
    ),
}
METRICS_KEYS: Final[Mapping[str, Key]] = {
    "listen": Key(listen, ("127.0.0.1", 9477)),
    "enabled": Key(boolean, True),
}
QEMU_ID: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_MIGRATE_URI: Final = (
    "a QEMU migration URI (tcp:HOST:PORT, unix:PATH, rdma:, vsock:, exec:, fd: or file:)"
)
_MILLISECONDS: Final = "a positive integer of milliseconds"
ENGINE_KEYS: Final[Mapping[str, Key]] = {
    "qmp": Key(optional(absolute_path), None),
    "period_ms": Key(integer(1, 2**32 - 1, _MILLISECONDS), 20000),
    "min_gap_ms": Key(integer(0, 2**32 - 1, "a non-negative integer of milliseconds"), 100),
    "migrate_uri": Key(
        optional(pattern(r"(?:tcp|unix|rdma|vsock|exec|fd|file):\S+", _MIGRATE_URI)), None
    ),
    "heartbeat_port": Key(integer(1, 65535, "a UDP port from 1 to 65535"), 9478),
    "heartbeat_interval_ms": Key(integer(1, 60000, f"{_MILLISECONDS}, at most 60000"), 50),
    "failover_timeout_ms": Key(integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 300),
    "checkpoint_timeout_ms": Key(integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 10000),
    "bring_up": Key(boolean, True),
    "lan_heartbeat": Key(None, None, allowed="a mapping with local and remote"),
    "heartbeat_key": Key(optional(absolute_path), None),
    "quorum": Key(None, None, allowed="a mapping with service (etcd or two-host)"),
    "failover_object_del": Key(None, None, allowed="a list of QEMU object ids"),
}
QUORUM_KEYS: Final[Mapping[str, Key]] = {
    "service": Key(choice(QuorumService), allowed="one of etcd, two-host"),
    "endpoints": Key(None, None, allowed="a list of HOST:PORT"),
    "prefix": Key(
        pattern(r"/[A-Za-z0-9/_.-]{0,200}", "a key prefix starting with '/'"), "/coloproxy"
    ),
    "ttl_ms": Key(integer(1000, 3600000, "an integer of milliseconds from 1000 to 3600000"), 1000),
    "renew_ms": Key(integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 100),
    "margin_ms": Key(integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 250),
    "retry_ms": Key(integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 20),
    "timeout_ms": Key(integer(1, 3600000, f"{_MILLISECONDS}, at most 3600000"), 250),
    "ca_file": Key(optional(absolute_path), None),
    "cert_file": Key(optional(absolute_path), None),
    "key_file": Key(optional(absolute_path), None),
    "user": Key(optional(pattern(r"[^\s:]{1,64}", "an etcd user name")), None),
    "password_file": Key(optional(absolute_path), None),
}
LOG_KEYS: Final[Mapping[str, Key]] = {"level": Key(choice(LogLevel), LogLevel.INFO)}


_DISK_FILE: Final = "an absolute path (a file or a block device)"
_QEMU_NAME: Final = "a QEMU id: a letter, then letters, digits, '_', '.' or '-' (at most 31)"
DISK_KEYS: Final[Mapping[str, Key]] = {
    "image": Key(absolute_path, allowed=_DISK_FILE + ": this host's copy of the disk"),
    "active": Key(absolute_path, allowed="an absolute path: the secondary's active disk"),
    "hidden": Key(absolute_path, allowed="an absolute path: the secondary's hidden disk"),
    "format": Key(choice(DiskFormat), DiskFormat.RAW),
    "nbd_port": Key(integer(1, 65535, "a TCP port from 1 to 65535"), 8889),
    "drive": Key(pattern(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", _QEMU_NAME), "colo-disk0"),
    "export": Key(pattern(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", _QEMU_NAME), "parent0"),
    "sync_timeout_ms": Key(
        integer(1000, 86400000, "an integer of milliseconds from 1000 to 86400000"), 600000
    ),
}


CHARDEV_SOCKET_KEYS: Final[Mapping[str, Key]] = {
    "unix": Key(optional(socket_path), None),
    "tcp": Key(optional(tcp_address), None),
    "server": Key(
        boolean,
        allowed="true (coloproxy listens, QEMU's chardev connects) or false (coloproxy connects)",
    ),
    "allow": Key(None, None, allowed="a list of addresses or networks"),
}
_CHARDEV_SOCKET: Final = "a mapping with unix (a path) or tcp (HOST:PORT), and server"
CHARDEV_KEYS: Final[Mapping[str, Key]] = {
    "primary_in": Key(None, allowed=_CHARDEV_SOCKET),
    "secondary_in": Key(None, allowed=_CHARDEV_SOCKET),
    "outdev": Key(None, allowed=_CHARDEV_SOCKET),
    "notify": Key(None, None, allowed=_CHARDEV_SOCKET),
    "vnet_hdr": Key(boolean, False),
    "reconnect_ms": Key(
        integer(1, 3600000, "a positive integer of milliseconds, at most 3600000"), 1000
    ),
    "outdev_buffer_bytes": Key(
        integer(1 << 16, 1 << 30, "a number of bytes from 65536 to 1073741824"), 16 << 20
    ),
    "group": Key(optional(group), None),
}


def _compare_keys() -> dict[str, Key]:
    """One key per CompareConfig field, the rule from its annotation, the default its own."""
    hints = typing.get_type_hints(CompareConfig)
    keys: dict[str, Key] = {}
    for item in dataclasses.fields(CompareConfig):
        annotation = hints[item.name]
        rule: Rule | None
        if isinstance(annotation, type) and issubclass(annotation, StrEnum):
            rule = choice(annotation)
        elif annotation is float:
            rule = seconds
        elif annotation == float | None:
            rule = optional(seconds)
        elif annotation is int:
            rule = integer(1, MAX_COUNT, "a positive integer")
        elif item.name == "passthrough":
            rule = None
        else:  # a new kind of comparator setting: teach this function about it
            raise TypeError(f"CompareConfig.{item.name}: no YAML rule for {annotation!r}")
        default = item.default if item.default is not dataclasses.MISSING else ()
        keys[item.name] = Key(rule, default)
    return keys


COMPARE_KEYS: Final[Mapping[str, Key]] = _compare_keys()

SECTIONS: Final[Mapping[str, Mapping[str, Key]]] = {
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
