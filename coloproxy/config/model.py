"""The configuration of one proxy as typed values: frozen dataclasses, one per section of
the file, and the enums of the values a key may take (shell).

coloproxy.config.build makes them from a file; nothing else constructs a :class:`Config`
but tests. docs/configuration.md describes every key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from coloproxy.compare.config import CompareConfig
from coloproxy.protocol import ClientRole
from coloproxy.role import Role

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
