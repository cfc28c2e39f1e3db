"""Set up and tear down one pair's data path on one host (shell; docs/data-path.md).

Theory of operation
-------------------
Everything here acts on the network namespace of the calling thread: the daemon runs inside
its host's namespace, and tests call :func:`setup` through ``netns.run_in``. Links, bridges,
VXLAN and tc go through pyroute2; the NFQUEUE rules through ``iptables-restore --noflush``
and ``ip6tables-restore --noflush`` with text from :mod:`coloproxy.net.rules`.

**Idempotent setup.** Each step looks first and changes only what differs from the
parameters: a link that exists with the wanted kind and settings is kept, one that differs
is replaced, a tc filter that already mirrors to the right device is kept. Running
:func:`setup` twice leaves the same state as running it once.

**Complete teardown.** :func:`teardown` removes every object either role creates (the names
are fixed by the prefix, so nothing needs remembering): the tc filter on the guest port, the
clsact qdisc if no other filter uses it, the rules and chain, and the links. Missing objects
are skipped, so it is harmless twice or with nothing set up. Two settings stay: the
br_netfilter sysctls (other pairs and other software on the host rely on them; 1 is also
the kernel's default) and the guest port's master on host S (teardown does not know where
the operator wants it; after failover it is in the LAN bridge, where it must stay).

**Fail closed.** On host P the rules go in before the tc mirror exists, and the mirror goes
out before the rules: no moment in either order sends SVM output past an S-out rule that is
not there. On host S the rules go in before the SVM's port joins our bridge: no client copy
reaches the SVM unrewritten, and no SYN-ACK of the SVM's goes unseen. The NFQUEUE rules
themselves drop while no proxy listens (rules.py).

**Why clsact and not a root prio qdisc.** The mirror is a u32 match-all filter with a
``mirred egress mirror`` action on the guest port's egress, attached to a ``clsact`` qdisc's
egress hook. A root ``prio`` qdisc is not an option on this kernel (``CONFIG_NET_SCH_PRIO``
is not set; clsact comes with ``CONFIG_NET_SCH_INGRESS``), and clsact is better anyway: it
leaves the root qdisc alone (the operator's shaping, the kernel's default ``noqueue`` on veth
and tap), queues nothing (a prio qdisc adds bands that can drop under load, and the PVM's
input must not be dropped for our sake), and has one fixed handle, so there is no handle to
choose or clash with. Our filter has a preference of its own (``MIRROR_PREF``) above the
ones tc assigns automatically, so we find and remove exactly ours.

**The mirror port goes nowhere.** ``<p>-mir0`` has no address, IPv6 and ARP off: frames that
reach it (SVM output a proxy accepted from S-out, non-IP frames from the SVM) end there.
Should the host forward IPv4 (libvirt and docker hosts do), the chain's ``-i <p>-mir0 -j
DROP`` rule keeps it from routing them (I3); tc could drop them earlier, but this kernel has
no tc drop action (``CONFIG_NET_ACT_GACT`` is not set).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from coloproxy.errors import UsageError
from coloproxy.net import NetError
from coloproxy.net.netns import read_sysctl, run_command, write_sysctl
from coloproxy.net.rules import LinkNames, QueueNumbers, RuleSet, check_interface_name
from coloproxy.role import Role

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

VXLAN_PORT = 4789  # IANA's VXLAN port (RFC 7348 section 5)
# Outer Ethernet is not counted in the MTU; outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet
# 14 = 50 bytes, 70 with an IPv6 outer header (40).
VXLAN_OVERHEAD = {4: 50, 6: 70}
DEFAULT_VXLAN_MTU = 1500
GUEST_FRAME_MTU = 1500  # what a guest sends by default; a tunnel below it drops frames

# Neighbour states (include/uapi/linux/neighbour.h): bridge FDB entries the kernel did not learn.
NUD_NOARP = 0x40  # static
NUD_PERMANENT = 0x80  # the port's own address, or added as permanent

# tc: the clsact qdisc's fixed handle and hook parents (include/uapi/linux/pkt_sched.h).
CLSACT_HANDLE = 0xFFFF0000
CLSACT_INGRESS = 0xFFFFFFF2
CLSACT_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003
# Our filters' preference. The kernel assigns 49152 (0xC000) and counts down when tc is not
# given one, so 0xC010 ("COLO") never collides with automatic preferences.
MIRROR_PREF = 0xC010
TCA_EGRESS_MIRROR = 2  # mirred eaction (include/uapi/linux/tc_act/tc_mirred.h)

BRIDGE_NF_SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")

# (save command, restore command) per address family; the rules text is the same for both.
IPTABLES = {
    4: (("iptables-save", "-t", "filter"), ("iptables-restore", "-w", "--noflush")),
    6: (("ip6tables-save", "-t", "filter"), ("ip6tables-restore", "-w", "--noflush")),
}


@dataclass(frozen=True, slots=True)
class HostNet:
    """What one host of one pair needs to know to set up its part of the data path."""

    prefix: str  # at most 5 characters: every link name stays within Linux's 15
    pair: str
    role: Role
    guest_port: str  # the existing tap or veth of this host's VM
    local_address: Address  # this host's end of the replication link
    remote_address: Address  # the other host's end
    vxlan_id: int
    queues: QueueNumbers = field(default_factory=QueueNumbers)
    lan_bridge: str | None = None  # host S: where the guest port goes at failover
    vxlan_port: int = VXLAN_PORT
    underlay: str | None = None  # the replication link's device: MTU and tunnel binding

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError as exc:
            raise UsageError(f"role {self.role!r} is not primary or secondary") from exc
        for name in ("local_address", "remote_address"):
            value = getattr(self, name)
            if isinstance(value, str):  # tolerated from configs; stored parsed
                try:
                    object.__setattr__(self, name, ipaddress.ip_address(value))
                except ValueError as exc:
                    raise UsageError(f"{name} {value!r} is not an IP address") from exc
        if self.local_address.version != self.remote_address.version:
            raise UsageError(
                f"replication addresses {self.local_address} and {self.remote_address} "
                "are of different families"
            )
        if not 1 <= self.vxlan_id < 1 << 24:
            raise UsageError(f"vxlan id {self.vxlan_id} is not a VNI (1-16777215)")
        if not 1 <= self.vxlan_port <= 0xFFFF:
            raise UsageError(f"vxlan port {self.vxlan_port} is not a UDP port")
        for name in ("lan_bridge", "underlay"):
            value = getattr(self, name)
            if value is not None:
                check_interface_name(name.replace("_", " "), value)
        # validates the prefix, the pair name, the guest port and the queues
        RuleSet(self.prefix, self.pair, self.role, self.guest_port, self.queues)

    @property
    def links(self) -> LinkNames:
        return LinkNames(self.prefix)

    @property
    def rule_set(self) -> RuleSet:
        return RuleSet(self.prefix, self.pair, self.role, self.guest_port, self.queues)


# --------------------------------------------------------------------------------------------
# entry points


def setup(params: HostNet) -> None:
    """Create or update this host's part of the pair (idempotent)."""
    with _ipr() as ipr:
        guest = _require_link(ipr, params.guest_port, "guest port")
        if params.role is Role.PRIMARY:
            _setup_primary(ipr, params, guest)
        else:
            _setup_secondary(ipr, params, guest)


