"""Building the configuration: each section read against its table, the checks across keys
and sections, and the frozen dataclasses made only when nothing is wrong (shell).

:func:`load_config` and :func:`parse_config` are the entry points; coloproxy.config.reader
reads the file and collects the problems, coloproxy.config.schema holds the tables. The
sections with most checks of their own have their own modules: ``build_chardev`` (the
chardev transport) and ``build_engine`` (the engine, its quorum, the disk).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Final

from yaml.nodes import Node, ScalarNode

from coloproxy.compare.config import CompareConfig, Framing, PassthroughRule, SecondarySeq
from coloproxy.config.build_chardev import chardev_section
from coloproxy.config.build_engine import (
    check_engine,
    disk_section,
    failover_object_ids,
    quorum_section,
)
from coloproxy.config.model import (
    Config,
    ControlConfig,
    EngineConfig,
    IPAddress,
    LogConfig,
    MetricsConfig,
    NetConfig,
    PairConfig,
    QueuesConfig,
    ReplicationConfig,
)
from coloproxy.config.reader import Read, Reader, Sections, compose, node_line, read_text
from coloproxy.config.schema import (
    MAX_PASSTHROUGH,
    PASSTHROUGH_KEYS,
    QUEUE_ROLES,
    REPLICATION_KEYS,
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
    config = _Builder(Sections(reader, top)).build() if top is not None else None
    reader.raise_if_any()
    if config is None:  # every path to None records a problem first
        raise UsageError(f"{filename}: rejected without a reason (a bug in coloproxy.config)")
    return dataclasses.replace(config, path=filename)


class _Builder:
    """Reads each section and builds the dataclasses (only when nothing is wrong)."""

    def __init__(self, sections: Sections) -> None:
        self.sections = sections
        self.reader = sections.reader
        self.queues_read: Read | None = None

    def build(self) -> Config | None:
        pair = self.sections.section("pair")
        net = self.sections.section("net")
        compare = self.sections.section("compare")
        control = self.sections.section("control")
        metrics = self.sections.section("metrics")
        engine = self.sections.section("engine")
        log = self.sections.section("log")
        role = pair.values.get("role") if pair is not None else None
        queues = self._queues(role)
        replication = self._replication(net)
        compare_config = self._compare(compare)
        chardev = chardev_section(self.sections, role, compare)
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
        check_engine(self.sections, engine, role)
        lan_heartbeat = self._lan_heartbeat(engine)
        object_ids = failover_object_ids(self.sections, engine)
        quorum = quorum_section(self.sections, engine)
        disk = disk_section(self.sections, engine)
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
        read = self.sections.section("queues")
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

    def _replication(self, net: Read | None) -> ReplicationConfig | None:
        if net is None or "replication" not in net.nested:
            return None
        return self._addresses(
            net.nested["replication"], "net.replication", net.line_of("replication")
        )

    def _lan_heartbeat(self, engine: Read | None) -> ReplicationConfig | None:
        """``engine.lan_heartbeat``: a second heartbeat path, on the LAN (None: none)."""
        node = engine.nested.get("lan_heartbeat") if engine is not None else None
        if (
            engine is None
            or node is None
            or (isinstance(node, ScalarNode) and node.tag.endswith(":null"))
        ):
            return None
        return self._addresses(node, "engine.lan_heartbeat", engine.line_of("lan_heartbeat"))

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
