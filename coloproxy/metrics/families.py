"""What each source becomes at scrape time: Prometheus metric families built from the
figures the parts count (coloproxy.metrics.figures) (shell).

Each source has one function here, called by the collector (coloproxy.metrics.collector)
in a fixed order; the order of families and of samples within a family is the exposition's.
The shapes repeat (one unlabelled value; labelled counts, sorted; one gauge per choice),
so they are the helpers at the top and the families are tables of them.

Labels stay bounded: protocols outside tcp/udp/icmp/icmpv6/any are folded into ``ip-other``
and ``non-ip``; every other label comes from a closed vocabulary (reasons, sides, queues).
"""

from __future__ import annotations

import platform
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from coloproxy import __version__
from coloproxy.compare import CompareStats
from coloproxy.metrics.figures import (
    ChardevFigures,
    ChardevLink,
    EngineFigures,
    KernelQueueStats,
    PacketCounts,
    RuleFigures,
)

KNOWN_PROTOCOLS: Final = frozenset({"tcp", "udp", "icmp", "icmpv6", "any"})
# Ingress rewrite statuses (coloproxy.rewrite.RewriteStatus values): which changed the
# packet, which could not do what was needed; the rest had nothing to do.
REWRITE_DONE: Final = frozenset({"shifted", "bad-tcp-options"})
REWRITE_FAILED: Final = frozenset({"no-offset", "malformed", "bad-tcp-options", "fragment"})

# EngineFigures.migration keys (query-migrate's "ram"), as metrics: (key, name without
# _total, counter or gauge, help). Cumulative figures are counters: they start again at a
# new migration (a reprotect), which Prometheus takes as a counter reset.
MIGRATION_METRICS: Final = (
    ("ram_transferred", "coloproxy_engine_migration_transferred_bytes", "counter",
     "RAM bytes the migration (then COLO's checkpoints) sent, since migrate"),
    ("ram_total", "coloproxy_engine_migration_ram_bytes", "gauge", "The guest's RAM"),
    ("ram_normal_pages", "coloproxy_engine_migration_normal_pages", "counter",
     "Pages sent whole, since migrate"),
    ("ram_duplicate_pages", "coloproxy_engine_migration_duplicate_pages", "counter",
     "Pages sent as one repeated byte (zero pages), since migrate"),
    ("dirty_pages_rate", "coloproxy_engine_migration_dirty_pages_per_second", "gauge",
     "Pages the guest dirties per second, as QEMU last measured"),
    ("dirty_sync_count", "coloproxy_engine_migration_dirty_syncs", "counter",
     "Dirty bitmap synchronisations, since migrate"),
)  # fmt: skip
LEADER_KEY_PHASES: Final = ("idle", "contending", "holding", "released", "lost", "refused")
COLO_MODES: Final = ("none", "primary", "secondary")

# The chardev sockets' counters, in exposition order: (name, help, the label a socket's
# figure is split by (None: one count per socket), the figure).
LINK_COUNTERS: Final[
    tuple[tuple[str, str, str | None, Callable[[ChardevLink], int | Mapping[str, int]]], ...]
] = (
    ("coloproxy_chardev_connections",
     "Connections made or accepted on the socket (reconnects: this minus one)",
     None, lambda link: link.connections),
    ("coloproxy_chardev_disconnections", "Connections of the socket that ended",
     None, lambda link: link.disconnections),
    ("coloproxy_chardev_frames", "Frames received (in) and written (out) on the socket",
     "direction", lambda link: {"in": link.frames_in, "out": link.frames_out}),
    ("coloproxy_chardev_bytes",
     "Bytes received (in) and written (out) on the socket, framing included",
     "direction", lambda link: {"in": link.bytes_in, "out": link.bytes_out}),
    ("coloproxy_chardev_refused_connections",
     "Connections refused by a listening socket: another peer connected (busy) or the "
     "peer not on the allow list (not-allowed)",
     "reason", lambda link: link.refused),
    ("coloproxy_chardev_frame_problems",
     "A length above 69632 bytes (desync: the connection is dropped), a vnet header "
     "longer than the frame, or a frame cut by a disconnection (truncated)",
     "problem", lambda link: link.problems),
    ("coloproxy_chardev_discarded_bytes",
     "Bytes received after a desync, not decoded (the connection is dropped)",
     None, lambda link: link.discarded_bytes),
)  # fmt: skip