def teardown(params: HostNet) -> None:
    """Remove everything :func:`setup` of either role creates; harmless if nothing is there."""
    with _ipr() as ipr:
        guest = _find_link(ipr, params.guest_port)
        if guest is not None:
            _remove_mirror(ipr, guest["index"], params.guest_port)
        _remove_rules(params)
        for name in params.links.all():
            _delete_link(ipr, name)


def attach_guest_to_lan(params: HostNet) -> None:
    """Failover on host S: move the guest port from ``<p>-brs`` into the LAN bridge.

    One netlink request: the kernel takes the port out of its old bridge and puts it into the
    new one, so there is no moment when it is in both (which would loop the LAN through
    the tunnel) and the SVM's frames go to the LAN from the next one on.
    """
    if params.lan_bridge is None:
        raise UsageError(f"pair {params.pair}: attach_guest_to_lan needs lan_bridge")
    with _ipr() as ipr:
        guest = _require_link(ipr, params.guest_port, "guest port")
        lan = _require_link(ipr, params.lan_bridge, "LAN bridge")
        with _failing_as(f"moving guest port {params.guest_port} into {params.lan_bridge}"):
            ipr.link("set", index=guest["index"], master=lan["index"], state="up")


def guest_port_addresses(params: HostNet) -> tuple[bytes, list[bytes]]:
    """Host S: the guest port's own MAC address and the guest's, as the port's bridge learnt
    them from the guest's frames (unicast FDB entries of the port that are neither permanent
    nor static; the guest's latest frames are its SYN-ACKs, so its MAC is there).

    Read it *before* :func:`attach_guest_to_lan`: moving a port to another bridge flushes its
    learnt entries, and the LAN bridge learns the guest's MAC only when the guest next sends.
    A guest with several MACs on the port gives several (frames to the wrong one are dropped
    by the guest as not its own).
    """
    with _ipr() as ipr:
        guest = _require_link(ipr, params.guest_port, "guest port")
        with _failing_as(f"reading the bridge FDB of {params.guest_port}"):
            entries = list(ipr.fdb("dump", ifindex=guest["index"]))
    own = _mac_bytes(guest.get_attr("IFLA_ADDRESS"))
    learnt: list[bytes] = []
    for entry in entries:
        if entry.get("ifindex") != guest["index"] or entry.get_attr("NDA_MASTER") is None:
            continue  # another port's, or the device's own (multicast) list
        if entry.get("state", 0) & (NUD_PERMANENT | NUD_NOARP):
            continue  # the port's own address, or one an operator added
        mac = _mac_bytes(entry.get_attr("NDA_LLADDR"))
        if len(mac) == 6 and not mac[0] & 1 and mac != own and mac not in learnt:
            learnt.append(mac)
    return own, learnt


