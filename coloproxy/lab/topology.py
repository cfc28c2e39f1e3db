"""One machine, several hosts: the network namespaces a pair runs in for tests and the lab.

::

    <prefix>-client        <prefix>-lan               <prefix>-hp (host P)        <prefix>-pvm
      eth0 ─────────────── lan-client                  br-lan
                           br-lan                        ├─ uplink ─┐
                             ├─ lan-hp ─────────────────────────────┘
                             │                           └─ guest0 ─────────────── eth0
                             │                         repl ══╗
                             │                                ║ replication link
                             │                 <prefix>-hs (host S)               <prefix>-svm
                             │                         repl ══╝
                             └─ lan-hs ───────────────── uplink ─ br-lan
                                                       guest0 (in no bridge) ───── eth0

Every line is a veth pair; the names are fixed (each namespace has its own interface
names, so only the namespaces carry the prefix):

| namespace | interface | address | what |
|---|---|---|---|
| ``-lan`` | ``br-lan`` | none | the LAN switch; ports ``lan-client``, ``lan-hp``, ``lan-hs`` |
| ``-client`` | ``eth0`` | 10.77.0.10/24, fd77::10/64 | a client of the service |
| ``-hp`` | ``br-lan`` | none | host P's LAN bridge: ``uplink`` and ``guest0`` |
| ``-hp`` | ``guest0`` | none | host P's guest port (the PVM's tap in a real host) |
| ``-hp`` | ``repl`` | 10.255.77.1/30, fd77:255::1/126 | replication link, MTU 9000 |
| ``-hs`` | ``br-lan`` | none | host S's LAN bridge: ``uplink`` only while protected |
| ``-hs`` | ``guest0`` | none | host S's guest port, in no bridge (setup puts it in ``<p>-brs``) |
| ``-hs`` | ``repl`` | 10.255.77.2/30, fd77:255::2/126 | replication link, MTU 9000 |
| ``-pvm``, ``-svm`` | ``eth0`` | 10.77.0.100/24, fd77::100/64 | the two guests (*) |

(*) Both guests have the same addresses and the same MAC, 52:54:00:77:00:64, as COLO's two
VMs do; the client's MAC is 52:54:00:77:00:0a.

The addresses exist only inside these namespaces. Duplicate address detection is off in
every namespace (``accept_dad=0`` before any link exists) and IPv6 addresses are added with
``nodad``: the two guests share their addresses, link-local ones included, and DAD would
disable them on whichever saw the other's probe; tests also must not wait a second for it.
Links that only carry frames (bridges, uplinks, guest ports) have IPv6 off, so no router
solicitation or MLD report of ours shows up in a capture.

The first end of every veth pair gets an interface index of 100 and up, so that no veth has
the same index as its peer: the kernel's linkwatch delays carrier events of such a veth by up
to a second (they look like a non-stacked device's), and IPv6 on the link waits for them.

With ``witness=True`` (the lab's quorum mode) a third host joins the LAN, and each host gets a
management address on it for the quorum service (one etcd member per host, docs/lab.md):

| namespace | interface | address | what |
|---|---|---|---|
| ``-lan`` | ``lan-hpm``, ``lan-hsm``, ``lan-wit`` | none | more ports of ``br-lan`` |
| ``-hp`` | ``mgmt`` | 10.77.0.1/24 | host P's own address on the LAN (not its guest's bridge) |
| ``-hs`` | ``mgmt`` | 10.77.0.2/24 | host S's |
| ``-wit`` | ``mgmt`` | 10.77.0.3/24 | the witness: a third host, only for the quorum |

Guests are pluggable: ``guests="netns"`` (now) puts each guest in a namespace of its own
behind a veth; ``guests="tap"`` creates tap devices named ``guest0`` in the host namespaces
instead, for QEMU to open (``ip netns exec <prefix>-hp qemu ... -netdev tap,ifname=guest0,
script=no,downscript=no``); a tap has no carrier until QEMU opens it.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from coloproxy.errors import UsageError
from coloproxy.net import NetError, netns
from coloproxy.net.rules import PREFIX_MAX

P = ParamSpec("P")
T = TypeVar("T")

GuestMode = Literal["netns", "tap"]

LAN_BRIDGE = "br-lan"
UPLINK = "uplink"
GUEST_PORT = "guest0"
REPLICATION = "repl"
GUEST_INTERFACE = "eth0"
CLIENT_INTERFACE = "eth0"

LAN_IPV4_NETWORK = "10.77.0.0/24"
LAN_IPV6_NETWORK = "fd77::/64"
CLIENT_IPV4 = "10.77.0.10"
CLIENT_IPV6 = "fd77::10"
CLIENT_MAC = "52:54:00:77:00:0a"
GUEST_IPV4 = "10.77.0.100"
GUEST_IPV6 = "fd77::100"
# 52:54:00 is the prefix QEMU gives its NICs: the lab's guests will look like this anyway.
GUEST_MAC = "52:54:00:77:00:64"
REPLICATION_IPV4 = {"hp": "10.255.77.1", "hs": "10.255.77.2"}
REPLICATION_IPV6 = {"hp": "fd77:255::1", "hs": "fd77:255::2"}
REPLICATION_PREFIXLEN = {4: 30, 6: 126}
# A VXLAN frame is 50 bytes (70 over IPv6) longer than the guest's: 9000 leaves room for
# guests with jumbo frames too (docs/data-path.md, "Why VXLAN").
REPLICATION_MTU = 9000

IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h

# Interface indexes of the first end of each veth pair: far above the ones the kernel hands
# out in a namespace holding a handful of links (see Topology._ensure_veth).
FIRST_VETH_INDEX = 100

ROLES = ("lan", "client", "hp", "hs", "pvm", "svm", "wit")
MGMT = "mgmt"
# The hosts' own addresses on the LAN (witness mode): the quorum service's members.
MGMT_IPV4 = {"hp": "10.77.0.1", "hs": "10.77.0.2", "wit": "10.77.0.3"}


@dataclass(frozen=True, slots=True)
class _Veth:
    namespace: str  # role whose namespace holds the first end
    name: str
    peer_namespace: str
    peer_name: str
    mtu: int | None = None


@dataclass(frozen=True, slots=True)
class _Address:
    namespace: str
    interface: str
    address: str
    prefixlen: int


class Topology:
    """The namespaces of one host pair plus a LAN and a client; see the module docstring."""

    def __init__(
        self, prefix: str = "cpt", guests: GuestMode = "netns", *, witness: bool = False
    ) -> None:
        # Namespace names are not limited to 15 characters, but keep prefixes short anyway:
        # the lab may reuse them for link names.
        if not prefix or len(prefix) > 2 * PREFIX_MAX or not prefix.replace("-", "").isalnum():
            raise UsageError(f"topology prefix {prefix!r}: 1-10 letters, digits and '-'")
        if guests not in ("netns", "tap"):
            raise UsageError(f"guests must be 'netns' or 'tap', not {guests!r}")
        self.prefix = prefix
        self.guests: GuestMode = guests
        self.witness = witness

    # ----------------------------------------------------------------------------------------
    # names

    def ns(self, role: str) -> str:
        """The namespace of ``role`` ("lan", "client", "hp", "hs", "pvm", "svm")."""
        if role not in ROLES:
            raise UsageError(f"no role {role!r} in the topology; roles are {', '.join(ROLES)}")
        if role in ("pvm", "svm") and self.guests != "netns":
            raise UsageError(f"guests={self.guests!r} has no {role} namespace")
        if role == "wit" and not self.witness:
            raise UsageError("this topology has no witness")
        return f"{self.prefix}-{role}"

    def roles(self) -> tuple[str, ...]:
        roles = ROLES[:6] if self.guests == "netns" else ROLES[:4]
        return (*roles, "wit") if self.witness else roles

    def hosts(self) -> tuple[str, ...]:
        """The roles with a management address (witness mode): the quorum's members."""
        return ("hp", "hs", "wit") if self.witness else ()

    def namespaces(self) -> list[str]:
        return [self.ns(role) for role in self.roles()]

    def _veths(self) -> list[_Veth]:
        veths = [
            _Veth("lan", "lan-client", "client", CLIENT_INTERFACE),
            _Veth("lan", "lan-hp", "hp", UPLINK),
            _Veth("lan", "lan-hs", "hs", UPLINK),
            _Veth("hp", REPLICATION, "hs", REPLICATION, REPLICATION_MTU),
        ]
        if self.guests == "netns":
            veths += [
                _Veth("hp", GUEST_PORT, "pvm", GUEST_INTERFACE),
                _Veth("hs", GUEST_PORT, "svm", GUEST_INTERFACE),
            ]
        veths += [_Veth("lan", _lan_port(host), host, MGMT) for host in self.hosts()]
        return veths

    def _bridges(self) -> dict[str, tuple[str, ...]]:
        """Bridges per role and their ports. Host S's guest port is in none (I3)."""
        return {
            "lan": ("lan-client", "lan-hp", "lan-hs", *map(_lan_port, self.hosts())),
            "hp": (UPLINK, GUEST_PORT),
            "hs": (UPLINK,),
        }

    def _addresses(self) -> list[_Address]:
        found = [
            _Address("client", CLIENT_INTERFACE, CLIENT_IPV4, 24),
            _Address("client", CLIENT_INTERFACE, CLIENT_IPV6, 64),
        ]
        for host in ("hp", "hs"):
            found += [
                _Address(host, REPLICATION, REPLICATION_IPV4[host], REPLICATION_PREFIXLEN[4]),
                _Address(host, REPLICATION, REPLICATION_IPV6[host], REPLICATION_PREFIXLEN[6]),
            ]
        if self.guests == "netns":
            for guest in ("pvm", "svm"):
                found += [
                    _Address(guest, GUEST_INTERFACE, GUEST_IPV4, 24),
                    _Address(guest, GUEST_INTERFACE, GUEST_IPV6, 64),
                ]
        found += [_Address(host, MGMT, MGMT_IPV4[host], 24) for host in self.hosts()]
        return found

    def _frame_only_links(self) -> dict[str, tuple[str, ...]]:
        """Links that carry frames and have no address of ours: IPv6 off."""
        return {
            "lan": (LAN_BRIDGE, "lan-client", "lan-hp", "lan-hs", *map(_lan_port, self.hosts())),
            "hp": (LAN_BRIDGE, UPLINK, GUEST_PORT),
            "hs": (LAN_BRIDGE, UPLINK, GUEST_PORT),
        }

    def describe(self) -> dict[str, Any]:
        """Names and addresses, for configs and tests (plain data, JSON-serialisable)."""

        def host(role: str) -> dict[str, Any]:
            return {
                "namespace": self.ns(role),
                "lan_bridge": LAN_BRIDGE,
                "uplink": UPLINK,
                "guest_port": GUEST_PORT,
                "replication": {
                    "interface": REPLICATION,
                    "ipv4": REPLICATION_IPV4[role],
                    "ipv6": REPLICATION_IPV6[role],
                    "mtu": REPLICATION_MTU,
                },
            }

        described: dict[str, Any] = {
            "prefix": self.prefix,
            "guests": self.guests,
            "namespaces": {role: self.ns(role) for role in self.roles()},
            "lan": {
                "namespace": self.ns("lan"),
                "bridge": LAN_BRIDGE,
                "ipv4_network": LAN_IPV4_NETWORK,
                "ipv6_network": LAN_IPV6_NETWORK,
            },
            "client": {
                "namespace": self.ns("client"),
                "interface": CLIENT_INTERFACE,
                "ipv4": CLIENT_IPV4,
                "ipv6": CLIENT_IPV6,
                "mac": CLIENT_MAC,
            },
            "guest": {
                "interface": GUEST_INTERFACE,
                "ipv4": GUEST_IPV4,
                "ipv6": GUEST_IPV6,
                "mac": GUEST_MAC,
            },
            "hp": host("hp"),
            "hs": host("hs"),
        }
        if self.witness:
            described["mgmt"] = {
                host: {"namespace": self.ns(host), "interface": MGMT, "ipv4": MGMT_IPV4[host]}
                for host in self.hosts()
            }
        if self.guests == "netns":
            described["pvm"] = {"namespace": self.ns("pvm"), "interface": GUEST_INTERFACE}
            described["svm"] = {"namespace": self.ns("svm"), "interface": GUEST_INTERFACE}
        return described

    # ----------------------------------------------------------------------------------------
    # life cycle

    def up(self) -> Topology:
        """Build whatever is missing; running it again changes nothing."""
        for role in self.roles():
            netns.create(self.ns(role))
            # Before any link exists, so that every link inherits it: the two guests share
            # addresses (link-local ones too, from the shared MAC) by design, and duplicate
            # address detection would flag them as soon as mirrored copies arrive.
            self.run_in(role, _no_dad)
        for number, veth in enumerate(self._veths()):
            self.run_in(veth.namespace, self._ensure_veth, veth, FIRST_VETH_INDEX + number)
        if self.guests == "tap":
            for host in ("hp", "hs"):
                self.run_in(host, _ensure_tap, GUEST_PORT)
        for role, ports in self._bridges().items():
            self.run_in(role, _ensure_bridge, LAN_BRIDGE, ports)
        for role, links in self._frame_only_links().items():
            self.run_in(role, _disable_ipv6, links)
        if self.guests == "netns":
            for guest in ("pvm", "svm"):
                self.run_in(guest, _set_mac, GUEST_INTERFACE, GUEST_MAC)
        self.run_in("client", _set_mac, CLIENT_INTERFACE, CLIENT_MAC)
        for address in self._addresses():
            self.run_in(address.namespace, _ensure_address, address)
        for role in self.roles():
            self.run_in(role, _all_up)
        return self

    def down(self) -> None:
        """End the processes inside our namespaces and delete them; harmless twice."""
        names = self.namespaces()
        witness = f"{self.prefix}-wit"  # a lab brought up in witness mode, taken down without
        if witness not in names and netns.exists(witness):
            names.append(witness)
        for name in names:
            netns.kill_processes(name)
            netns.delete(name)

    def __enter__(self) -> Topology:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()

    # ----------------------------------------------------------------------------------------
    # running things inside

    def _resolve(self, where: str) -> str:
        """A role ("hp") or a full namespace name of ours ("cpt-hp")."""
        if where in self.namespaces():
            return where
        return self.ns(where)

    def exec(
        self,
        where: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace of ``where`` (a role or a namespace name) and wait."""
        return netns.run(self._resolve(where), argv, input=input, check=check, timeout=timeout)

    def popen(self, where: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace of ``where``; the caller waits for it."""
        return netns.popen(self._resolve(where), argv, **kwargs)

    def run_in(self, where: str, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``function`` in a thread inside the namespace of ``where`` (netns.run_in)."""
        return netns.run_in(self._resolve(where), function, *args, **kwargs)

    def _ensure_veth(self, veth: _Veth, index: int) -> None:
        """In ``veth.namespace``: create the pair with its peer straight in the other one.

        The first end gets ``index``; the peer gets the next free one of its namespace, which
        is far below. Equal indexes on the two ends would make the kernel's linkwatch treat
        their carrier events as not urgent and report the links' operstate (and start IPv6
        on them) up to a second late; pyroute2 cannot set the peer's index itself.
        """
        with _netlink(f"veth {veth.name} in {self.ns(veth.namespace)}") as ipr:
            if ipr.link_lookup(ifname=veth.name):
                return
            peer_ns = self.ns(veth.peer_namespace)
            extra: dict[str, Any] = {} if veth.mtu is None else {"mtu": veth.mtu}
            ipr.link(
                "add",
                ifname=veth.name,
                index=index,
                kind="veth",
                peer={"ifname": veth.peer_name, "net_ns_fd": peer_ns, **extra},
                **extra,
            )


def _lan_port(host: str) -> str:
    """The LAN switch's port of a host's management link."""
    return "lan-wit" if host == "wit" else f"lan-{host}m"


# --------------------------------------------------------------------------------------------
# steps, each run inside one namespace


@contextlib.contextmanager
def _netlink(what: str) -> Any:
    """An IPRoute in the calling thread's namespace; failures become NetError naming ``what``."""
    try:
        with IPRoute() as ipr:
            yield ipr
    except (NetlinkError, OSError) as exc:
        raise NetError(f"{what}: {exc}") from exc


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetError(f"link {name} does not exist")
    return int(found[0])


def _ensure_tap(name: str) -> None:
    with _netlink(f"tap {name}") as ipr:
        if not ipr.link_lookup(ifname=name):
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")


def _ensure_bridge(name: str, ports: Sequence[str]) -> None:
    with _netlink(f"bridge {name}") as ipr:
        if not ipr.link_lookup(ifname=name):
            # No STP: ports forward at once. No multicast snooping: the guests' IPv6
            # neighbour discovery must not depend on which MLD reports a bridge has seen.
            ipr.link(
                "add",
                ifname=name,
                kind="bridge",
                br_stp_state=0,
                br_forward_delay=0,
                br_mcast_snooping=0,
            )
        bridge = _index(ipr, name)
        for port in ports:
            ipr.link("set", index=_index(ipr, port), master=bridge)


def _no_dad() -> None:
    for scope in ("default", "all"):
        netns.write_sysctl(f"net/ipv6/conf/{scope}/accept_dad", 0)


def _disable_ipv6(links: Sequence[str]) -> None:
    for link in links:
        netns.write_sysctl(f"net/ipv6/conf/{link}/disable_ipv6", 1)


def _set_mac(interface: str, mac: str) -> None:
    with _netlink(f"MAC address of {interface}") as ipr:
        ipr.link("set", index=_index(ipr, interface), address=mac)


def _ensure_address(address: _Address) -> None:
    with _netlink(f"address {address.address} on {address.interface}") as ipr:
        index = _index(ipr, address.interface)
        present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
        if address.address in present:
            return
        extra = {"flags": IFA_F_NODAD} if ":" in address.address else {}
        ipr.addr("add", index=index, address=address.address, prefixlen=address.prefixlen, **extra)


def _all_up() -> None:
    with _netlink("setting links up") as ipr:
        for link in ipr.get_links():
            if not link["flags"] & 1:  # IFF_UP
                ipr.link("set", index=link["index"], state="up")