# Label values: one string, or a tuple of them (one per label name).
Key = TypeVar("Key", bound=str | tuple[str, ...])


# -- the shapes ------------------------------------------------------------------------------


def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    """A gauge of one unlabelled value (a bool is 1 or 0)."""
    family = GaugeMetricFamily(name, help_text)
    family.add_metric([], float(value))
    return family


def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    """A counter of one unlabelled value."""
    family = CounterMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def _labels(key: str | tuple[str, ...]) -> list[str]:
    return [str(part) for part in key] if isinstance(key, tuple) else [str(key)]


def counters(
    name: str,
    help_text: str,
    labels: list[str],
    values: Mapping[Key, int] | Iterable[tuple[Key, int]],
) -> CounterMetricFamily:
    """A labelled counter, its samples sorted by label values."""
    items = values.items() if isinstance(values, Mapping) else values
    family = CounterMetricFamily(name, help_text, labels=labels)
    keyed = [((key if isinstance(key, tuple) else (key,)), count) for key, count in items]
    for key, count in sorted(keyed):
        family.add_metric(_labels(key), count)
    return family


def gauges(
    name: str,
    help_text: str,
    labels: list[str],
    values: Iterable[tuple[str | tuple[str, ...], float]],
) -> GaugeMetricFamily:
    """A labelled gauge, its samples in the order given."""
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for key, value in values:
        family.add_metric(_labels(key), float(value))
    return family


def one_of(
    name: str, help_text: str, label: str, choices: Sequence[str], chosen: str
) -> GaugeMetricFamily:
    """A gauge per choice: 1 for the one ``chosen``, 0 for the rest."""
    return gauges(name, help_text, [label], ((choice, choice == chosen) for choice in choices))


def protocol_label(protocol: str) -> str:
    """A bounded label for a protocol name: ``ip-proto-N`` and ``ethertype-0xNNNN`` would
    otherwise allow 65 000 series."""
    if protocol in KNOWN_PROTOCOLS:
        return protocol
    return "non-ip" if protocol.startswith("ethertype-") else "ip-other"


# -- the sources -----------------------------------------------------------------------------


def build_info(pair: str, role: str) -> Metric:
    info = InfoMetricFamily("coloproxy_build", "coloproxy version and what this proxy is")
    info.add_metric(
        [],
        {"version": __version__, "python": platform.python_version(), "pair": pair,
         "role": role},
    )  # fmt: skip
    return info