def send_to_guest(guest_port: str, frames: Sequence[bytes]) -> None:
    """Transmit Ethernet frames on the host side of the guest port: a tap hands them to QEMU,
    a veth to its peer, so the guest receives them. A packet socket bypasses the bridge and
    netfilter: nothing queues or rewrites these frames on their way."""
    what = f"sending {len(frames)} frame(s) to the guest on {guest_port}"
    # Protocol 0: the socket receives nothing.
    with _failing_as(what), socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((guest_port, 0))
        for frame in frames:
            sock.send(frame)


def _mac_bytes(text: str | None) -> bytes:
    return bytes.fromhex(text.replace(":", "")) if text else b""


# --------------------------------------------------------------------------------------------
# roles


def _setup_primary(ipr: Any, params: HostNet, guest: Any) -> None:
    links = params.links
    # A host that was the secondary before (roles swap after a failover) has a bridge of the
    # other role; the VXLAN moves into ours below.
    _delete_link(ipr, links.secondary_bridge)
    bridge = _ensure_bridge(ipr, links.primary_bridge)
    vxlan = _ensure_vxlan(ipr, params)
    mirror, mirror_peer = _ensure_veth(ipr, links.mirror, links.mirror_peer, _mtu(guest))
    for name in (links.primary_bridge, links.vxlan, links.mirror, links.mirror_peer):
        _disable_ipv6(name)
    with _failing_as(f"turning ARP off on {links.mirror}"):
        ipr.link("set", index=mirror, arp=False)
    for port, name in ((vxlan, links.vxlan), (mirror_peer, links.mirror_peer)):
        _set_master(ipr, port, name, bridge, links.primary_bridge)
    for index, name in (
        (bridge, links.primary_bridge),
        (vxlan, links.vxlan),
        (mirror_peer, links.mirror_peer),
        (mirror, links.mirror),
    ):
        _set_up(ipr, index, name)
    for key in BRIDGE_NF_SYSCTLS:
        if read_sysctl(key) != "1":
            write_sysctl(key, 1)
    _apply_rules(params)  # before the mirror: see "Fail closed" above
    _ensure_mirror(ipr, guest["index"], params.guest_port, mirror, links.mirror)


