"""The YAML configuration: defaults, every kind of problem with its exact message and line,
all problems at once, the example files, ``coloproxy check-config``."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from coloproxy.cli import main
from coloproxy.compare import (
    CompareConfig,
    Framing,
    MalformedPolicy,
    PassthroughRule,
    SecondarySeq,
)
from coloproxy.config import (
    Config,
    ConfigError,
    ControlConfig,
    DiskConfig,
    DiskFormat,
    EngineConfig,
    LogConfig,
    LogLevel,
    MetricsConfig,
    NetConfig,
    PairConfig,
    QueuesConfig,
    QuorumConfig,
    QuorumService,
    ReplicationConfig,
    Transport,
    load_config,
    parse_config,
)
from coloproxy.config import build as config_build
from coloproxy.config.schema import PASSTHROUGH_KEYS, SECTIONS
from coloproxy.errors import InputError, UsageError
from coloproxy.protocol import ClientRole
from coloproxy.role import Role

ROOT = Path(__file__).resolve().parent.parent

# Lines 1-8; whatever a test appends starts at line 9.
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
COMPARE_KEYS = (
    "framing, compare_timeout, secondary_timeout, datagram_reorder_window, max_flows,"
    " max_held_packets, max_held_bytes, retransmit_window, max_retransmit_bytes,"
    " max_fragment_datagrams, max_fragment_bytes,"
    " flow_idle_timeout, malformed_policy, passthrough, secondary_seq, split_after,"
    " ack_lag_timeout, gso_above"
)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "t.yaml")
    assert str(raised.value) == "\n".join(raised.value.problems)
    return list(raised.value.problems)


# -- defaults --------------------------------------------------------------------------------


def test_a_minimal_primary_gets_every_default() -> None:
    config = parse_config(BASE, "t.yaml")
    assert config == Config(
        path="t.yaml",
        pair=PairConfig("lab", Role.PRIMARY),
        net=NetConfig(
            guest_port="guest0",
            replication=ReplicationConfig(
                ipaddress.ip_address("10.255.77.1"), ipaddress.ip_address("10.255.77.2")
            ),
            prefix="cp",
            lan_bridge=None,
            vxlan_id=77,
            vxlan_port=4789,
            underlay=None,
        ),
        queues=QueuesConfig(10, 11, 12, 13, 14, 8192, 65535, 8 << 20, Transport.NETLINK),
        compare=CompareConfig(),
        control=ControlConfig(Path("/run/coloproxy/lab.sock"), None, 16, 256),
        metrics=MetricsConfig("127.0.0.1", 9477, True),
        engine=EngineConfig(None, 20000, 100),
        log=LogConfig(LogLevel.INFO),
    )
    assert config.metrics.listen == "127.0.0.1:9477"


def test_a_secondary_has_its_own_queues() -> None:
    config = parse_config(BASE.replace("primary", "secondary"), "t.yaml")
    assert config.queues == QueuesConfig()
    assert (config.queues.secondary_in, config.queues.secondary_egress) == (12, 13)
    assert config.pair.role is Role.SECONDARY


def test_empty_and_null_sections_take_their_defaults() -> None:
    config = parse_config(BASE + "compare:\nlog: {}\nqueues: ~\n", "t.yaml")
    assert config.compare == CompareConfig()
    assert config.log == LogConfig()
    assert config.queues == QueuesConfig()


def test_every_comparator_setting_can_be_set() -> None:
    """The compare section follows CompareConfig's fields; none may be left unreachable."""
    text = BASE + (
        "compare:\n"
        "  framing: ethernet\n"
        "  compare_timeout: 1\n"
        "  secondary_timeout: null\n"
        "  datagram_reorder_window: 0.5\n"
        "  max_flows: 10\n"
        "  max_held_packets: 11\n"
        "  max_held_bytes: 12\n"
        "  retransmit_window: 16\n"
        "  max_retransmit_bytes: 17\n"
        "  max_fragment_datagrams: 13\n"
        "  max_fragment_bytes: 14\n"
        "  flow_idle_timeout: 15.5\n"
        "  malformed_policy: release\n"
        "  secondary_seq: rewritten\n"
        "  split_after: null\n"
        "  ack_lag_timeout: 0.2\n"
        "  gso_above: 9000\n"
        "  passthrough:\n"
        "    - {protocol: udp, guest_port: 123}\n"
        "    - peer_network: 10.0.0.0/8\n"
        "      peer_port: 0\n"
    )
    compare = parse_config(text, "t.yaml").compare
    assert compare == CompareConfig(
        framing=Framing.ETHERNET,
        compare_timeout=1.0,
        secondary_timeout=None,
        datagram_reorder_window=0.5,
        max_flows=10,
        max_held_packets=11,
        max_held_bytes=12,
        retransmit_window=16,
        max_retransmit_bytes=17,
        max_fragment_datagrams=13,
        max_fragment_bytes=14,
        flow_idle_timeout=15.5,
        malformed_policy=MalformedPolicy.RELEASE,
        passthrough=(
            PassthroughRule(protocol="udp", guest_port=123),
            PassthroughRule(peer_network="10.0.0.0/8", peer_port=0),
        ),
        secondary_seq=SecondarySeq.REWRITTEN,
        split_after=None,
        ack_lag_timeout=0.2,
        gso_above=9000,
    )
    assert set(text.split("compare:\n")[1].split()) >= {
        f"{field.name}:" for field in dataclasses.fields(CompareConfig)
    }


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9477", "127.0.0.1", 9477),
        ("'[::1]:9100'", "::1", 9100),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("localhost:9477", "localhost", 9477),
        ("metrics.example.org:80", "metrics.example.org", 80),
    ],
)
def test_metrics_listen_forms(listen: str, host: str, port: int) -> None:
    metrics = parse_config(BASE + f"metrics: {{listen: {listen}}}\n", "t.yaml").metrics
    assert (metrics.host, metrics.port) == (host, port)
    if host == "::1":
        assert metrics.listen == "[::1]:9100"


