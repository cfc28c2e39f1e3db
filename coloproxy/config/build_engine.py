"""The ``engine`` section's checks across its keys, its ``quorum`` and
``failover_object_del``, and the ``disk`` section the engine drives (docs/engine.md)
(shell).

Called by coloproxy.config.build; problems go to the reader like every other section's.
"""

from __future__ import annotations

import typing

from coloproxy.config.model import DiskConfig, QuorumConfig, QuorumService
from coloproxy.config.problems import shown
from coloproxy.config.reader import Read, Sections, node_line
from coloproxy.config.rules import BadValueError, tcp_address
from coloproxy.config.schema import (
    DISK_KEYS,
    MAX_ENDPOINTS,
    MAX_OBJECT_IDS,
    QEMU_ID,
    QUORUM_KEYS,
)
from coloproxy.role import Role


def check_engine(sections: Sections, engine: Read | None, role: object) -> None:
    """Checks across the engine's keys."""
    if engine is None:
        return None
    values = engine.values
    if role is Role.SECONDARY and values.get("migrate_uri") is not None:
        sections.reader.problem(
            engine.line_of("migrate_uri"),
            "engine.migrate_uri",
            "only a primary migrates (role is secondary)",
        )
    if values.get("qmp") is not None and values.get("heartbeat_key") is None:
        sections.reader.problem(
            engine.line_of("qmp"),
            "engine.heartbeat_key",
            "missing; an engine (engine.qmp) needs the file of the key that"
            " authenticates its heartbeats (docs/engine.md)",
        )
    interval, timeout = values.get("heartbeat_interval_ms"), values.get("failover_timeout_ms")
    if isinstance(interval, int) and isinstance(timeout, int) and timeout <= interval:
        sections.reader.problem(
            engine.line_of("failover_timeout_ms"),
            "engine.failover_timeout_ms",
            f"must be longer than engine.heartbeat_interval_ms ({interval})",
        )


def quorum_section(sections: Sections, engine: Read | None) -> QuorumConfig | None:
    """``engine.quorum``: None (and no problem) when absent, the two-host mode."""
    if engine is None or "quorum" not in engine.nested:
        return None
    key, line = "engine.quorum", engine.line_of("quorum")
    read = sections.reader.mapping(engine.nested["quorum"], key, QUORUM_KEYS, line)
    if read is None or "service" not in read.values:
        return None
    values = dict(read.values)
    endpoints: list[tuple[str, int]] = []
    if "endpoints" in read.nested:
        at = read.line_of("endpoints")
        items = sections.reader.sequence(
            read.nested["endpoints"], f"{key}.endpoints", at, MAX_ENDPOINTS, "endpoints"
        )
        for index, item in enumerate(items or ()):
            readable, value = sections.reader.scalar(item, f"{key}.endpoints[{index}]")
            if not readable:
                continue
            try:
                endpoints.append(typing.cast(tuple[str, int], tcp_address(value)))
            except BadValueError as exc:
                sections.reader.problem(node_line(item), f"{key}.endpoints[{index}]", str(exc))
    values.pop("endpoints", None)
    service = values["service"]
    if service is QuorumService.ETCD and not endpoints and "endpoints" not in read.nested:
        sections.reader.problem(line, f"{key}.endpoints", "missing; etcd needs its endpoints")
    ttl, renew, margin = values["ttl_ms"], values["renew_ms"], values["margin_ms"]
    if isinstance(ttl, int) and isinstance(renew, int) and isinstance(margin, int):
        if margin >= ttl or renew >= ttl - margin:
            sections.reader.problem(
                read.line_of("margin_ms"),
                key,
                f"renew_ms ({renew}) must be shorter than ttl_ms ({ttl}) less margin_ms ({margin})",
            )
    if (values["cert_file"] is None) != (values["key_file"] is None):
        sections.reader.problem(line, key, "cert_file and key_file go together")
    if (values["user"] is None) != (values["password_file"] is None):
        sections.reader.problem(line, key, "user and password_file go together")
    return QuorumConfig(endpoints=tuple(endpoints), **values)  # type: ignore[arg-type]


def failover_object_ids(sections: Sections, engine: Read | None) -> tuple[str, ...]:
    """``engine.failover_object_del``: QEMU object ids (QEMU's id_wellformed: a letter,
    then letters, digits, '-', '.', '_')."""
    if engine is None or "failover_object_del" not in engine.nested:
        return ()
    key = "engine.failover_object_del"
    line = engine.line_of("failover_object_del")
    items = sections.reader.sequence(
        engine.nested["failover_object_del"], key, line, MAX_OBJECT_IDS, "ids"
    )
    ids: list[str] = []
    for index, item in enumerate(items or ()):
        readable, value = sections.reader.scalar(item, f"{key}[{index}]")
        if not readable:
            continue
        if not isinstance(value, str) or not QEMU_ID.fullmatch(value):
            sections.reader.problem(
                node_line(item),
                f"{key}[{index}]",
                f"expected a QEMU object id (a letter, then letters, digits, '-', '.' or"
                f" '_'), got {shown(value)}",
            )
            continue
        ids.append(value)
    return tuple(ids)


def disk_section(sections: Sections, engine: Read | None) -> DiskConfig | None:
    """The ``disk`` section, and its checks across sections (the engine drives it)."""
    if "disk" not in sections.top.nested:
        return None
    line = sections.top.line_of("disk")
    read = sections.section("disk")
    if read is None:
        return None
    if engine is not None and engine.values.get("qmp") is None:
        sections.reader.problem(
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
            sections.reader.problem(
                read.line_of(name), f"disk.{name}", f"same file as disk.{seen[path]}"
            )
        seen[path] = name
    if read.values.get("drive") == read.values.get("export") and "drive" in read.values:
        blamed = "export" if "export" in read.lines else "drive"
        sections.reader.problem(
            read.line_of(blamed), f"disk.{blamed}", "disk.drive and disk.export must differ"
        )
    uri = engine.values.get("migrate_uri") if engine is not None else None
    port = read.values.get("nbd_port")
    if isinstance(uri, str) and uri.startswith("tcp:") and uri.rsplit(":", 1)[-1] == str(port):
        sections.reader.problem(
            read.line_of("nbd_port"),
            "disk.nbd_port",
            f"{port} is engine.migrate_uri's port: the secondary's NBD export and its"
            " -incoming listen on the same address",
        )
    if any(name not in read.values for name in DISK_KEYS):
        return None  # a missing or bad value, reported already
    return DiskConfig(**read.values)  # type: ignore[arg-type]  # the rules typed them