def _setup_secondary(ipr: Any, params: HostNet, guest: Any) -> None:
    links = params.links
    # What a primary setup left on this host would copy the SVM's input to nowhere, or
    # worse, mirror the SVM's port: none of it belongs to a secondary.
    _remove_mirror(ipr, guest["index"], params.guest_port)
    for name in (links.primary_bridge, links.mirror, links.mirror_peer):
        _delete_link(ipr, name)
    bridge = _ensure_bridge(ipr, links.secondary_bridge)
    vxlan = _ensure_vxlan(ipr, params)
    for name in (links.secondary_bridge, links.vxlan):
        _disable_ipv6(name)
    _set_master(ipr, vxlan, links.vxlan, bridge, links.secondary_bridge)
    for key in BRIDGE_NF_SYSCTLS:
        if read_sysctl(key) != "1":
            write_sysctl(key, 1)
    _apply_rules(params)  # S-in and the SVM's SYN-ACKs queued before the SVM joins the bridge
    # One request moves the port out of any other bridge (the LAN's, if the operator left it
    # there) into ours: the SVM must never be on the LAN while the pair is protected (I3).
    _set_master(ipr, guest["index"], params.guest_port, bridge, links.secondary_bridge)
    for index, name in (
        (bridge, links.secondary_bridge),
        (vxlan, links.vxlan),
        (guest["index"], params.guest_port),
    ):
        _set_up(ipr, index, name)


# --------------------------------------------------------------------------------------------
# links


@contextmanager
def _ipr() -> Iterator[Any]:
    try:
        ipr = IPRoute()
    except Exception as exc:  # pyroute2 may fail with OSError or its own errors
        raise NetError(f"opening a netlink socket: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """Turn a netlink or OS failure into a NetError naming what was being done."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        raise NetError(f"{what}: {exc}") from exc


def _find_link(ipr: Any, name: str) -> Any | None:
    with _failing_as(f"looking up link {name}"):
        found = ipr.get_links(ifname=name)
    return found[0] if found else None


def _require_link(ipr: Any, name: str, what: str) -> Any:
    link = _find_link(ipr, name)
    if link is None:
        raise NetError(f"{what} {name} does not exist")
    return link


def _delete_link(ipr: Any, name: str) -> None:
    link = _find_link(ipr, name)
    if link is not None:
        with _failing_as(f"deleting link {name}"):
            ipr.link("del", index=link["index"])


def _kind(link: Any) -> str | None:
    kind: str | None = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return kind


def _mtu(link: Any) -> int:
    return int(link.get_attr("IFLA_MTU"))


def _replace_if_wrong(ipr: Any, name: str, wanted: bool) -> Any | None:
    """The link called ``name`` if it is as wanted; deleted (and None) if it is not."""
    link = _find_link(ipr, name)
    if link is not None and not wanted:
        log.info("replacing link %s: it differs from what the pair needs", name)
        with _failing_as(f"deleting link {name}"):
            ipr.link("del", index=link["index"])
        return None
    return link


def _ensure_bridge(ipr: Any, name: str) -> int:
    link = _find_link(ipr, name)
    link = _replace_if_wrong(ipr, name, link is None or _kind(link) == "bridge")
    if link is None:
        with _failing_as(f"creating bridge {name}"):
            # No STP (two ports, no loop possible) so ports forward at once; no multicast
            # snooping, so IPv6 neighbour discovery reaches the SVM whatever MLD it has seen.
            ipr.link(
                "add",
                ifname=name,
                kind="bridge",
                br_stp_state=0,
                br_forward_delay=0,
                br_mcast_snooping=0,
            )
    return _index(ipr, name)


def _vxlan_settings(params: HostNet, underlay: int | None) -> dict[str, Any]:
    local, remote = params.local_address, params.remote_address
    suffix = "6" if local.version == 6 else ""
    settings: dict[str, Any] = {
        "vxlan_id": params.vxlan_id,
        f"vxlan_local{suffix}": str(local),
        f"vxlan_group{suffix}": str(remote),  # a unicast "group" is the one remote VTEP
        "vxlan_port": params.vxlan_port,
        "vxlan_learning": 1,
    }
    if underlay is not None:
        settings["vxlan_link"] = underlay
    return settings


def _vxlan_matches(link: Any, settings: dict[str, Any]) -> bool:
    if _kind(link) != "vxlan":
        return False
    for key, wanted in settings.items():
        actual = link.get_nested(
            "IFLA_LINKINFO", "IFLA_INFO_DATA", key.upper().replace("VXLAN", "IFLA_VXLAN", 1)
        )
        if key.startswith(("vxlan_local", "vxlan_group")):
            matches = actual is not None and ipaddress.ip_address(actual) == ipaddress.ip_address(
                wanted
            )
        else:
            matches = actual == wanted
        if not matches:
            return False
    return True


def _ensure_vxlan(ipr: Any, params: HostNet) -> int:
    name = params.links.vxlan
    underlay_index: int | None = None
    mtu = DEFAULT_VXLAN_MTU
    if params.underlay is not None:
        underlay = _require_link(ipr, params.underlay, "underlay")
        underlay_index = underlay["index"]
        mtu = _mtu(underlay) - VXLAN_OVERHEAD[params.local_address.version]
    if mtu < GUEST_FRAME_MTU:
        log.warning(
            "VXLAN %s gets MTU %d: guest frames above it are dropped; the replication link "
            "needs an MTU of at least %d",
            name,
            mtu,
            GUEST_FRAME_MTU + VXLAN_OVERHEAD[params.local_address.version],
        )
    settings = _vxlan_settings(params, underlay_index)
    link = _find_link(ipr, name)
    link = _replace_if_wrong(ipr, name, link is None or _vxlan_matches(link, settings))
    if link is None:
        with _failing_as(f"creating VXLAN {name} ({settings})"):
            ipr.link("add", ifname=name, kind="vxlan", mtu=mtu, **settings)
    index = _index(ipr, name)
    with _failing_as(f"setting MTU {mtu} on {name}"):
        ipr.link("set", index=index, mtu=mtu)
    return index


def _ensure_veth(ipr: Any, name: str, peer: str, mtu: int) -> tuple[int, int]:
    link = _find_link(ipr, name)
    peer_link = _find_link(ipr, peer)
    paired = (
        link is not None
        and peer_link is not None
        and _kind(link) == "veth"
        and link.get_attr("IFLA_LINK") == peer_link["index"]
    )
    if not paired:
        for stray in (name, peer):
            _replace_if_wrong(ipr, stray, False)
        with _failing_as(f"creating veth {name}/{peer}"):
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})
    indexes = (_index(ipr, name), _index(ipr, peer))
    for index, each in zip(indexes, (name, peer), strict=True):
        with _failing_as(f"setting MTU {mtu} on {each}"):
            ipr.link("set", index=index, mtu=mtu)
    return indexes


