"""Names of one pair's links and chain, and its NFQUEUE rules as ``iptables-restore`` text (pure).

Theory of operation
-------------------
Every rule of a pair lives in one chain of our own, ``CP-<PAIR>`` in the filter table, reached
by one jump from ``FORWARD``; br_netfilter makes bridged frames traverse ``FORWARD``, and
``-m physdev --physdev-in`` tells the three streams apart by the bridge port they came in on
(docs/data-path.md). The rules are the same for IPv4 and IPv6 (physdev and NFQUEUE do not
look at the address family), so one text serves ``iptables-restore`` and
``ip6tables-restore``; only the listing each one is planned from differs.

The shell reads the table (``iptables-save -t filter``), hands the listing to
:meth:`RuleSet.apply_text` or :meth:`RuleSet.teardown_text` and pipes the result into
``iptables-restore --noflush``. Why plan from a listing instead of writing one fixed text:

- ``iptables-restore`` applies a text as one transaction: a failing line aborts all of it,
  so the chain and its jump appear together or not at all, and no half-installed state is
  ever visible.
- Declaring a chain (``:CP-X - [0:0]``) under ``--noflush`` creates it or, when it exists,
  flushes it. The chain's *contents* are therefore naturally idempotent.
- The jump from ``FORWARD`` is a rule in a chain we do not own and must not flush. No text is
  idempotent for it on its own: ``-A``/``-I`` add a second copy every time, and ``-D`` fails
  (aborting the whole transaction) when there is none. So the jump is emitted only when the
  listing has none, and surplus copies (left by an older tool or a crash between two
  commands) are deleted. Reading and then writing races only with another writer of the
  same chain, and there is one daemon per pair.

The jump is inserted at the top of ``FORWARD``: an ``ACCEPT`` earlier in the chain (docker
and libvirt add such rules) would let PVM output bypass the queue, failing open. The
NFQUEUE rules carry no ``--queue-bypass``: with no consumer bound the kernel drops what
would be queued, so PVM output stops and SVM output stays off the LAN (fail closed, I1/I3).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from coloproxy.errors import UsageError
from coloproxy.role import Role

# Linux interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
IFNAMSIZ_MAX = 15
# The longest derived name is "<prefix>-mir0": a 5-character prefix keeps it at 10, within
# IFNAMSIZ, and leaves the operator room in their own names.
PREFIX_MAX = 5
# iptables-legacy limits chain names to 28 characters (XT_EXTENSION_MAXNAMELEN 29 with the
# NUL); iptables-nft accepts longer ones, but a name must work with both back ends.
CHAIN_MAX = 28
CHAIN_PREFIX = "CP-"
# The restore text is parsed by iptables' own tokenizer: names must not contain blanks,
# quotes or anything a shell or iptables would interpret. A conservative alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
QUEUE_MAX = 0xFFFF  # NFQUEUE queue numbers are 16 bits


def _check_name(what: str, value: str, limit: int) -> None:
    if not (_NAME.fullmatch(value) and len(value) <= limit):
        raise UsageError(
            f"{what} {value!r} must be 1-{limit} characters of letters, digits, '_', '.' "
            "and '-', starting with a letter or digit"
        )


def check_interface_name(what: str, value: str) -> None:
    """Raise UsageError unless ``value`` is a usable interface name (<= 15 characters)."""
    _check_name(what, value, IFNAMSIZ_MAX)


@dataclass(frozen=True, slots=True)
class LinkNames:
    """The links coloproxy creates on a host, all named ``<prefix>-<role of the link>``.

    The prefix is at most 5 characters so that every name stays within Linux's 15.
    """

    prefix: str

    def __post_init__(self) -> None:
        _check_name("net prefix", self.prefix, PREFIX_MAX)

    @property
    def vxlan(self) -> str:
        """The VXLAN tunnel between the two hosts (both roles)."""
        return f"{self.prefix}-vx"

    @property
    def mirror(self) -> str:
        """Host P: the veth end tc mirrors the guest port's egress into; no address, no ARP."""
        return f"{self.prefix}-mir0"

    @property
    def mirror_peer(self) -> str:
        """Host P: the other veth end, a port of the primary bridge; S-in matches here."""
        return f"{self.prefix}-mir1"

    @property
    def primary_bridge(self) -> str:
        """Host P: bridges the mirror peer with the VXLAN."""
        return f"{self.prefix}-brm"

    @property
    def secondary_bridge(self) -> str:
        """Host S: bridges the SVM's guest port with the VXLAN."""
        return f"{self.prefix}-brs"

    def all(self) -> tuple[str, ...]:
        """Every name, for teardown (which removes both roles' links)."""
        return (
            self.primary_bridge,
            self.secondary_bridge,
            self.vxlan,
            self.mirror,
            self.mirror_peer,
        )


