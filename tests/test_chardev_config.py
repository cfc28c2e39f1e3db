"""The ``chardev`` section: the sockets of the chardev transport, and its checks across
sections (no queues with it, Ethernet framing, primary only)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from coloproxy.compare import Framing
from coloproxy.config import ChardevConfig, ChardevSocket, ConfigError, parse_config

BASE = """\
pair:
  name: lab
  role: primary
net:
  guest_port: guest0
  replication:
    local: 10.255.77.1
    remote: 10.255.77.2
"""
SOCKETS = """\
chardev:
  primary_in: {unix: /run/c5/pin.sock, server: false}
  secondary_in: {tcp: "0.0.0.0:9004", server: true}
  outdev: {tcp: "[::1]:9005", server: false}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "t.yaml")
    return list(raised.value.problems)


def test_a_chardev_primary_has_no_queues_and_ethernet_framing() -> None:
    config = parse_config(BASE + SOCKETS + "  vnet_hdr: true\n", "t.yaml")
    assert config.queues is None
    assert config.compare.framing is Framing.ETHERNET
    assert config.chardev == ChardevConfig(
        primary_in=ChardevSocket(server=False, path=Path("/run/c5/pin.sock")),
        secondary_in=ChardevSocket(server=True, host="0.0.0.0", port=9004),
        outdev=ChardevSocket(server=False, host="::1", port=9005),
        notify=None,
        vnet_hdr=True,
        reconnect_ms=1000,
        outdev_buffer_bytes=16 << 20,
    )
    assert str(config.chardev.outdev) == "tcp:[::1]:9005,client"
    assert str(config.chardev.primary_in) == "unix:/run/c5/pin.sock,client"


def test_an_allow_list_and_a_group() -> None:
    text = BASE + SOCKETS.replace(
        "server: true}", "server: true, allow: [192.0.2.7, '2001:db8::/32', 10.1.2.3/24]}"
    )
    config = parse_config(text + "  group: users\n", "t.yaml").chardev
    assert config is not None and config.group == "users"
    assert config.secondary_in.allow == (
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.1.2.0/24"),
    )
    assert config.primary_in.allow == () and config.outdev.allow == ()


def test_without_the_section_nothing_changes() -> None:
    config = parse_config(BASE, "t.yaml")
    assert config.chardev is None
    assert config.queues is not None