# -- every kind of problem -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, with and without a suggestion
        (
            BASE + "compare:\n  compare_timout: 3\n",
            f"t.yaml:10: key 'compare.compare_timout': unknown key; did you mean"
            f" 'compare_timeout'? allowed keys: {COMPARE_KEYS}",
        ),
        (
            BASE + "zzz: 1\n",
            "t.yaml:9: key 'zzz': unknown key; allowed keys: pair, net, queues, compare,"
            " control, metrics, engine, log, chardev, disk",
        ),
        (
            BASE + "metrics:\n  enable: false\n",
            "t.yaml:10: key 'metrics.enable': unknown key; did you mean 'enabled'? allowed"
            " keys: listen, enabled",
        ),
        # wrong types
        (
            BASE + "  vxlan_id: '77'\n",
            "t.yaml:9: key 'net.vxlan_id': expected an integer from 1 to 16777215, got '77'",
        ),
        (
            BASE + "compare: {max_flows: true}\n",
            "t.yaml:9: key 'compare.max_flows': expected a positive integer, got true",
        ),
        (
            BASE + "log:\n  level: [info]\n",
            "t.yaml:10: key 'log.level': expected one of debug, info, warning, error,"
            " critical, got a list",
        ),
        (
            BASE + "metrics: {enabled: 'yes'}\n",
            "t.yaml:9: key 'metrics.enabled': expected true or false, got 'yes'",
        ),
        (
            BASE + "compare: {compare_timeout: 3s}\n",
            "t.yaml:9: key 'compare.compare_timeout': expected a positive number of"
            " seconds, got '3s'",
        ),
        (
            BASE + "engine: {period_ms: fast}\n",
            "t.yaml:9: key 'engine.period_ms': expected a positive integer of"
            " milliseconds, got 'fast'",
        ),
        (
            BASE + "engine: {qmp: qmp.sock}\n",
            "t.yaml:9: key 'engine.qmp': expected an absolute path, got 'qmp.sock'",
        ),
        # out of range
        (
            BASE + "  vxlan_id: 0\n",
            "t.yaml:9: key 'net.vxlan_id': expected an integer from 1 to 16777215, got 0",
        ),
        (
            BASE + "  vxlan_port: 70000\n",
            "t.yaml:9: key 'net.vxlan_port': expected an integer from 1 to 65535, got 70000",
        ),
        (
            BASE + "compare:\n  compare_timeout: -1\n",
            "t.yaml:10: key 'compare.compare_timeout': expected a positive number of"
            " seconds, got -1",
        ),
        (
            BASE + "compare:\n  flow_idle_timeout: 0\n",
            "t.yaml:10: key 'compare.flow_idle_timeout': expected a positive number of"
            " seconds, got 0",
        ),
        (
            BASE + "compare:\n  secondary_timeout: .inf\n",
            "t.yaml:10: key 'compare.secondary_timeout': expected a positive number of"
            " seconds, got inf",
        ),
        (
            BASE + "compare:\n  datagram_reorder_window: 100000\n",
            "t.yaml:10: key 'compare.datagram_reorder_window': expected a positive number of"
            " seconds, at most 86400, got 100000",
        ),
        (
            BASE.replace("name: lab", "name: Web_1"),
            "t.yaml:2: key 'pair.name': expected a name of 1 to 12 characters a-z, 0-9 and"
            " '-', got 'Web_1'",
        ),
        (
            BASE.replace("role: primary", "role: master"),
            "t.yaml:3: key 'pair.role': expected one of primary, secondary, got 'master'",
        ),
        (
            BASE + "  prefix: coloproxy\n",
            "t.yaml:9: key 'net.prefix': expected 1 to 5 characters a-z and 0-9, starting"
            " with a letter, got 'coloproxy'",
        ),
        (
            BASE.replace("guest_port: guest0", "guest_port: a-very-long-tap-name"),
            "t.yaml:5: key 'net.guest_port': expected an interface name (1 to 15"
            " characters, no '/', ':' or spaces), got 'a-very-long-tap-name'",
        ),
        (
            BASE.replace("10.255.77.2", "10.255.77.256"),
            "t.yaml:8: key 'net.replication.remote': expected an IPv4 or IPv6 address, got"
            " '10.255.77.256'",
        ),
        (
            BASE + "queues: {rcvbuf: 5}\n",
            "t.yaml:9: key 'queues.rcvbuf': expected a number of bytes from 65536 to"
            " 1073741824, got 5",
        ),
        (
            BASE + "queues: {transport: libnfq}\n",
            "t.yaml:9: key 'queues.transport': expected one of netfilterqueue, netlink, got"
            " 'libnfq'",
        ),
        (
            BASE + "control: {group_role: engine}\n",
            "t.yaml:9: key 'control.group_role': expected one of cli, monitor, got 'engine'",
        ),
        (
            BASE + "control: {engine_group: no-such-group}\n",
            "t.yaml:9: key 'control.engine_group': group 'no-such-group' does not exist on this"
            " host",
        ),
        (
            BASE + "control: {idle_timeout_ms: -1}\n",
            "t.yaml:9: key 'control.idle_timeout_ms': expected a non-negative integer of"
            " milliseconds (0: never), got -1",
        ),
        (
            BASE + "control: {max_clients: 0}\n",
            "t.yaml:9: key 'control.max_clients': expected an integer from 2 to 1024, got 0",
        ),
        # missing required keys and sections
        (
            BASE.replace("  role: primary\n", ""),
            "t.yaml:1: key 'pair.role': missing; expected one of primary, secondary",
        ),
        (
            BASE.replace("  guest_port: guest0\n", ""),
            "t.yaml:4: key 'net.guest_port': missing; expected an interface name (the host"
            " side of the guest's NIC)",
        ),
        (
            BASE.replace("    remote: 10.255.77.2\n", ""),
            "t.yaml:6: key 'net.replication.remote': missing; expected an IPv4 or IPv6"
            " address (the peer host on the link)",
        ),
        (
            "pair: {name: lab, role: primary}\n",
            "t.yaml:1: key 'net': missing; expected a mapping with guest_port, replication",
        ),
        # structure
        (
            BASE + "queues: 5\n",
            "t.yaml:9: key 'queues': expected a mapping (primary_out, secondary_out,"
            " secondary_in, secondary_egress, primary_split, max_len, copy_range, rcvbuf,"
            " transport), got 5",
        ),
        (
            BASE + "  prefix: cp\n  prefix: xy\n",
            "t.yaml:10: key 'net.prefix': duplicate key (first at line 9)",
        ),
        (
            BASE + "? [a, b]\n: 1\n",
            "t.yaml:9: keys must be plain names",
        ),
        (
            BASE + "log: {level: !shout info}\n",
            "t.yaml:9: key 'log.level': unreadable value: could not determine a constructor"
            " for the tag '!shout'",
        ),
        # relations between keys
        (
            BASE.replace("primary", "secondary") + "queues: {secondary_out: 3}\n",
            "t.yaml:9: key 'queues.secondary_out': is a queue of the other role's host; role"
            " secondary uses secondary_in, secondary_egress",
        ),
        (
            BASE + "queues:\n  secondary_in: 7\n",
            "t.yaml:10: key 'queues.secondary_in': is a queue of the other role's host; role"
            " primary uses primary_out, secondary_out, primary_split",
        ),
        (
            BASE + "queues:\n  primary_out: 5\n  secondary_out: 5\n",
            "t.yaml:11: key 'queues.secondary_out': queue 5 is also queues.primary_out",
        ),
        (
            BASE.replace("10.255.77.2", "fd77:255::2"),
            "t.yaml:6: key 'net.replication': local and remote must both be IPv4 or both IPv6",
        ),
        (
            BASE.replace("10.255.77.2", "10.255.77.1"),
            "t.yaml:6: key 'net.replication': local and remote are both 10.255.77.1",
        ),
        # passthrough rules
        (
            BASE + "compare:\n  passthrough: tcp\n",
            "t.yaml:10: key 'compare.passthrough': expected a list, got 'tcp'",
        ),
        (
            BASE + "compare:\n  passthrough:\n    - 5\n",
            "t.yaml:11: key 'compare.passthrough[0]': expected a mapping (protocol,"
            " guest_port, peer_port, guest_network, peer_network), got 5",
        ),
        (
            BASE + "compare:\n  passthrough:\n    - {protocol: sctp}\n",
            "t.yaml:11: key 'compare.passthrough[0].protocol': expected one of tcp, udp,"
            " icmp, icmpv6 or ip-proto-N (N from 0 to 255), got 'sctp'",
        ),
        (
            BASE + "compare:\n  passthrough:\n    - guest_port: 123\n    - peer_port: -1\n",
            "t.yaml:12: key 'compare.passthrough[1].peer_port': expected a port from 0 to"
            " 65535, got -1",
        ),
        (
            BASE + "compare:\n  passthrough:\n    - {guest_network: 10.0.0.0/33}\n",
            "t.yaml:11: key 'compare.passthrough[0].guest_network': expected a network in"
            " CIDR notation, e.g. 10.0.0.0/24, got '10.0.0.0/33'",
        ),
        (
            BASE + "compare:\n  passthrough:\n    - {port: 53}\n",
            "t.yaml:11: key 'compare.passthrough[0].port': unknown key; did you mean"
            " 'peer_port'? allowed keys: protocol, guest_port, peer_port, guest_network,"
            " peer_network",
        ),
        # control
        (
            BASE + "control: {group: no-such-group}\n",
            "t.yaml:9: key 'control.group': group 'no-such-group' does not exist on this host",
        ),
        (
            BASE + "control: {socket: run/lab.sock}\n",
            "t.yaml:9: key 'control.socket': expected an absolute path, got 'run/lab.sock'",
        ),
        (
            BASE + f"control: {{socket: /run/{'x' * 110}.sock}}\n",
            f"t.yaml:9: key 'control.socket': expected a path of at most 107 bytes (a Unix"
            f" socket address), got '/run/{'x' * 52}...'",
        ),
        # metrics.listen
        (
            BASE + "metrics: {listen: '::1:9477'}\n",
            "t.yaml:9: key 'metrics.listen': expected IPv6 addresses in brackets, e.g."
            " '[::1]:9477', got '::1:9477'",
        ),
        (
            BASE + "metrics: {listen: localhost}\n",
            "t.yaml:9: key 'metrics.listen': expected HOST:PORT (an address or host name,"
            " IPv6 in brackets; port 0 to 65535), got 'localhost'",
        ),
        (
            BASE + "metrics: {listen: '127.0.0.1:99999'}\n",
            "t.yaml:9: key 'metrics.listen': expected HOST:PORT (an address or host name,"
            " IPv6 in brackets; port 0 to 65535), got '127.0.0.1:99999'",
        ),
        (
            BASE + "metrics: {listen: '[10.0.0.1]:80'}\n",
            "t.yaml:9: key 'metrics.listen': expected HOST:PORT (an address or host name,"
            " IPv6 in brackets; port 0 to 65535), got '[10.0.0.1]:80'",
        ),
        # whole files
        (
            "pair: {name: lab\n",
            "t.yaml:2: not valid YAML: expected ',' or '}', but got '<stream end>'",
        ),
        (
            "",
            "t.yaml:1: key 'pair': missing; expected a mapping with name, role\n"
            "t.yaml:1: key 'net': missing; expected a mapping with guest_port, replication",
        ),
        (
            "- pair\n",
            "t.yaml:1: expected a mapping (pair, net, queues, compare, control, metrics,"
            " engine, log, chardev, disk), got a list",
        ),
        (
            BASE + "---\n" + BASE,
            "t.yaml:9: not valid YAML: expected a single document in the stream, but found"
            " another document",
        ),
    ],
)
def test_each_problem_has_its_exact_message(text: str, expected: str) -> None:
    assert problems(text) == expected.split("\n")


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    text = """\
pair:
  name: Web_1
  role: master
net:
  prefix: toolong
  replication:
    local: 10.0.0.1
    remote: 10.0.0.1
  vxlan_id: 0
queues:
  primary_out: 10
  secondary_out: 10
compare:
  compare_timout: 3
  compare_timeout: -1
  compare_timeout: 2
  passthrough:
    - {protocol: tcp, guest_port: 99999}
metrics:
  listen: "::1:9477"
log:
  level: verbose
extra: 1
"""
    assert problems(text) == [
        "t.yaml:2: key 'pair.name': expected a name of 1 to 12 characters a-z, 0-9 and '-',"
        " got 'Web_1'",
        "t.yaml:3: key 'pair.role': expected one of primary, secondary, got 'master'",
        "t.yaml:4: key 'net.guest_port': missing; expected an interface name (the host side of"
        " the guest's NIC)",
        "t.yaml:5: key 'net.prefix': expected 1 to 5 characters a-z and 0-9, starting with a"
        " letter, got 'toolong'",
        "t.yaml:6: key 'net.replication': local and remote are both 10.0.0.1",
        "t.yaml:9: key 'net.vxlan_id': expected an integer from 1 to 16777215, got 0",
        "t.yaml:12: key 'queues.secondary_out': queue 10 is also queues.primary_out",
        f"t.yaml:14: key 'compare.compare_timout': unknown key; did you mean 'compare_timeout'?"
        f" allowed keys: {COMPARE_KEYS}",
        "t.yaml:15: key 'compare.compare_timeout': expected a positive number of seconds, got -1",
        "t.yaml:16: key 'compare.compare_timeout': duplicate key (first at line 15)",
        "t.yaml:18: key 'compare.passthrough[0].guest_port': expected a port from 0 to 65535,"
        " got 99999",
        "t.yaml:20: key 'metrics.listen': expected IPv6 addresses in brackets, e.g."
        " '[::1]:9477', got '::1:9477'",
        "t.yaml:22: key 'log.level': expected one of debug, info, warning, error, critical,"
        " got 'verbose'",
        "t.yaml:23: key 'extra': unknown key; allowed keys: pair, net, queues, compare,"
        " control, metrics, engine, log, chardev, disk",
    ]