def chain_name(pair: str) -> str:
    """``CP-<PAIR>``: the pair name upper-cased, at most 28 characters in all."""
    _check_name("pair name", pair, CHAIN_MAX - len(CHAIN_PREFIX))
    return CHAIN_PREFIX + pair.upper()


@dataclass(frozen=True, slots=True)
class QueueNumbers:
    """NFQUEUE numbers of one pair; a role uses the ones it needs and ignores the rest."""

    primary_out: int | None = None  # host P, P-out: PVM egress, held until matched
    secondary_out: int | None = None  # host P, S-out: SVM egress over the tunnel, compared, dropped
    secondary_in: int | None = None  # host S, S-in: client packets on their way to the SVM
    secondary_egress: int | None = (
        None  # host S: the SVM's TCP output (learn; after takeover shift)
    )

    def __post_init__(self) -> None:
        for name in QUEUE_FIELDS:
            number = getattr(self, name)
            if number is not None and not 0 <= number <= QUEUE_MAX:
                raise UsageError(f"queue {name} {number} is not a queue number (0-{QUEUE_MAX})")


QUEUE_FIELDS: tuple[str, ...] = ("primary_out", "secondary_out", "secondary_in", "secondary_egress")

# Which queues a role installs and what each matches, as data (``{guest_port}``, ``{vxlan}``
# are the links): a role that later queues something more adds a row.
# Host P queues the PVM's output (P-out) and the SVM's output arriving over the tunnel
# (S-out). Host S queues TCP on its way into the SVM (S-in: the client's ACKs are moved into
# the SVM's space, whether they come mirrored over the tunnel or, after a takeover, from the
# LAN) and the SVM's own TCP output: towards the tunnel only SYN-ACKs (the rewriter learns
# the SVM's ISNs from them and host P compares the rest as it is), anywhere else every
# segment (after a takeover the SVM's numbers are moved back into the PVM's space).
_QUEUED_STREAMS: dict[Role, tuple[tuple[str, str], ...]] = {
    Role.PRIMARY: (
        ("primary_out", "-m physdev --physdev-in {guest_port}"),
        ("secondary_out", "-m physdev --physdev-in {vxlan}"),
    ),
    Role.SECONDARY: (
        ("secondary_in", "-p tcp -m physdev --physdev-out {guest_port}"),
        (
            "secondary_egress",
            "-p tcp -m physdev --physdev-in {guest_port} --physdev-out {vxlan}"
            " -m tcp --tcp-flags SYN,ACK SYN,ACK",
        ),
        ("secondary_egress", "-p tcp -m physdev --physdev-in {guest_port} ! --physdev-out {vxlan}"),
    ),
}
# Links whose received packets are never forwarded. The mirror port receives whatever the
# primary bridge sends towards it, the SVM's output included; it has no address, but a host
# that routes IPv4 (libvirt and docker hosts do) would route those packets to the LAN (I3).
_DROPPED_INPUTS: dict[Role, tuple[str, ...]] = {
    Role.PRIMARY: ("mirror",),
    Role.SECONDARY: (),
}


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The NFQUEUE rules of one pair on one host."""

    prefix: str
    pair: str
    role: Role
    guest_port: str
    queues: QueueNumbers

    def __post_init__(self) -> None:
        LinkNames(self.prefix)  # validates the prefix
        chain_name(self.pair)  # validates the pair name
        check_interface_name("guest port", self.guest_port)
        used = list(dict.fromkeys(name for name, _ in _QUEUED_STREAMS[Role(self.role)]))
        numbers = [getattr(self.queues, name) for name in used]
        missing = [name for name, number in zip(used, numbers, strict=True) if number is None]
        if missing:
            raise UsageError(f"role {self.role} needs queue numbers for {', '.join(missing)}")
        if len(set(numbers)) != len(numbers):
            raise UsageError(f"queue numbers of role {self.role} must differ: {numbers}")

    @property
    def chain(self) -> str:
        return chain_name(self.pair)

    @property
    def links(self) -> LinkNames:
        return LinkNames(self.prefix)

    def rules(self) -> tuple[str, ...]:
        """The rule specifications in our chain, in order, without ``-A <chain>``."""
        role = Role(self.role)
        ports = {
            "guest_port": self.guest_port,
            "vxlan": self.links.vxlan,
            "mirror_peer": self.links.mirror_peer,
            "mirror": self.links.mirror,
        }
        queued = tuple(
            f"{match.format(**ports)} -j NFQUEUE --queue-num {getattr(self.queues, queue)}"
            for queue, match in _QUEUED_STREAMS[role]
        )
        return queued + tuple(f"-i {ports[link]} -j DROP" for link in _DROPPED_INPUTS[role])

    def apply_text(self, listing: str) -> str:
        """Text that makes the table hold exactly our chain, its rules and one jump.

        ``listing`` is the current ``iptables-save -t filter`` (or ``ip6tables-save``) output.
        A role without rules gets the teardown text: no chain, no jump.
        """
        rules = self.rules()
        if not rules:
            return self.teardown_text(listing)
        chain = self.chain
        jumps = [ref for ref in _references(listing, chain) if ref == _FORWARD_JUMP]
        lines = [
            f"# coloproxy: pair {self.pair}, role {self.role}",
            "*filter",
            f":{chain} - [0:0]",  # creates the chain, or flushes it under --noflush
            *(f"-A {chain} {rule}" for rule in rules),
        ]
        if not jumps:
            lines.append(f"-I FORWARD 1 -j {chain}")
        lines.extend(f"-D FORWARD -j {chain}" for _ in jumps[1:])
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def problems(self, listing: str) -> tuple[str, ...]:
        """What the listing lacks of our chain, its rules and the jump to it; ``()`` when all
        is in place. The daemon checks this periodically: another firewall manager may
        flush or rewrite the table (docs/operations.md).

        Rules are compared by what they do (``-j`` and after), not as whole lines:
        iptables-save orders and spells the matches its own way.
        """
        rules = self.rules()
        if not rules:
            return ()
        chain = self.chain
        if not _chain_exists(listing, chain):
            return (f"chain {chain} missing",)
        problems = []
        if not any(ref == _FORWARD_JUMP for ref in _references(listing, chain)):
            problems.append(f"no jump from FORWARD to {chain}")
        expected = Counter(_target(rule) for rule in rules)
        found = Counter(
            _target(line) for line in _filter_table(listing) if line.split()[:2] == ["-A", chain]
        )
        ours, other = (found & expected).total(), (found - expected).total()
        if ours != len(rules) or other:
            text = f"{chain} holds {ours} of our {len(rules)} rules"
            problems.append(text + (f" and {other} other" if other else ""))
        return tuple(problems)

    def teardown_text(self, listing: str) -> str:
        """Text that removes every jump to our chain, then the chain; ``""`` if it is absent.

        Every rule that jumps to the chain goes, not only our own ``FORWARD`` jump: the chain
        cannot be deleted while anything refers to it.
        """
        chain = self.chain
        if not _chain_exists(listing, chain):
            return ""
        lines = [f"# coloproxy: remove pair {self.pair}", "*filter"]
        for source, spec, verb in _references(listing, chain):
            lines.append(" ".join(["-D", source, *spec, verb, chain]))
        lines += [f"-F {chain}", f"-X {chain}", "COMMIT"]
        return "\n".join(lines) + "\n"


def _filter_table(listing: str) -> list[str]:
    """The lines of the ``*filter`` section of an ``iptables-save`` listing."""
    section: list[str] = []
    inside = False
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            inside = line == "*filter"
        elif inside and line != "COMMIT" and line and not line.startswith("#"):
            section.append(line)
    return section


def _target(rule: str) -> str:
    """What a rule does: its ``-j`` target and the target's options, spaces normalised."""
    return " ".join(rule.rpartition(" -j ")[2].split())


def _chain_exists(listing: str, chain: str) -> bool:
    return any(line.split()[0] == f":{chain}" for line in _filter_table(listing))


# Our own jump as _references reports it: from FORWARD, no match, a jump (not a goto).
_FORWARD_JUMP = ("FORWARD", (), "-j")


def _references(listing: str, chain: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(source chain, match specification, "-j" or "-g") of every rule that enters ``chain``.

    iptables-save prints the target last, so the specification is everything between the
    source chain and the verb; it is restorable as written, which makes ``-D`` with it exact.
    """
    found: list[tuple[str, tuple[str, ...], str]] = []
    for line in _filter_table(listing):
        tokens = line.split()
        if len(tokens) >= 4 and tokens[0] == "-A" and tokens[-1] == chain:
            if tokens[-2] in ("-j", "-g"):
                found.append((tokens[1], tuple(tokens[2:-2]), tokens[-2]))
    return found


def jump_count(listing: str, chain: str) -> int:
    """How many plain ``-A FORWARD -j <chain>`` jumps the listing holds (for tests and logs)."""
    return sum(1 for ref in _references(listing, chain) if ref == _FORWARD_JUMP)
