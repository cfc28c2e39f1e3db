"""Building the configuration: each section read against its table, the checks across keys
and sections, and the frozen dataclasses made only when nothing is wrong (shell).

:func:`load_config` and :func:`parse_config` are the entry points; coloproxy.config.reader
reads the file and collects the problems, coloproxy.config.schema holds the tables.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import typing
from pathlib import Path
from typing import Final

from yaml.nodes import Node, ScalarNode

from coloproxy.compare.config import CompareConfig, Framing, PassthroughRule, SecondarySeq
from coloproxy.config.model import (
    ChardevConfig,
    ChardevSocket,
    Config,
    ControlConfig,
    DiskConfig,
    EngineConfig,
    IPAddress,
    IPNetwork,
    LogConfig,
    MetricsConfig,
    NetConfig,
    PairConfig,
    QueuesConfig,
    QuorumConfig,
    QuorumService,
    ReplicationConfig,
)
from coloproxy.config.problems import shown
from coloproxy.config.reader import Read, Reader, compose, node_line, read_text
from coloproxy.config.rules import BadValueError, is_ip, tcp_address
from coloproxy.config.schema import (
    CHARDEV_SOCKET_KEYS,
    DISK_KEYS,
    MAX_ALLOW,
    MAX_ENDPOINTS,
    MAX_OBJECT_IDS,
    MAX_PASSTHROUGH,
    PASSTHROUGH_KEYS,
    QEMU_ID,
    QUEUE_ROLES,
    QUORUM_KEYS,
    REPLICATION_KEYS,
    REQUIRED_SECTIONS,
    SECTIONS,
    Key,
)
from coloproxy.errors import UsageError
from coloproxy.role import Role

DEFAULT_SOCKET_DIR: Final = Path("/run/coloproxy")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a configuration file; :class:`ConfigError` lists every problem."""
    filename = os.fspath(path)
    return parse_config(read_text(filename), filename)


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Check a configuration given as text; ``filename`` is what messages call it."""
    root = compose(text, filename)
    reader = Reader(filename)
    top = reader.mapping(root, "", {name: Key(None, None) for name in SECTIONS}, 1)
    config = _Builder(reader, top).build() if top is not None else None
    reader.raise_if_any()
    if config is None:  # every path to None records a problem first
        raise UsageError(f"{filename}: rejected without a reason (a bug in coloproxy.config)")
    return dataclasses.replace(config, path=filename)


class _Builder:
    """Reads each section and builds the dataclasses (only when nothing is wrong)."""

    def __init__(self, reader: Reader, top: Read) -> None:
        self.reader = reader
        self.top = top
        self.queues_read: Read | None = None

    def section(self, name: str) -> Read | None:
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

    def _disk(self, engine: Read | None) -> DiskConfig | None:
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
        self, queues: QueuesConfig, compare: CompareConfig, compare_read: Read | None
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

    def _chardev(self, role: object, compare: Read | None) -> ChardevConfig | None:
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
            if server and not is_ip(host):
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

    def _allow(self, read: Read, key: str, listening_tcp: bool) -> tuple[IPNetwork, ...] | None:
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
                    node_line(item),
                    f"{key}[{index}]",
                    f"expected an IP address or a network (10.0.0.0/24), got {shown(value)}",
                )
                return None
        if not networks:
            self.reader.problem(line, key, "an empty list would refuse every peer")
            return None
        return tuple(networks)

    def _replication(self, net: Read | None) -> ReplicationConfig | None:
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

    def _engine(self, engine: Read | None, role: object) -> ReplicationConfig | None:
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

    def _quorum(self, engine: Read | None) -> QuorumConfig | None:
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
                    endpoints.append(typing.cast(tuple[str, int], tcp_address(value)))
                except BadValueError as exc:
                    self.reader.problem(node_line(item), f"{key}.endpoints[{index}]", str(exc))
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

    def _object_ids(self, engine: Read | None) -> tuple[str, ...]:
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
            if not isinstance(value, str) or not QEMU_ID.fullmatch(value):
                self.reader.problem(
                    node_line(item),
                    f"{key}[{index}]",
                    f"expected a QEMU object id (a letter, then letters, digits, '-', '.' or"
                    f" '_'), got {shown(value)}",
                )
                continue
            ids.append(value)
        return tuple(ids)

    def _passthrough(self, compare: Read) -> tuple[PassthroughRule, ...] | None:
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
            read = self.reader.mapping(item, key, PASSTHROUGH_KEYS, node_line(item))
            if read is None:
                continue
            try:
                rules.append(PassthroughRule(**read.values))  # type: ignore[arg-type]
            except UsageError as exc:  # its own checks, should ours ever fall behind
                self.reader.problem(node_line(item), key, str(exc))
        return tuple(rules)

    def _compare(self, compare: Read | None) -> CompareConfig | None:
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