def test_the_comparators_own_refusal_is_reported_with_the_section(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Our rules mirror CompareConfig's checks; should they ever fall behind, its
    UsageError still becomes a ConfigError with a line."""

    def refuse(**_: object) -> CompareConfig:
        raise UsageError("compare setting max_flows must be below max_held_packets")

    monkeypatch.setattr(config_build, "CompareConfig", refuse)
    assert problems(BASE + "compare:\n  max_flows: 10\n") == [
        "t.yaml:9: key 'compare': compare setting max_flows must be below max_held_packets"
    ]


def test_an_existing_group_is_accepted() -> None:
    assert parse_config(BASE + "control: {group: users}\n", "t.yaml").control.group == "users"


def test_the_control_access_keys() -> None:
    control = parse_config(
        BASE + "control: {group: users, engine_group: staff, group_role: monitor,"
        " idle_timeout_ms: 0, max_clients: 2}\n",
        "t.yaml",
    ).control
    assert (control.group, control.engine_group, control.group_role) == (
        "users",
        "staff",
        ClientRole.MONITOR,
    )
    assert (control.idle_timeout_ms, control.max_clients) == (0, 2)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "none.yaml")
    assert str(raised.value) == f"{tmp_path / 'none.yaml'}: cannot read: No such file or directory"
    assert isinstance(raised.value, InputError)


# -- the examples and the documentation ------------------------------------------------------


@pytest.mark.parametrize("name", ["lab.yaml", "pair-primary.yaml", "pair-secondary.yaml"])
def test_the_example_configs_load(name: str) -> None:
    config = load_config(ROOT / "configs" / name)
    assert config.path.endswith(name)


def test_the_example_pair_is_one_pair() -> None:
    primary = load_config(ROOT / "configs" / "pair-primary.yaml")
    secondary = load_config(ROOT / "configs" / "pair-secondary.yaml")
    assert primary.pair.name == secondary.pair.name
    assert (primary.pair.role, secondary.pair.role) == (Role.PRIMARY, Role.SECONDARY)
    assert primary.net.replication.local == secondary.net.replication.remote
    assert primary.net.replication.remote == secondary.net.replication.local
    assert (primary.net.vxlan_id, primary.net.vxlan_port) == (
        secondary.net.vxlan_id,
        secondary.net.vxlan_port,
    )
    assert primary.queues is not None and secondary.queues is not None
    used = {primary.queues.primary_out, primary.queues.secondary_out}
    assert not used & {secondary.queues.secondary_in, secondary.queues.secondary_egress}


PAIR_FILES = ("pair-primary.yaml", "pair-secondary.yaml")


def test_the_examples_show_every_key() -> None:
    """The commented examples are the reference files: together they set every key."""
    text = "".join((ROOT / "configs" / name).read_text() for name in PAIR_FILES)
    for section, keys in SECTIONS.items():
        for key in keys:
            assert re.search(rf"^\s*#?\s*{key}:", text, re.MULTILINE), f"{section}.{key}"


def test_the_document_describes_every_key() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for section, keys in SECTIONS.items():
        for key in keys:
            assert f"`{section}.{key}" in text, f"{section}.{key}"
    for key in PASSTHROUGH_KEYS:
        assert f"| `{key}` |" in text


# -- engine ----------------------------------------------------------------------------------


def test_engine_defaults_and_every_key() -> None:
    assert parse_config(BASE, "t.yaml").engine == EngineConfig(
        qmp=None,
        period_ms=20000,
        min_gap_ms=100,
        migrate_uri=None,
        heartbeat_port=9478,
        heartbeat_interval_ms=50,
        failover_timeout_ms=300,
        checkpoint_timeout_ms=10000,
        bring_up=True,
        lan_heartbeat=None,
        heartbeat_key=None,
    )
    engine = parse_config(
        BASE + "engine:\n"
        "  qmp: /run/qmp.sock\n"
        "  heartbeat_key: /etc/hb.key\n"
        "  migrate_uri: tcp:10.255.77.2:8888\n"
        "  period_ms: 2000\n"
        "  min_gap_ms: 0\n"
        "  heartbeat_port: 9999\n"
        "  heartbeat_interval_ms: 20\n"
        "  failover_timeout_ms: 200\n"
        "  checkpoint_timeout_ms: 5000\n"
        "  bring_up: false\n"
        "  lan_heartbeat: {local: 'fd00::1', remote: 'fd00::2'}\n",
        "t.yaml",
    ).engine
    assert engine == EngineConfig(
        "/run/qmp.sock",
        2000,
        0,
        "tcp:10.255.77.2:8888",
        9999,
        20,
        200,
        5000,
        False,
        ReplicationConfig(ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2")),
        "/etc/hb.key",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "engine: {migrate_uri: '10.0.0.2:8888'}\n",
            "t.yaml:9: key 'engine.migrate_uri': expected a QEMU migration URI (tcp:HOST:PORT,"
            " unix:PATH, rdma:, vsock:, exec:, fd: or file:), got '10.0.0.2:8888'",
        ),
        (
            BASE.replace("primary", "secondary") + "engine: {migrate_uri: 'tcp:h:1'}\n",
            "t.yaml:9: key 'engine.migrate_uri': only a primary migrates (role is secondary)",
        ),
        (
            BASE + "engine: {heartbeat_interval_ms: 300}\n",
            "t.yaml:9: key 'engine.failover_timeout_ms': must be longer than"
            " engine.heartbeat_interval_ms (300)",
        ),
        (
            BASE + "engine: {heartbeat_port: 0}\n",
            "t.yaml:9: key 'engine.heartbeat_port': expected a UDP port from 1 to 65535, got 0",
        ),
        (
            BASE + "engine: {bring_up: 1}\n",
            "t.yaml:9: key 'engine.bring_up': expected true or false, got 1",
        ),
        (
            BASE + "engine:\n  lan_heartbeat: {local: 10.0.0.1, remote: 'fd00::2'}\n",
            "t.yaml:10: key 'engine.lan_heartbeat': local and remote must both be IPv4 or"
            " both IPv6",
        ),
        (
            BASE + "engine:\n  lan_heartbeat: {local: 10.0.0.1}\n",
            "t.yaml:10: key 'engine.lan_heartbeat.remote': missing; expected an IPv4 or IPv6"
            " address (the peer host on the link)",
        ),
        (
            BASE + "engine: {qmp: /run/qmp.sock}\n",
            "t.yaml:9: key 'engine.heartbeat_key': missing; an engine (engine.qmp) needs the"
            " file of the key that authenticates its heartbeats (docs/engine.md)",
        ),
        (
            BASE + "engine: {heartbeat_key: hb.key}\n",
            "t.yaml:9: key 'engine.heartbeat_key': expected an absolute path, got 'hb.key'",
        ),
    ],
)
def test_engine_problems(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_the_quorum_section() -> None:
    engine = parse_config(
        BASE + "engine:\n"
        "  quorum:\n"
        "    service: etcd\n"
        "    endpoints: ['10.0.0.1:2379', '[fd00::2]:2379']\n"
        "    prefix: /pairs\n"
        "    ttl_ms: 2000\n"
        "    ca_file: /etc/ca.pem\n"
        "    cert_file: /etc/c.pem\n"
        "    key_file: /etc/c.key\n"
        "    user: web1\n"
        "    password_file: /etc/pw\n",
        "t.yaml",
    ).engine
    assert engine.quorum == QuorumConfig(
        service=QuorumService.ETCD,
        endpoints=(("10.0.0.1", 2379), ("fd00::2", 2379)),
        prefix="/pairs",
        ttl_ms=2000,
        ca_file="/etc/ca.pem",
        cert_file="/etc/c.pem",
        key_file="/etc/c.key",
        user="web1",
        password_file="/etc/pw",
    )
    assert parse_config(BASE, "t.yaml").engine.quorum is None  # the two-host mode
    two = parse_config(BASE + "engine: {quorum: {service: two-host}}\n", "t.yaml")
    assert two.engine.quorum == QuorumConfig(service=QuorumService.TWO_HOST)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "engine: {quorum: {service: etcd}}\n",
            "t.yaml:9: key 'engine.quorum.endpoints': missing; etcd needs its endpoints",
        ),
        (
            "engine: {quorum: {service: zookeeper}}\n",
            "t.yaml:9: key 'engine.quorum.service': expected one of etcd, two-host, got"
            " 'zookeeper'",
        ),
        (
            "engine: {quorum: {service: etcd, endpoints: ['h:2379'], ttl_ms: 1000,"
            " margin_ms: 950}}\n",
            "t.yaml:9: key 'engine.quorum': renew_ms (100) must be shorter than ttl_ms (1000)"
            " less margin_ms (950)",
        ),
        (
            "engine: {quorum: {service: etcd, endpoints: ['h:2379'], cert_file: /c}}\n",
            "t.yaml:9: key 'engine.quorum': cert_file and key_file go together",
        ),
        (
            "engine: {quorum: {service: etcd, endpoints: ['h']}}\n",
            "t.yaml:9: key 'engine.quorum.endpoints[0]': expected HOST:PORT (an address or host"
            " name, IPv6 in brackets; port 1 to 65535), got 'h'",
        ),
    ],
)
def test_quorum_problems(text: str, expected: str) -> None:
    assert problems(BASE + text) == [expected]


# -- coloproxy check-config ------------------------------------------------------------------


def _with_key(tmp_path: Path, name: str, mode: int = 0o600, secret: bytes = b"s" * 32) -> Path:
    """The example config ``name`` with its heartbeat key file in ``tmp_path``."""
    key = tmp_path / "hb.key"
    key.write_bytes(secret)
    key.chmod(mode)
    text = (ROOT / "configs" / name).read_text()
    path = tmp_path / name
    path.write_text(text.replace("/etc/coloproxy/web1-heartbeat.key", str(key)))
    return path


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _with_key(tmp_path, "pair-secondary.yaml")
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (pair web1, role secondary)\n"


@pytest.mark.parametrize(
    ("mode", "secret", "why"),
    [
        (0o640, b"s" * 32, "mode 0640 lets other users read or change the key; chmod 600"),
        (0o604, b"s" * 32, "mode 0604 lets other users read or change the key; chmod 600"),
        (0o600, b"short\n", "5 bytes; at least 16"),
        (0o600, b"s" * 5000, "more than 4096 bytes"),
    ],
)
def test_check_config_checks_the_heartbeat_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, secret: bytes, why: str
) -> None:
    path = _with_key(tmp_path, "pair-primary.yaml", mode, secret)
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{tmp_path / 'hb.key'} (engine.heartbeat_key): {why}")
    assert captured.err.count("\n") == 1


def test_check_config_needs_the_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _with_key(tmp_path, "pair-primary.yaml")
    (tmp_path / "hb.key").unlink()
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"{tmp_path / 'hb.key'} (engine.heartbeat_key): cannot read: No such file or directory\n"
    )


def test_check_config_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "compare:\n  compare_timeout: -1\nlog: {level: loud}\n")
    good = _with_key(tmp_path, "pair-primary.yaml")
    assert main(["check-config", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"{good}: ok (pair web1, role primary)\n"
    assert captured.err == (
        f"{bad}:10: key 'compare.compare_timeout': expected a positive number of seconds,"
        " got -1\n"
        f"{bad}:11: key 'log.level': expected one of debug, info, warning, error, critical,"
        " got 'loud'\n"
    )


# -- unreadable files and values: one line, exit 2, never a traceback or a hang --------------


def _int_digits(count: int) -> str:
    return "9" * count


def _nested_flow(depth: int) -> str:
    return "pair: " + "[" * depth + "]" * depth + "\n"


def _nested_block(depth: int) -> str:
    return "pair:\n" + "".join(" " * level + f"k{level}:\n" for level in range(1, depth + 1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "engine: {heartbeat_port: !!int abc}\n",
            "t.yaml:9: key 'engine.heartbeat_port': unreadable value: 'abc' is not a valid"
            " !!int (invalid literal for int() with base 10: 'abc')",
        ),
        (
            BASE + "engine: {heartbeat_port: !!float abc}\n",
            "t.yaml:9: key 'engine.heartbeat_port': unreadable value: 'abc' is not a valid"
            " !!float (could not convert string to float: 'abc')",
        ),
        (
            BASE + "engine: {qmp: !!timestamp 2020-99-99}\n",
            "t.yaml:9: key 'engine.qmp': unreadable value: '2020-99-99' is not a valid"
            " !!timestamp (month must be in 1..12)",
        ),
        (
            BASE + f"engine: {{heartbeat_port: {_int_digits(5000)}}}\n",
            "t.yaml:9: key 'engine.heartbeat_port': a value of 5000 characters; at most 4096",
        ),
        (
            # Below the value limit: shown cut short, not as 4000 digits.
            BASE + f"engine: {{heartbeat_port: {_int_digits(4000)}}}\n",
            "t.yaml:9: key 'engine.heartbeat_port': expected a UDP port from 1 to 65535, got "
            + "9" * 57
            + "...",
        ),
        (
            BASE + "engine: {heartbeat_port: !!binary 'abc'}\n",
            "t.yaml:9: key 'engine.heartbeat_port': unreadable value: failed to decode base64"
            " data: Incorrect padding",
        ),
        (
            BASE + "x" * 1000 + ": 1\n",
            "t.yaml:9: key '" + "x" * 57 + "...': unknown key; allowed keys: pair, net, queues,"
            " compare, control, metrics, engine, log, chardev, disk",
        ),
        (
            "pair: {name: a\x00b}\n",
            "t.yaml:1: not valid YAML: unacceptable character #x0000: special characters are"
            " not allowed",
        ),
        (_nested_flow(5000), "t.yaml:1: nested deeper than 32 levels"),
        (_nested_flow(20000), "t.yaml:1: nested deeper than 32 levels"),
        (_nested_block(40), "t.yaml:33: nested deeper than 32 levels"),
        (
            BASE + "compare:\n  passthrough: [" + "{protocol: udp}, " * 257 + "]\n",
            "t.yaml:10: key 'compare.passthrough': 257 rules; at most 256",
        ),
        (
            BASE + "compare:\n  passthrough: [" + "{protocol: udp}, " * 5000 + "]\n",
            "t.yaml:10: a list or mapping of more than 4096 entries",
        ),
        (
            BASE + "engine:\n  failover_object_del: [" + "f1, " * 65 + "]\n",
            "t.yaml:10: key 'engine.failover_object_del': 65 ids; at most 64",
        ),
    ],
    ids=[
        "int",
        "float",
        "timestamp",
        "5000-digits",
        "4000-digits",
        "binary",
        "long-key",
        "nul",
        "flow-5000",
        "flow-20000",
        "block-40",
        "passthrough-257",
        "passthrough-5000",
        "object-del-65",
    ],
)
def test_unreadable_values_are_one_clear_line(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_aliases_count_at_each_use() -> None:
    """A few anchors can stand for millions of values ("billion laughs"): counted expanded."""
    text = (
        BASE
        + "a: &a [" + "1, " * 100 + "]\n"
        + "b: &b [" + "*a, " * 100 + "]\n"
        + "c: &c [" + "*b, " * 100 + "]\n"
        + "compare: {passthrough: *c}\n"
    )  # fmt: skip
    assert problems(text) == ["t.yaml:11: more than 16384 values, aliases counted at each use"]


def test_a_config_longer_than_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "# " + "x" * (1 << 20) + "\n")
    size = big.stat().st_size
    with pytest.raises(ConfigError) as raised:
        load_config(big)
    assert str(raised.value) == f"{big}: {size} bytes; a configuration file is at most 1048576"
    with pytest.raises(ConfigError) as raised:
        parse_config(big.read_text(), "t.yaml")
    assert str(raised.value) == f"t.yaml: {size} characters; a configuration is at most 1048576"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_only_a_regular_file_is_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    unblock = threading.Timer(10, _open_for_writing, [path])
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: an ordinary open() would wait forever
        what = "a FIFO"
        unblock.start()  # so that a reader that waits fails this test instead of hanging it
    elif kind == "directory":
        path.mkdir()
        what = "a directory"
    else:
        path = Path("/dev/null")  # /dev/zero would be read for ever
        what = "a character device"
    try:
        with pytest.raises(ConfigError) as raised:
            load_config(path)
    finally:
        unblock.cancel()
    assert str(raised.value) == f"{path}: not a regular file ({what})"


def _open_for_writing(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b"log: {level: \xe9}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}:9: not UTF-8: byte 0xe9 at byte {len(BASE) + 13}: invalid continuation byte"
    )


def _cli_cases(directory: Path) -> dict[str, Path]:
    """Files that broke check-config once, each named for how."""
    texts = {
        "int": BASE + "engine: {heartbeat_port: !!int abc}\n",
        "float": BASE + "engine: {heartbeat_port: !!float abc}\n",
        "timestamp": BASE + "engine: {qmp: !!timestamp 2020-99-99}\n",
        "digits": BASE + f"engine: {{heartbeat_port: {_int_digits(5000)}}}\n",
        "deep": _nested_flow(20000),
        "nul": "pair: {name: a\x00b}\n",
        "huge": BASE + "compare:\n  passthrough:\n" + "    - {protocol: udp}\n" * 300_000,
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = directory / f"{name}.yaml"
        paths[name].write_text(text)
    paths["fifo"] = directory / "fifo.yaml"
    os.mkfifo(paths["fifo"])
    return paths


@pytest.mark.parametrize(
    "case", ["int", "float", "timestamp", "digits", "deep", "nul", "huge", "fifo"]
)
def test_check_config_in_a_process_says_one_line(tmp_path: Path, case: str) -> None:
    path = _cli_cases(tmp_path)[case]
    done = subprocess.run(
        [sys.executable, "-m", "coloproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,  # a hang (a FIFO nobody writes) fails here instead of forever
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith(f"{path}"), done.stderr[:200]
    assert done.stdout == ""


def test_run_reads_the_config_the_same_way(tmp_path: Path) -> None:
    path = _cli_cases(tmp_path)["fifo"]
    done = subprocess.run(
        [sys.executable, "-m", "coloproxy", "run", "-c", str(path), "--no-setup"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == f"run: {path}: not a regular file (a FIFO)\n"


# -- checks across keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "queues: {max_len: 100}\n",
            "t.yaml:9: key 'queues.max_len': must be above compare.max_held_packets (4096):"
            " the kernel would drop PVM packets the comparator means to hold (I2)",
        ),
        (
            BASE + "queues:\n  max_len: 5000\ncompare:\n  max_held_packets: 5000\n",
            "t.yaml:10: key 'queues.max_len': must be above compare.max_held_packets (5000):"
            " the kernel would drop PVM packets the comparator means to hold (I2)",
        ),
        (
            # Blamed on what was written: here the comparator's bound.
            BASE + "compare:\n  max_held_packets: 9000\n",
            "t.yaml:10: key 'compare.max_held_packets': must be below queues.max_len (8192):"
            " the kernel would drop PVM packets the comparator means to hold (I2)",
        ),
    ],
)
def test_problems_across_keys(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_a_secondary_holds_nothing_so_its_queue_length_is_free() -> None:
    text = BASE.replace("primary", "secondary") + "queues: {max_len: 100}\n"
    assert parse_config(text, "t.yaml").queues is not None


# -- disk ------------------------------------------------------------------------------------

DISK_ENGINE = "engine:\n  qmp: /run/qmp.sock\n  heartbeat_key: /etc/hb.key\n"


def test_disk_defaults_and_every_key() -> None:
    text = (
        BASE
        + DISK_ENGINE
        + "disk:\n  image: /d/vm.img\n  active: /d/a.qcow2\n  hidden: /d/h.qcow2\n"
    )
    assert parse_config(text, "t.yaml").disk == DiskConfig(
        image="/d/vm.img", active="/d/a.qcow2", hidden="/d/h.qcow2"
    )
    every = (
        BASE + DISK_ENGINE + "disk:\n  image: /d/vm.qcow2\n  format: qcow2\n"
        "  active: /d/a.qcow2\n  hidden: /d/h.qcow2\n  nbd_port: 10809\n  drive: disk1\n"
        "  export: base1\n  sync_timeout_ms: 1000\n"
    )
    assert parse_config(every, "t.yaml").disk == DiskConfig(
        image="/d/vm.qcow2", active="/d/a.qcow2", hidden="/d/h.qcow2",
        format=DiskFormat.QCOW2, nbd_port=10809, drive="disk1", export="base1",
        sync_timeout_ms=1000,
    )  # fmt: skip
    assert parse_config(BASE, "t.yaml").disk is None


def test_disk_problems_name_file_line_and_key() -> None:
    engine = "engine:\n  qmp: /run/qmp.sock\n  heartbeat_key: /etc/hb.key\n"
    engine += "  migrate_uri: tcp:10.255.77.2:8889\n"
    text = (
        BASE + engine + "disk:\n"  # line 13
        "  image: vm.img\n"
        "  active: /d/a.qcow2\n"
        "  hidden: /d/a.qcow2\n"
        "  format: vmdk\n"
        "  drive: colo-disk0\n"
        "  export: colo-disk0\n"
    )
    assert problems(text) == [
        # nbd_port defaults to 8889: blamed on the section's line
        "t.yaml:13: key 'disk.nbd_port': 8889 is engine.migrate_uri's port: the secondary's"
        " NBD export and its -incoming listen on the same address",
        "t.yaml:14: key 'disk.image': expected an absolute path, got 'vm.img'",
        "t.yaml:16: key 'disk.hidden': same file as disk.active",
        "t.yaml:17: key 'disk.format': expected one of raw, qcow2, got 'vmdk'",
        "t.yaml:19: key 'disk.export': disk.drive and disk.export must differ",
    ]
    assert problems(BASE + "disk:\n  image: /d/i\n  active: /d/a\n  hidden: /d/h\n") == [
        "t.yaml:9: key 'disk': needs engine.qmp: the checkpoint engine drives the block"
        ' replication (docs/engine.md, "The disk")'
    ]
    assert problems(BASE + DISK_ENGINE + "disk:\n  image: /d/i\n") == [
        "t.yaml:12: key 'disk.active': missing; expected an absolute path: the secondary's"
        " active disk",
        "t.yaml:12: key 'disk.hidden': missing; expected an absolute path: the secondary's"
        " hidden disk",
    ]


def test_check_config_checks_the_disk_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _with_key(tmp_path, "pair-secondary.yaml")
    image, active = tmp_path / "vm.img", tmp_path / "a.qcow2"
    image.write_bytes(b"")
    active.write_bytes(b"")
    path.write_text(
        path.read_text()
        + f"disk:\n  image: {image}\n  active: {active}\n  hidden: {tmp_path}/h.qcow2\n"
    )
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"{tmp_path}/h.qcow2 (disk.hidden): does not exist\n"
    (tmp_path / "h.qcow2").write_bytes(b"")
    assert main(["check-config", str(path)]) == 0