def packet_families(counts: PacketCounts, now: float) -> Iterator[Metric]:
    """The packet path's counters (``coloproxy.daemon.primary.ProxyCounters``)."""
    packets = CounterMetricFamily(
        "coloproxy_packets",
        "Packets given a verdict, by queue, verdict and the comparator's reason",
        labels=["queue", "verdict", "reason"],
    )
    for (queue, verdict), count in sorted(counts.packets.items()):
        action, _, reason = verdict.partition("-")
        packets.add_metric([queue, action, reason or "none"], count)
    yield packets
    divergences: defaultdict[tuple[str, str], int] = defaultdict(int)
    for (protocol, reason), count in counts.divergences.items():
        divergences[protocol_label(protocol), reason] += count
    yield counters(
        "coloproxy_divergences",
        "Checkpoint needs the comparator found (coalesced ones included)",
        ["protocol", "reason"],
        divergences.items(),
    )
    yield counters(
        "coloproxy_checkpoint_requests",
        "Checkpoint requests sent to the engine, by reason",
        ["reason"],
        counts.requests,
    )
    yield counters(
        "coloproxy_checkpoint_requests_coalesced",
        "Checkpoint needs merged into an outstanding request (invariant I4)",
        ["reason"],
        counts.coalesced,
    )
    yield counters(
        "coloproxy_malformed_packets",
        "Packets that did not parse, by side and reason",
        ["side", "reason"],
        counts.malformed,
    )
    rewrites = counts.rewrites
    yield counter(
        "coloproxy_rewrites",
        "Client packets to the secondary whose ACK was shifted (S-in)",
        sum(count for status, count in rewrites.items() if status in REWRITE_DONE),
    )
    yield counters(
        "coloproxy_rewrite_failures",
        "Client packets to the secondary that could not be rewritten as needed, by reason",
        ["reason"],
        ((status, count) for status, count in rewrites.items() if status in REWRITE_FAILED),
    )
    for name, help_text, value in (
        ("coloproxy_takeover_rewrites",
         "Host S after a takeover: SVM segments moved into the PVM's sequence space",
         counts.egress_rewrites.get("shifted", 0)),
        ("coloproxy_syns_replayed",
         "Host S at a takeover: client SYNs of connections half-open on the SVM handed to it"
         " again, so that it resends its SYN-ACK to the LAN at once",
         counts.syns_replayed),
        ("coloproxy_backoff_reverts",
         "Host S at a takeover: connections whose SVM was sent ICMP unreachable messages"
         " at the client's latest ACK, so that it retransmits at once (RFC 6069)",
         counts.backoff_reverts),
    ):  # fmt: skip
        yield counter(name, help_text, value)
    yield counters(
        "coloproxy_checkpoint_reports_refused",
        "checkpoint-started/-completed reports refused (nothing released), by report and reason",
        ["report", "reason"],
        counts.reports_refused,
    )
    yield counter(
        "coloproxy_checkpoints_completed", "Checkpoints completed", counts.checkpoints_completed
    )
    if counts.last_checkpoint is not None:  # absent until the first checkpoint
        yield gauge(
            "coloproxy_seconds_since_last_checkpoint",
            "Seconds since a checkpoint completed",
            max(0.0, now - counts.last_checkpoint),
        )


def compare_families(stats: CompareStats, now: float) -> Iterator[Metric]:
    """The comparator's gauges (``Comparator.stats()``)."""
    yield counter(
        "coloproxy_compared_bytes",
        "Payload bytes compared between primary and secondary",
        stats.bytes_compared,
    )
    for name, help_text, value in (
        ("coloproxy_held_packets", "Primary packets held", stats.held_packets),
        ("coloproxy_stored_bytes", "Payload bytes kept for comparison", stats.stored_bytes),
        ("coloproxy_flows", "Flows tracked by the comparator", stats.flows),
        ("coloproxy_tcp_connections", "TCP connections tracked", stats.tcp_connections),
        ("coloproxy_fragments_pending", "IP datagrams in reassembly", stats.fragments_pending),
        ("coloproxy_isn_offsets_learned", "TCP connections whose ISN offset is known",
         stats.isn_offsets_learned),
        ("coloproxy_checkpoint_requested", "1 while a checkpoint request is outstanding",
         stats.checkpoint_requested),
        ("coloproxy_checkpointing", "1 between checkpoint started and completed",
         stats.checkpointing),
        ("coloproxy_saturated", "1 while a bound is reached (everything held)", stats.saturated),
    ):  # fmt: skip
        yield gauge(name, help_text, value)
    yield gauges(
        "coloproxy_oldest_held_age_seconds",
        "Age of the oldest held primary packet / unmatched secondary output (0: none)",
        ["side"],
        (
            (side, 0.0 if arrival is None else max(0.0, now - arrival))
            for side, arrival in (
                ("primary", stats.oldest_primary),
                ("secondary", stats.oldest_secondary),
            )
        ),
    )


def compare_bound_families(bounds: tuple[int, int]) -> Iterator[Metric]:
    """The comparator's bounds (max_held_packets, max_held_bytes): what held packets and
    stored bytes are alerted against."""
    packets, stored = bounds
    yield gauge(
        "coloproxy_max_held_packets",
        "compare.max_held_packets: held packets at this bound make an overflow checkpoint",
        packets,
    )
    yield gauge(
        "coloproxy_max_held_bytes",
        "compare.max_held_bytes: stored bytes at this bound make an overflow checkpoint",
        stored,
    )