def _index(ipr: Any, name: str) -> int:
    return int(_require_link(ipr, name, "link")["index"])


def _set_master(ipr: Any, index: int, name: str, bridge: int, bridge_name: str) -> None:
    with _failing_as(f"adding {name} to bridge {bridge_name}"):
        ipr.link("set", index=index, master=bridge)


def _set_up(ipr: Any, index: int, name: str) -> None:
    with _failing_as(f"setting {name} up"):
        ipr.link("set", index=index, state="up")


def _disable_ipv6(name: str) -> None:
    """No link-local address, router solicitations or MLD from a link that only carries
    guest frames: the SVM would see them, and the PVM does not (I3 the other way round)."""
    key = f"net/ipv6/conf/{name}/disable_ipv6"
    try:
        current = read_sysctl(key)
    except NetError:
        return  # no IPv6 in this kernel or namespace: nothing to disable
    if current != "1":
        write_sysctl(key, 1)


# --------------------------------------------------------------------------------------------
# tc


def _ensure_clsact(ipr: Any, index: int, name: str) -> None:
    with _failing_as(f"listing qdiscs of {name}"):
        qdiscs = ipr.get_qdiscs(index=index)
    if any(q.get_attr("TCA_KIND") == "clsact" for q in qdiscs):
        return
    with _failing_as(f"adding a clsact qdisc to {name}"):
        ipr.tc("add", "clsact", index)


def _our_filters(ipr: Any, index: int, parent: int, name: str) -> list[Any]:
    with _failing_as(f"listing tc filters of {name}"):
        filters = ipr.get_filters(index=index, parent=parent)
    return [f for f in filters if f["info"] >> 16 == MIRROR_PREF]


