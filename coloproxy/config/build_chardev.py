"""The ``chardev`` section (docs/chardev.md): its three or four sockets, their allow lists,
and its checks against the ``queues`` and ``compare`` sections (shell).

Called by coloproxy.config.build; problems go to the reader like every other section's.
"""

from __future__ import annotations

import ipaddress
import typing
from pathlib import Path

from yaml.nodes import Node, ScalarNode

from coloproxy.compare.config import Framing
from coloproxy.config.model import ChardevConfig, ChardevSocket, IPNetwork
from coloproxy.config.problems import shown
from coloproxy.config.reader import Read, Sections, node_line
from coloproxy.config.rules import is_ip
from coloproxy.config.schema import CHARDEV_SOCKET_KEYS, MAX_ALLOW
from coloproxy.role import Role


def chardev_section(sections: Sections, role: object, compare: Read | None) -> ChardevConfig | None:
    """The chardev transport's section, and its checks across sections."""
    if "chardev" not in sections.top.nested:
        return None
    line = sections.top.line_of("chardev")
    if role is Role.SECONDARY:
        sections.reader.problem(
            line, "chardev", "only a primary has the chardev transport (role is secondary)"
        )
        return None
    if "queues" in sections.top.nested:
        sections.reader.problem(
            sections.top.line_of("queues"),
            "queues",
            "a primary with the chardev transport has no queues (give chardev or queues)",
        )
    if compare is not None and compare.values.get("framing") is Framing.IP:
        if "framing" in compare.lines:
            sections.reader.problem(
                compare.line_of("framing"),
                "compare.framing",
                "must be ethernet with the chardev transport (QEMU's chardevs carry "
                "Ethernet frames), got 'ip'",
            )
    read = sections.section("chardev")
    if read is None:
        return None
    sockets: dict[str, ChardevSocket] = {}
    seen: dict[object, str] = {}
    for name in ("primary_in", "secondary_in", "outdev", "notify"):
        node = read.nested.get(name)
        if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
            continue  # a missing required socket is reported by the mapping's read
        key = f"chardev.{name}"
        chardev_socket = _chardev_socket(sections, node, key, read.line_of(name))
        if chardev_socket is None:
            continue
        address = (
            chardev_socket.path
            if chardev_socket.path is not None
            else (chardev_socket.host, chardev_socket.port)
        )
        if address in seen:
            sections.reader.problem(
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


def _chardev_socket(sections: Sections, node: Node, key: str, line: int) -> ChardevSocket | None:
    read = sections.reader.mapping(node, key, CHARDEV_SOCKET_KEYS, line)
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
        sections.reader.problem(
            line, key, f"give exactly one of unix (a path) or tcp (HOST:PORT), got {shown}"
        )
        return None
    if len(given) != 1 or "server" not in read.values:
        return None  # a bad or missing value, reported already
    path, address = read.values.get("unix"), read.values.get("tcp")
    server = bool(read.values["server"])
    allow = _allow(sections, read, key, address is not None and server)
    if allow is None:
        return None
    if address is not None:
        host, port = typing.cast(tuple[str, int], address)
        if server and not is_ip(host):
            # asyncio binds every address a name resolves to.
            sections.reader.problem(
                read.line_of("tcp"),
                f"{key}.tcp",
                f"a listening socket binds one address: give an IP address, not the host"
                f" name {host!r}",
            )
            return None
        return ChardevSocket(server=server, host=host, port=port, allow=allow)
    return ChardevSocket(server=server, path=typing.cast(Path, path))


def _allow(
    sections: Sections, read: Read, key: str, listening_tcp: bool
) -> tuple[IPNetwork, ...] | None:
    """``allow``: the peers a listening TCP socket accepts (addresses or networks)."""
    node = read.nested.get("allow")
    if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
        return ()
    key, line = f"{key}.allow", read.line_of("allow")
    if not listening_tcp:
        sections.reader.problem(
            line,
            key,
            "only a listening TCP socket (tcp, server: true) has an allow list; a unix"
            " socket is kept to its owner (and chardev.group) by its mode",
        )
        return None
    items = sections.reader.sequence(node, key, line, MAX_ALLOW, "entries")
    if items is None:
        return None
    networks: list[IPNetwork] = []
    for index, item in enumerate(items):
        readable, value = sections.reader.scalar(item, f"{key}[{index}]")
        if not readable:
            return None
        try:
            if not isinstance(value, str):
                raise ValueError
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            sections.reader.problem(
                node_line(item),
                f"{key}[{index}]",
                f"expected an IP address or a network (10.0.0.0/24), got {shown(value)}",
            )
            return None
    if not networks:
        sections.reader.problem(line, key, "an empty list would refuse every peer")
        return None
    return tuple(networks)