def queue_families(queues: list[KernelQueueStats], names: Mapping[int, str]) -> Iterator[Metric]:
    """The kernel's NFQUEUE counters, one sample per queue."""
    labels = ["queue", "name"]
    waiting = GaugeMetricFamily(
        "coloproxy_nfqueue_packets",
        "Packets in the kernel queue now (unread or held)",
        labels=labels,
    )
    dropped = CounterMetricFamily(
        "coloproxy_nfqueue_queue_dropped",
        "Packets the kernel dropped: the queue was at its max length",
        labels=labels,
    )
    user = CounterMetricFamily(
        "coloproxy_nfqueue_user_dropped",
        "Packets the kernel dropped: our socket's receive buffer was full",
        labels=labels,
    )
    for queue in sorted(queues, key=lambda q: q.queue_num):
        label = [str(queue.queue_num), names.get(queue.queue_num, "")]
        waiting.add_metric(label, float(queue.queue_total))
        dropped.add_metric(label, queue.queue_dropped)
        user.add_metric(label, queue.user_dropped)
    yield waiting
    yield dropped
    yield user


def control_families(
    clients: Mapping[str, int] | None, refusals: Mapping[tuple[str, str], int] | None
) -> Iterator[Metric]:
    """The control socket: clients connected by role, error replies sent."""
    if clients is not None:
        yield gauges(
            "coloproxy_control_clients",
            "Control socket clients connected",
            ["role"],
            sorted(clients.items()),
        )
    if refusals is not None:
        yield counters(
            "coloproxy_control_refusals",
            "Error replies the control socket sent, by what they answered (a message"
            " kind, connect, hello, idle or line) and code",
            ["kind", "code"],
            refusals,
        )


def rule_families(rules: RuleFigures) -> Iterator[Metric]:
    """The daemon's watch over its iptables rules."""
    yield counters(
        "coloproxy_rules_restored",
        "Times the daemon found its NFQUEUE chain, rules or FORWARD jump removed by"
        " someone else and put them back, by address family",
        ["family"],
        ((family, rules.restores.get(family, 0)) for family in ("ipv4", "ipv6")),
    )
    yield counter(
        "coloproxy_rules_check_failures",
        "Checks of the rules that could not run (iptables-save failed)",
        rules.check_failures,
    )


def chardev_families(chardev: ChardevFigures) -> Iterator[Metric]:
    """The chardev transport: each socket's counts, then the transport's gauges."""
    links = list(chardev.figures())
    yield gauges(
        "coloproxy_chardev_connected",
        "1 while the socket has a connection",
        ["socket"],
        ((link.name, link.connected) for link in links),
    )
    for name, help_text, label, figure in LINK_COUNTERS:
        samples: list[tuple[tuple[str, ...], int]] = []
        for link in links:
            value = figure(link)
            if isinstance(value, int):
                samples.append(((link.name,), value))
            else:
                samples.extend(((link.name, part), count) for part, count in value.items())
        yield counters(name, help_text, ["socket", label] if label else ["socket"], samples)
    yield counters(
        "coloproxy_chardev_notify_messages",
        "Xen notify channel messages, by direction and word",
        ["direction", "message"],
        chardev.notify_counts,
    )
    yield gauge("coloproxy_chardev_held_frames", "Primary frames held", chardev.held_frames)
    yield gauge(
        "coloproxy_chardev_outdev_buffered_bytes",
        "Released frames waiting for outdev (disconnected or slow)",
        chardev.outdev_buffered,
    )
    yield gauge(
        "coloproxy_chardev_primary_in_paused",
        "1 while primary_in is not read because outdev's buffer is full",
        chardev.primary_paused,
    )