def _actions(tc_filter: Any) -> list[tuple[str, Any]]:
    """(kind, options) of each action of a u32 filter node."""
    table = tc_filter.get_nested("TCA_OPTIONS", "TCA_U32_ACT")
    if table is None:
        return []
    found = []
    for _, action in table["attrs"]:
        found.append((action.get_attr("TCA_ACT_KIND"), action.get_attr("TCA_ACT_OPTIONS")))
    return found


def _has_action(filters: list[Any], check: Any) -> bool:
    return any(check(kind, options) for f in filters for kind, options in _actions(f))


def _replace_filter(ipr: Any, index: int, parent: int, name: str, action: dict[str, Any]) -> None:
    _delete_our_filters(ipr, index, parent, name)
    with _failing_as(f"adding a tc filter ({action['kind']}) to {name}"):
        ipr.tc(
            "add-filter",
            "u32",
            index,
            parent=parent,
            prio=MIRROR_PREF,
            protocol=ETH_P_ALL,
            target=0,
            keys=["0x0/0x0+0"],  # "match u32 0 0": every frame
            action=action,
        )


def _delete_our_filters(ipr: Any, index: int, parent: int, name: str) -> None:
    if not _our_filters(ipr, index, parent, name):
        return
    with _failing_as(f"deleting our tc filter on {name}"):
        ipr.tc("del-filter", index=index, parent=parent, prio=MIRROR_PREF, protocol=ETH_P_ALL)


def _ensure_mirror(ipr: Any, guest: int, guest_name: str, mirror: int, mirror_name: str) -> None:
    _ensure_clsact(ipr, guest, guest_name)

    def mirrors_to_us(kind: str, options: Any) -> bool:
        if kind != "mirred" or options is None:
            return False
        parms = options.get_attr("TCA_MIRRED_PARMS")
        return bool(parms["eaction"] == TCA_EGRESS_MIRROR and parms["ifindex"] == mirror)

    if _has_action(_our_filters(ipr, guest, CLSACT_EGRESS, guest_name), mirrors_to_us):
        return
    _replace_filter(
        ipr,
        guest,
        CLSACT_EGRESS,
        guest_name,
        {"kind": "mirred", "direction": "egress", "action": "mirror", "ifindex": mirror},
    )
    log.info("mirroring %s egress to %s", guest_name, mirror_name)


def _remove_mirror(ipr: Any, index: int, name: str) -> None:
    """Our egress filter off the guest port, and clsact too if nothing else uses it."""
    _delete_our_filters(ipr, index, CLSACT_EGRESS, name)
    with _failing_as(f"listing qdiscs of {name}"):
        qdiscs = ipr.get_qdiscs(index=index)
    if not any(q.get_attr("TCA_KIND") == "clsact" for q in qdiscs):
        return
    with _failing_as(f"listing tc filters of {name}"):
        others = [
            f
            for parent in (CLSACT_INGRESS, CLSACT_EGRESS)
            for f in ipr.get_filters(index=index, parent=parent)
        ]
    if others:
        return  # someone else's filters: their clsact stays
    with _failing_as(f"deleting the clsact qdisc of {name}"):
        ipr.tc("del", "clsact", index)


# --------------------------------------------------------------------------------------------
# iptables


def check_rules(params: HostNet) -> dict[str, tuple[str, ...]]:
    """What is missing of this host's rules, by address family (``ipv4``, ``ipv6``); empty
    when both tables hold them whole (RuleSet.problems)."""
    found: dict[str, tuple[str, ...]] = {}
    for family, (save, _) in IPTABLES.items():
        problems = params.rule_set.problems(run_command(save).stdout)
        if problems:
            found[f"ipv{family}"] = problems
    return found


def apply_rules(params: HostNet) -> None:
    """Put this host's rules (chain, rules, jump) in place again, as :func:`setup` does."""
    _apply_rules(params)


def _apply_rules(params: HostNet) -> None:
    for family, (save, restore) in IPTABLES.items():
        listing = run_command(save).stdout
        text = params.rule_set.apply_text(listing)
        if text:
            run_command(restore, input=text)
            log.debug("IPv%d rules of pair %s:\n%s", family, params.pair, text)


def _remove_rules(params: HostNet) -> None:
    for save, restore in IPTABLES.values():
        text = params.rule_set.teardown_text(run_command(save).stdout)
        if text:
            run_command(restore, input=text)