def test_notify_and_explicit_ethernet() -> None:
    text = BASE + SOCKETS + "  notify: {unix: /run/c5/notify.sock, server: true}\n"
    text += "compare: {framing: ethernet}\n"
    config = parse_config(text, "t.yaml")
    assert config.chardev is not None
    assert config.chardev.notify == ChardevSocket(server=True, path=Path("/run/c5/notify.sock"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "chardev:\n",
            [
                "t.yaml:9: key 'chardev.primary_in': missing; expected a mapping with unix (a"
                " path) or tcp (HOST:PORT), and server",
                "t.yaml:9: key 'chardev.secondary_in': missing; expected a mapping with unix (a"
                " path) or tcp (HOST:PORT), and server",
                "t.yaml:9: key 'chardev.outdev': missing; expected a mapping with unix (a"
                " path) or tcp (HOST:PORT), and server",
            ],
        ),
        (
            BASE + SOCKETS.replace('{tcp: "0.0.0.0:9004", server: true}', "{server: true}"),
            [
                "t.yaml:11: key 'chardev.secondary_in': give exactly one of unix (a path) or tcp"
                " (HOST:PORT), got neither"
            ],
        ),
        (
            BASE + SOCKETS.replace("server: false}", "server: false, tcp: 'h:1'}", 1),
            [
                "t.yaml:10: key 'chardev.primary_in': give exactly one of unix (a path) or tcp"
                " (HOST:PORT), got unix and tcp"
            ],
        ),
        (
            BASE + SOCKETS.replace('"0.0.0.0:9004"', '"0.0.0.0:0"'),
            [
                "t.yaml:11: key 'chardev.secondary_in.tcp': expected HOST:PORT (an address or"
                " host name, IPv6 in brackets; port 1 to 65535), got '0.0.0.0:0'"
            ],
        ),
        (
            BASE + SOCKETS.replace(", server: false}", "}", 1),
            [
                "t.yaml:10: key 'chardev.primary_in.server': missing; expected true (coloproxy"
                " listens, QEMU's chardev connects) or false (coloproxy connects)"
            ],
        ),
        (
            BASE + SOCKETS.replace('tcp: "[::1]:9005"', "unix: /run/c5/pin.sock"),
            ["t.yaml:12: key 'chardev.outdev': same address as chardev.primary_in"],
        ),
        (
            BASE + SOCKETS + "  vnet: true\n",
            [
                "t.yaml:13: key 'chardev.vnet': unknown key; did you mean 'vnet_hdr'? allowed"
                " keys: primary_in, secondary_in, outdev, notify, vnet_hdr, reconnect_ms,"
                " outdev_buffer_bytes, group"
            ],
        ),
        (
            BASE + SOCKETS.replace('"0.0.0.0:9004"', '"localhost:9004"'),
            [
                "t.yaml:11: key 'chardev.secondary_in.tcp': a listening socket binds one"
                " address: give an IP address, not the host name 'localhost'"
            ],
        ),
        (
            BASE + SOCKETS.replace("server: false}", "server: false, allow: [10.0.0.2]}", 1),
            [
                "t.yaml:10: key 'chardev.primary_in.allow': only a listening TCP socket (tcp,"
                " server: true) has an allow list; a unix socket is kept to its owner (and"
                " chardev.group) by its mode"
            ],
        ),
        (
            BASE + SOCKETS.replace("server: true}", "server: true, allow: [10.0.0.2, nobody]}"),
            [
                "t.yaml:11: key 'chardev.secondary_in.allow[1]': expected an IP address or a"
                " network (10.0.0.0/24), got 'nobody'"
            ],
        ),
        (
            BASE + SOCKETS.replace("server: true}", "server: true, allow: []}"),
            ["t.yaml:11: key 'chardev.secondary_in.allow': an empty list would refuse every peer"],
        ),
        (
            BASE + SOCKETS + "  group: no-such-group-here\n",
            [
                "t.yaml:13: key 'chardev.group': group 'no-such-group-here' does not exist on"
                " this host"
            ],
        ),
        (
            BASE + SOCKETS + "queues: {primary_out: 10}\n",
            [
                "t.yaml:13: key 'queues': a primary with the chardev transport has no queues"
                " (give chardev or queues)"
            ],
        ),
        (
            BASE + SOCKETS + "compare: {framing: ip}\n",
            [
                "t.yaml:13: key 'compare.framing': must be ethernet with the chardev transport"
                " (QEMU's chardevs carry Ethernet frames), got 'ip'"
            ],
        ),
        (
            BASE.replace("role: primary", "role: secondary") + SOCKETS,
            [
                "t.yaml:9: key 'chardev': only a primary has the chardev transport (role is"
                " secondary)"
            ],
        ),
        (
            BASE + SOCKETS + "  outdev_buffer_bytes: 10\n",
            [
                "t.yaml:13: key 'chardev.outdev_buffer_bytes': expected a number of bytes from"
                " 65536 to 1073741824, got 10"
            ],
        ),
    ],
)
def test_each_problem_names_file_line_key_and_what_is_allowed(
    text: str, expected: list[str]
) -> None:
    assert problems(text) == expected


def test_engine_failover_object_del() -> None:
    text = BASE + "engine:\n  failover_object_del: [f2, f1, rew0]\n"
    assert parse_config(text, "t.yaml").engine.failover_object_del == ("f2", "f1", "rew0")
    assert parse_config(BASE, "t.yaml").engine.failover_object_del == ()
    assert problems(BASE + "engine:\n  failover_object_del: [f2, 2x, {a: b}]\n") == [
        "t.yaml:10: key 'engine.failover_object_del[1]': expected a QEMU object id (a letter,"
        " then letters, digits, '-', '.' or '_'), got '2x'",
        "t.yaml:10: key 'engine.failover_object_del[2]': expected a QEMU object id (a letter,"
        " then letters, digits, '-', '.' or '_'), got a mapping",
    ]
    assert problems(BASE + "engine:\n  failover_object_del: f2\n") == [
        "t.yaml:10: key 'engine.failover_object_del': expected a list, got 'f2'"
    ]