def engine_families(figures: EngineFigures, now: float) -> Iterator[Metric]:
    """The checkpoint engine's figures (``coloproxy.engine.runner``)."""
    yield gauges(
        "coloproxy_engine_quorum_info",
        "1 for the service that decides failover: etcd, or two-host (labs only: no quorum)",
        ["service"],
        [(figures.quorum, 1.0)],
    )
    yield one_of(
        "coloproxy_engine_leader_key",
        "1 for the leader key's phase here (idle, contending, holding, released, lost, refused)",
        "phase",
        LEADER_KEY_PHASES,
        figures.key,
    )
    yield gauge(
        "coloproxy_engine_fenced",
        "1 while this host holds the key past its own deadline: nothing is released",
        figures.fenced,
    )
    if figures.key_deadline is not None:
        yield gauge(
            "coloproxy_engine_leader_key_seconds_left",
            "Seconds until this host's leader key deadline (negative: fenced)",
            figures.key_deadline - now,
        )
    yield counters(
        "coloproxy_engine_leader_key_events",
        "Leader key events: won, fenced, unfenced, contest, renew-failed, lost-*, refused-*",
        ["event"],
        figures.key_events,
    )
    yield counters(
        "coloproxy_engine_checkpoints",
        "COLO checkpoints completed, by reason (a request's, periodic, qemu, colo-entry)",
        ["reason"],
        figures.checkpoints,
    )
    for name, help_text, value in (
        ("coloproxy_engine_checkpoints_aborted", "Checkpoints COLO ended under",
         figures.aborted),
        ("coloproxy_engine_checkpoints_stalled",
         "Checkpoints that did not start or end in time", figures.stalled),
        ("coloproxy_engine_split_brain", "Times both hosts were seen serving",
         figures.split_brain),
    ):  # fmt: skip
        yield counter(name, help_text, value)
    yield counters(
        "coloproxy_engine_triggers",
        "x-checkpoint-delay triggers sent (first, retry) or failed (error)",
        ["kind"],
        figures.triggers,
    )
    for name, help_text, histogram in (
        ("coloproxy_engine_checkpoint_pause_seconds", "Primary STOP to RESUME", figures.pause),
        ("coloproxy_engine_request_to_stop_seconds",
         "Checkpoint request arrived to the primary's STOP", figures.request_to_stop),
        ("coloproxy_engine_request_to_command_seconds",
         "Checkpoint request arrived to the trigger's QMP reply", figures.request_to_command),
    ):  # fmt: skip
        family = HistogramMetricFamily(name, help_text)
        family.add_metric([], histogram.cumulative(), histogram.sum)
        yield family
    yield counters(
        "coloproxy_engine_failovers",
        "Failover decisions: primary-lost (took over), secondary-lost (runs alone), stood-down",
        ["kind"],
        figures.failovers,
    )
    yield gauges(
        "coloproxy_engine_last_failover_seconds",
        "Seconds from the last failover decision to each step's end",
        ["step"],
        sorted(figures.last_failover.items()),
    )
    yield one_of(
        "coloproxy_engine_colo_mode",
        "1 for the local QEMU's COLO mode",
        "mode",
        COLO_MODES,
        figures.colo_mode,
    )
    if figures.last_colo_exit_reason is not None:
        yield gauges(
            "coloproxy_engine_last_colo_exit",
            "The reason query-colo-status gives for the last COLO exit",
            ["reason"],
            [(figures.last_colo_exit_reason, 1.0)],
        )
    state = InfoMetricFamily("coloproxy_engine", "The checkpoint engine's states")
    state.add_metric(
        [],
        {"role": figures.role, "qemu": figures.qemu, "phase": figures.phase,
         "watch": figures.watch},
    )  # fmt: skip
    yield state
    yield gauge(
        "coloproxy_engine_period_seconds", "The checkpoint period", figures.period_ms / 1000
    )
    if figures.time_to_colo is not None:
        yield gauge(
            "coloproxy_engine_time_to_colo_seconds",
            "migrate to COLO state, at bring-up",
            figures.time_to_colo,
        )
    if figures.disk_sync_s is not None:
        yield gauge(
            "coloproxy_engine_disk_sync_seconds",
            "the disk's last full copy to the secondary (bring-up, reprotect)",
            figures.disk_sync_s,
        )
    # query-migrate's ram figures, one metric per unit; each absent until QEMU gave it.
    for figure, name, kind, help_text in MIGRATION_METRICS:
        amount = figures.migration.get(figure)
        if amount is not None:
            make = counter if kind == "counter" else gauge
            yield make(name, help_text, float(amount))
    yield counters(
        "coloproxy_engine_heartbeats",
        "Heartbeat datagrams sent, received, bad (by reason) and socket errors",
        ["event"],
        figures.heartbeats,
    )
    if figures.peer_heard is not None:
        yield gauge(
            "coloproxy_engine_peer_heartbeat_age_seconds",
            "Since the peer was last heard",
            max(0.0, now - figures.peer_heard),
        )
