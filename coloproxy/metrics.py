"""Prometheus metrics of one proxy, collected at scrape time (shell).

Theory of operation
-------------------
Nothing on the packet path touches prometheus_client. The packet path bumps plain dict
counters (the daemon's ``ProxyCounters``: ``counts[queue, verdict] += 1``); the comparator
keeps its own gauges (``Comparator.stats()``); the kernel keeps the NFQUEUE counters. A
custom collector, registered in a registry of our own (never the process-global one), reads
all of them when Prometheus scrapes and builds the metric families then.

Why: measured on this project's 2-core machine (Python 3.11, 1M increments, best of 5):

=========================================  ===============
prometheus_client ``.labels(q, v).inc()``  1350 ns
prometheus_client child ``.inc()``          325 ns (labels looked up once; still a lock)
``collections.Counter[q, v] += 1``          226-259 ns
``defaultdict(int)[q, v] += 1``             158 ns
=========================================  ===============

At the 270k packets/s one NFQUEUE carried here at best (3.2 Gbit/s of full-size packets,
docs/invariants.md), with two counts per packet, ``.labels().inc()`` would take about 70 %
of a core; dict counters take 9-14 %. The scrape does the label work once per scrape instead
of once per packet.

The HTTP endpoint (:class:`MetricsServer`) is served by asyncio on the event loop, not by
prometheus_client's thread: collecting then runs on the loop thread, the only one allowed to
read the comparator and the counters (no locks, no torn reads).

Labels stay bounded: protocols outside tcp/udp/icmp/icmpv6/any are folded into ``ip-other``
and ``non-ip``; every other label comes from a closed vocabulary (reasons, sides, queues).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import platform
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from coloproxy import __version__
from coloproxy.compare import CompareStats
from coloproxy.errors import ColoproxyError, UsageError

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9477
LINGER_TIMEOUT: Final = 1.0  # a closing connection waits this long for the client's end
READ_CHUNK: Final = 64 * 1024
KNOWN_PROTOCOLS: Final = frozenset({"tcp", "udp", "icmp", "icmpv6", "any"})
# Ingress rewrite statuses (coloproxy.rewrite.RewriteStatus values): which changed the
# packet, which could not do what was needed; the rest had nothing to do.
REWRITE_DONE: Final = frozenset({"shifted", "bad-tcp-options"})
REWRITE_FAILED: Final = frozenset({"no-offset", "malformed", "bad-tcp-options", "fragment"})


class PacketCounts(Protocol):
    """What the packet path counts, read at scrape time. ``coloproxy.daemon.primary.
    ProxyCounters`` has this shape; any object with these attributes will do."""

    @property
    def packets(self) -> Mapping[tuple[str, str], int]: ...  # (queue, verdict[-reason])

    @property
    def divergences(self) -> Mapping[tuple[str, str], int]: ...  # (protocol, reason)

    @property
    def requests(self) -> Mapping[str, int]: ...  # checkpoint requests sent, by reason

    @property
    def coalesced(self) -> Mapping[str, int]: ...  # needs merged into an outstanding one

    @property
    def malformed(self) -> Mapping[tuple[str, str], int]: ...  # (side, reason)

    @property
    def rewrites(self) -> Mapping[str, int]: ...  # S-in packets by rewrite status

    @property
    def egress_rewrites(self) -> Mapping[str, int]: ...  # host S: SVM output by rewrite status

    @property
    def syns_replayed(self) -> int: ...  # host S: client SYNs handed to the SVM at a takeover

    @property
    def backoff_reverts(self) -> int: ...  # host S: connections told to retransmit at a takeover

    @property
    def checkpoints_completed(self) -> int: ...

    @property
    def reports_refused(self) -> Mapping[tuple[str, str], int]: ...  # (report, reason)

    @property
    def last_checkpoint(self) -> float | None: ...  # on the metrics clock


class QueueCounters(Protocol):
    """One NFQUEUE as the kernel counts it (``coloproxy.capture.stats.QueueStats``)."""

    @property
    def queue_num(self) -> int: ...

    @property
    def queue_total(self) -> int: ...

    @property
    def queue_dropped(self) -> int: ...

    @property
    def user_dropped(self) -> int: ...


class ChardevLink(Protocol):
    """One socket of the chardev transport (``coloproxy.capture.chardev_link.LinkFigures``)."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def connections(self) -> int: ...

    @property
    def disconnections(self) -> int: ...

    @property
    def frames_in(self) -> int: ...

    @property
    def bytes_in(self) -> int: ...

    @property
    def frames_out(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...

    @property
    def problems(self) -> Mapping[str, int]: ...

    @property
    def discarded_bytes(self) -> int: ...

    @property
    def refused(self) -> Mapping[str, int]: ...


class ChardevFigures(Protocol):
    """The chardev transport as a whole (``coloproxy.capture.chardev.ChardevTransport``)."""

    def figures(self) -> Sequence[ChardevLink]: ...

    @property
    def held_frames(self) -> int: ...

    @property
    def outdev_buffered(self) -> int: ...

    @property
    def primary_paused(self) -> bool: ...

    @property
    def notify_counts(self) -> Mapping[tuple[str, str], int]: ...


class RuleFigures(Protocol):
    """The daemon's watch over its iptables rules (``coloproxy.daemon.rulewatch.RuleWatch``)."""

    @property
    def restores(self) -> Mapping[str, int]: ...  # by family: ipv4, ipv6

    @property
    def check_failures(self) -> int: ...


# Checkpoint pauses are 2-30 ms, request latencies below 10 ms, failovers tens of ms
# (docs/invariants.md): buckets from 0.5 ms to 10 s.
ENGINE_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
RECENT: Final = 1024  # raw values kept for percentiles in logs and tests


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


class Histogram:
    """Bucket counts bumped on the engine's path (a bisect and three additions), turned
    into a Prometheus histogram at scrape time; the last ``RECENT`` values are kept too."""

    def __init__(self, buckets: Sequence[float] = ENGINE_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self.recent: deque[float] = deque(maxlen=RECENT)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1
        self.recent.append(value)

    def cumulative(self) -> list[tuple[str, float]]:
        """(upper bound, observations at or below it), ending with +Inf."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            total += count
            out.append((repr(bound), float(total)))
        out.append(("+Inf", float(self.count)))
        return out


@dataclass
class EngineFigures:
    """What the checkpoint engine (``coloproxy.engine.runner``) counts, read at scrape time.

    Times are seconds; ``peer_heard`` is on the metrics clock.
    """

    role: str = ""
    qemu: str = "unknown"  # unknown, running, shutdown, exited
    colo_mode: str = "none"  # query-colo-status mode
    last_colo_exit_reason: str | None = None  # query-colo-status reason (trusted over COLO_EXIT)
    phase: str = "off"  # the scheduler's phase
    watch: str = "standby"  # the failover decider's state
    period_ms: int = 0
    checkpoints: Counter[str] = field(default_factory=Counter)  # completed, by reason
    aborted: int = 0
    stalled: int = 0
    triggers: Counter[str] = field(default_factory=Counter)  # first, retry, error
    # Primary STOP -> RESUME by QEMU's stamps; not the COLO entry (the migration's downtime).
    pause: Histogram = field(default_factory=Histogram)
    request_to_stop: Histogram = field(default_factory=Histogram)  # request arrived -> STOP seen
    request_to_command: Histogram = field(default_factory=Histogram)  # -> trigger answered
    failovers: Counter[str] = field(default_factory=Counter)  # primary-lost, secondary-lost, ...
    last_failover: dict[str, float] = field(default_factory=dict)  # step -> s after decision
    split_brain: int = 0
    time_to_colo: float | None = None  # migrate -> COLO, at bring-up
    disk_sync_s: float | None = None  # the disk's full copy to the secondary (engine/disk.py)
    migration: Mapping[str, int] = field(default_factory=dict)  # query-migrate ram figures
    heartbeats: Mapping[str, int] = field(default_factory=dict)  # sent, received, bad-*, error-*
    peer_heard: float | None = None
    quorum: str = "two-host"  # etcd, two-host (labs only)
    key: str = "idle"  # the leader key's phase (leader.KeyPhase)
    key_deadline: float | None = None  # holding: the release deadline, on the metrics clock
    fenced: bool = False  # holding, past the deadline: nothing is released
    # won, fenced, unfenced, contest, renew-failed, lost-<reason>, refused-<reason>
    key_events: Counter[str] = field(default_factory=Counter)


def protocol_label(protocol: str) -> str:
    """A bounded label for a protocol name: ``ip-proto-N`` and ``ethertype-0xNNNN`` would
    otherwise allow 65 000 series."""
    if protocol in KNOWN_PROTOCOLS:
        return protocol
    return "non-ip" if protocol.startswith("ethertype-") else "ip-other"


class Metrics:
    """The proxy's metrics: its own registry and the sources read at scrape time.

    The sources are attributes so the daemon can attach them as it builds its parts:
    ``counts`` (the packet path's counters), ``compare_stats`` (``Comparator.stats``),
    ``queue_stats`` (the kernel's NFQUEUE counters, e.g. ``lambda:
    read_queue_stats().values()``), ``control_clients`` (clients connected by role). A
    source that raises is logged and counted in ``coloproxy_scrape_errors_total``; the rest
    of the scrape goes on. ``clock`` must be the clock of the comparator's ``now`` and of
    ``counts.last_checkpoint`` (the daemon passes ``loop.time``).
    """

    def __init__(
        self,
        *,
        pair: str = "",
        role: str = "",
        clock: Callable[[], float] = time.monotonic,
        queue_names: Mapping[int, str] | None = None,
        process: bool = True,
    ) -> None:
        self.pair = pair
        self.role = role
        self.clock = clock
        self.queue_names = dict(queue_names or {})
        self.protected = False
        self.counts: PacketCounts | None = None
        self.compare_stats: Callable[[], CompareStats | None] | None = None
        # The comparator's bounds (max_held_packets, max_held_bytes): what held packets and
        # stored bytes are alerted against.
        self.compare_bounds: Callable[[], tuple[int, int]] | None = None
        self.queue_stats: Callable[[], Iterable[QueueCounters]] | None = None
        self.control_clients: Callable[[], Mapping[str, int]] | None = None
        # Error replies the control socket sent, by (what they answered, code).
        self.control_refusals: Callable[[], Mapping[tuple[str, str], int]] | None = None
        self.engine: EngineFigures | None = None  # the checkpoint engine's, when it runs
        self.chardev: ChardevFigures | None = None  # the chardev transport, when it runs
        self.rules: RuleFigures | None = None  # the watch over this host's rules, when it runs
        self.scrape_errors: defaultdict[str, int] = defaultdict(int)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if process:
            # CPU, memory, open files of this process: cheap, read from /proc at scrape.
            ProcessCollector(namespace="coloproxy", registry=self.registry)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape's body and content type (OpenMetrics if ``accept`` asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def _read(self, source: str, read: Callable[[], object]) -> object:
        try:
            return read()
        except Exception:
            # The first failure of a source in full, later ones only counted: a source that
            # cannot be read (a permission) would otherwise log a traceback every scrape.
            if source in self.scrape_errors:
                log.debug("metrics source %s failed again", source, exc_info=True)
            else:
                log.exception(
                    "metrics source %s failed (counted in"
                    " coloproxy_scrape_errors_total from now on)",
                    source,
                )
            self.scrape_errors[source] += 1
            return None


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # families depend on the sources; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        now = metrics.clock()
        yield from self._build_info()
        gauge = GaugeMetricFamily(
            "coloproxy_protected", "1 while the pair runs protected (output compared and held)"
        )
        gauge.add_metric([], 1.0 if metrics.protected else 0.0)
        yield gauge
        counts = metrics.counts
        if counts is not None:
            yield from self._counts(counts, now)
        if metrics.compare_stats is not None:
            stats = metrics._read("compare", metrics.compare_stats)
            if isinstance(stats, CompareStats):
                yield from self._compare(stats, now)
        compare_bounds = metrics.compare_bounds
        if compare_bounds is not None:
            bounds = metrics._read("compare", compare_bounds)
            if isinstance(bounds, tuple):
                for name, help_text, bound in zip(
                    ("coloproxy_max_held_packets", "coloproxy_max_held_bytes"),
                    (
                        "compare.max_held_packets: held packets at this bound make an overflow"
                        " checkpoint",
                        "compare.max_held_bytes: stored bytes at this bound make an overflow"
                        " checkpoint",
                    ),
                    bounds,
                    strict=True,
                ):
                    family = GaugeMetricFamily(name, help_text)
                    family.add_metric([], float(bound))
                    yield family
        queue_stats = metrics.queue_stats
        if queue_stats is not None:
            queues = metrics._read("nfqueue", lambda: list(queue_stats()))
            if isinstance(queues, list):
                yield from self._queues(queues)
        control_clients = metrics.control_clients
        if control_clients is not None:
            clients = metrics._read("control", lambda: dict(control_clients()))
            if isinstance(clients, dict):
                family = GaugeMetricFamily(
                    "coloproxy_control_clients", "Control socket clients connected", labels=["role"]
                )
                for role, count in sorted(clients.items()):
                    family.add_metric([str(role)], float(count))
                yield family
        control_refusals = metrics.control_refusals
        if control_refusals is not None:
            refusals = metrics._read("control", lambda: dict(control_refusals()))
            if isinstance(refusals, dict):
                yield _counter(
                    "coloproxy_control_refusals",
                    "Error replies the control socket sent, by what they answered (a message"
                    " kind, connect, hello, idle or line) and code",
                    ["kind", "code"],
                    refusals.items(),
                )
        if metrics.engine is not None:
            yield from self._engine(metrics.engine, now)
        rules = metrics.rules
        if rules is not None:
            yield _counter(
                "coloproxy_rules_restored",
                "Times the daemon found its NFQUEUE chain, rules or FORWARD jump removed by"
                " someone else and put them back, by address family",
                ["family"],
                (((family,), rules.restores.get(family, 0)) for family in ("ipv4", "ipv6")),
            )
            failures = CounterMetricFamily(
                "coloproxy_rules_check_failures",
                "Checks of the rules that could not run (iptables-save failed)",
            )
            failures.add_metric([], rules.check_failures)
            yield failures
        chardev = metrics.chardev
        if chardev is not None:
            families = metrics._read("chardev", lambda: list(self._chardev(chardev)))
            if isinstance(families, list):
                yield from families
        errors = CounterMetricFamily(
            "coloproxy_scrape_errors",
            "Metric sources that failed at scrape time",
            labels=["source"],
        )
        for source, count in sorted(metrics.scrape_errors.items()):
            errors.add_metric([source], count)
        yield errors

    def _build_info(self) -> Iterator[Metric]:
        info = InfoMetricFamily("coloproxy_build", "coloproxy version and what this proxy is")
        info.add_metric(
            [],
            {
                "version": __version__,
                "python": platform.python_version(),
                "pair": self.metrics.pair,
                "role": self.metrics.role,
            },
        )
        yield info

    def _counts(self, counts: PacketCounts, now: float) -> Iterator[Metric]:
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
        yield _counter(
            "coloproxy_divergences",
            "Checkpoint needs the comparator found (coalesced ones included)",
            ["protocol", "reason"],
            divergences.items(),
        )
        yield _counter(
            "coloproxy_checkpoint_requests",
            "Checkpoint requests sent to the engine, by reason",
            ["reason"],
            (((reason,), count) for reason, count in counts.requests.items()),
        )
        yield _counter(
            "coloproxy_checkpoint_requests_coalesced",
            "Checkpoint needs merged into an outstanding request (invariant I4)",
            ["reason"],
            (((reason,), count) for reason, count in counts.coalesced.items()),
        )
        yield _counter(
            "coloproxy_malformed_packets",
            "Packets that did not parse, by side and reason",
            ["side", "reason"],
            counts.malformed.items(),
        )
        done = sum(count for status, count in counts.rewrites.items() if status in REWRITE_DONE)
        rewrites = CounterMetricFamily(
            "coloproxy_rewrites", "Client packets to the secondary whose ACK was shifted (S-in)"
        )
        rewrites.add_metric([], done)
        yield rewrites
        yield _counter(
            "coloproxy_rewrite_failures",
            "Client packets to the secondary that could not be rewritten as needed, by reason",
            ["reason"],
            (((s,), count) for s, count in counts.rewrites.items() if s in REWRITE_FAILED),
        )
        egress = CounterMetricFamily(
            "coloproxy_takeover_rewrites",
            "Host S after a takeover: SVM segments moved into the PVM's sequence space",
        )
        egress.add_metric([], counts.egress_rewrites.get("shifted", 0))
        yield egress
        replayed = CounterMetricFamily(
            "coloproxy_syns_replayed",
            "Host S at a takeover: client SYNs of connections half-open on the SVM handed to it"
            " again, so that it resends its SYN-ACK to the LAN at once",
        )
        replayed.add_metric([], counts.syns_replayed)
        yield replayed
        reverted = CounterMetricFamily(
            "coloproxy_backoff_reverts",
            "Host S at a takeover: connections whose SVM was sent ICMP unreachable messages"
            " at the client's latest ACK, so that it retransmits at once (RFC 6069)",
        )
        reverted.add_metric([], counts.backoff_reverts)
        yield reverted
        yield _counter(
            "coloproxy_checkpoint_reports_refused",
            "checkpoint-started/-completed reports refused (nothing released), by report and"
            " reason",
            ["report", "reason"],
            counts.reports_refused.items(),
        )
        completed = CounterMetricFamily("coloproxy_checkpoints_completed", "Checkpoints completed")
        completed.add_metric([], counts.checkpoints_completed)
        yield completed
        if counts.last_checkpoint is not None:  # absent until the first checkpoint
            since = GaugeMetricFamily(
                "coloproxy_seconds_since_last_checkpoint", "Seconds since a checkpoint completed"
            )
            since.add_metric([], max(0.0, now - counts.last_checkpoint))
            yield since

    def _compare(self, stats: CompareStats, now: float) -> Iterator[Metric]:
        compared = CounterMetricFamily(
            "coloproxy_compared_bytes", "Payload bytes compared between primary and secondary"
        )
        compared.add_metric([], stats.bytes_compared)
        yield compared
        for name, help_text, value in (
            ("coloproxy_held_packets", "Primary packets held", stats.held_packets),
            ("coloproxy_stored_bytes", "Payload bytes kept for comparison", stats.stored_bytes),
            ("coloproxy_flows", "Flows tracked by the comparator", stats.flows),
            ("coloproxy_tcp_connections", "TCP connections tracked", stats.tcp_connections),
            ("coloproxy_fragments_pending", "IP datagrams in reassembly", stats.fragments_pending),
            (
                "coloproxy_isn_offsets_learned",
                "TCP connections whose ISN offset is known",
                stats.isn_offsets_learned,
            ),
            (
                "coloproxy_checkpoint_requested",
                "1 while a checkpoint request is outstanding",
                stats.checkpoint_requested,
            ),
            (
                "coloproxy_checkpointing",
                "1 between checkpoint started and completed",
                stats.checkpointing,
            ),
            (
                "coloproxy_saturated",
                "1 while a bound is reached (everything held)",
                stats.saturated,
            ),
        ):
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], float(value))
            yield family
        age = GaugeMetricFamily(
            "coloproxy_oldest_held_age_seconds",
            "Age of the oldest held primary packet / unmatched secondary output (0: none)",
            labels=["side"],
        )
        for side, arrival in (
            ("primary", stats.oldest_primary),
            ("secondary", stats.oldest_secondary),
        ):
            age.add_metric([side], 0.0 if arrival is None else max(0.0, now - arrival))
        yield age

    def _queues(self, queues: list[QueueCounters]) -> Iterator[Metric]:
        names = self.metrics.queue_names
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

    def _chardev(self, chardev: ChardevFigures) -> Iterator[Metric]:
        links = list(chardev.figures())
        connected = GaugeMetricFamily(
            "coloproxy_chardev_connected", "1 while the socket has a connection", labels=["socket"]
        )
        for link in links:
            connected.add_metric([link.name], 1.0 if link.connected else 0.0)
        yield connected
        yield _counter(
            "coloproxy_chardev_connections",
            "Connections made or accepted on the socket (reconnects: this minus one)",
            ["socket"],
            (((link.name,), link.connections) for link in links),
        )
        yield _counter(
            "coloproxy_chardev_disconnections",
            "Connections of the socket that ended",
            ["socket"],
            (((link.name,), link.disconnections) for link in links),
        )
        yield _counter(
            "coloproxy_chardev_frames",
            "Frames received (in) and written (out) on the socket",
            ["socket", "direction"],
            [((link.name, "in"), link.frames_in) for link in links]
            + [((link.name, "out"), link.frames_out) for link in links],
        )
        yield _counter(
            "coloproxy_chardev_bytes",
            "Bytes received (in) and written (out) on the socket, framing included",
            ["socket", "direction"],
            [((link.name, "in"), link.bytes_in) for link in links]
            + [((link.name, "out"), link.bytes_out) for link in links],
        )
        yield _counter(
            "coloproxy_chardev_refused_connections",
            "Connections refused by a listening socket: another peer connected (busy) or the "
            "peer not on the allow list (not-allowed)",
            ["socket", "reason"],
            (
                ((link.name, reason), count)
                for link in links
                for reason, count in link.refused.items()
            ),
        )
        yield _counter(
            "coloproxy_chardev_frame_problems",
            "A length above 69632 bytes (desync: the connection is dropped), a vnet header "
            "longer than the frame, or a frame cut by a disconnection (truncated)",
            ["socket", "problem"],
            (
                ((link.name, problem), count)
                for link in links
                for problem, count in link.problems.items()
            ),
        )
        yield _counter(
            "coloproxy_chardev_discarded_bytes",
            "Bytes received after a desync, not decoded (the connection is dropped)",
            ["socket"],
            (((link.name,), link.discarded_bytes) for link in links),
        )
        yield _counter(
            "coloproxy_chardev_notify_messages",
            "Xen notify channel messages, by direction and word",
            ["direction", "message"],
            chardev.notify_counts.items(),
        )
        for name, text, value in (
            ("coloproxy_chardev_held_frames", "Primary frames held", chardev.held_frames),
            (
                "coloproxy_chardev_outdev_buffered_bytes",
                "Released frames waiting for outdev (disconnected or slow)",
                chardev.outdev_buffered,
            ),
            (
                "coloproxy_chardev_primary_in_paused",
                "1 while primary_in is not read because outdev's buffer is full",
                int(chardev.primary_paused),
            ),
        ):
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], float(value))
            yield gauge

    def _engine(self, figures: EngineFigures, now: float) -> Iterator[Metric]:
        quorum = GaugeMetricFamily(
            "coloproxy_engine_quorum_info",
            "1 for the service that decides failover: etcd, or two-host (labs only: no quorum)",
            labels=["service"],
        )
        quorum.add_metric([figures.quorum], 1.0)
        yield quorum
        key = GaugeMetricFamily(
            "coloproxy_engine_leader_key",
            "1 for the leader key's phase here (idle, contending, holding, released, lost,"
            " refused)",
            labels=["phase"],
        )
        for phase in ("idle", "contending", "holding", "released", "lost", "refused"):
            key.add_metric([phase], 1.0 if figures.key == phase else 0.0)
        yield key
        fenced = GaugeMetricFamily(
            "coloproxy_engine_fenced",
            "1 while this host holds the key past its own deadline: nothing is released",
        )
        fenced.add_metric([], 1.0 if figures.fenced else 0.0)
        yield fenced
        if figures.key_deadline is not None:
            left = GaugeMetricFamily(
                "coloproxy_engine_leader_key_seconds_left",
                "Seconds until this host's leader key deadline (negative: fenced)",
            )
            left.add_metric([], figures.key_deadline - now)
            yield left
        yield _counter(
            "coloproxy_engine_leader_key_events",
            "Leader key events: won, fenced, unfenced, contest, renew-failed, lost-*, refused-*",
            ["event"],
            (((event,), count) for event, count in figures.key_events.items()),
        )
        yield _counter(
            "coloproxy_engine_checkpoints",
            "COLO checkpoints completed, by reason (a request's, periodic, qemu, colo-entry)",
            ["reason"],
            (((reason,), count) for reason, count in figures.checkpoints.items()),
        )
        for name, help_text, value in (
            ("coloproxy_engine_checkpoints_aborted", "Checkpoints COLO ended under",
             figures.aborted),
            ("coloproxy_engine_checkpoints_stalled",
             "Checkpoints that did not start or end in time", figures.stalled),
            ("coloproxy_engine_split_brain", "Times both hosts were seen serving",
             figures.split_brain),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], value)
            yield counter
        yield _counter(
            "coloproxy_engine_triggers",
            "x-checkpoint-delay triggers sent (first, retry) or failed (error)",
            ["kind"],
            (((kind,), count) for kind, count in figures.triggers.items()),
        )
        for name, help_text, histogram in (
            ("coloproxy_engine_checkpoint_pause_seconds", "Primary STOP to RESUME",
             figures.pause),
            ("coloproxy_engine_request_to_stop_seconds",
             "Checkpoint request arrived to the primary's STOP", figures.request_to_stop),
            ("coloproxy_engine_request_to_command_seconds",
             "Checkpoint request arrived to the trigger's QMP reply", figures.request_to_command),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, help_text)
            family.add_metric([], histogram.cumulative(), histogram.sum)
            yield family
        yield _counter(
            "coloproxy_engine_failovers",
            "Failover decisions: primary-lost (took over), secondary-lost (runs alone), stood-down",
            ["kind"],
            (((kind,), count) for kind, count in figures.failovers.items()),
        )
        last = GaugeMetricFamily(
            "coloproxy_engine_last_failover_seconds",
            "Seconds from the last failover decision to each step's end",
            labels=["step"],
        )
        for step, seconds in sorted(figures.last_failover.items()):
            last.add_metric([step], seconds)
        yield last
        mode = GaugeMetricFamily(
            "coloproxy_engine_colo_mode", "1 for the local QEMU's COLO mode", labels=["mode"]
        )
        for name in ("none", "primary", "secondary"):
            mode.add_metric([name], 1.0 if figures.colo_mode == name else 0.0)
        yield mode
        if figures.last_colo_exit_reason is not None:
            exit_reason = GaugeMetricFamily(
                "coloproxy_engine_last_colo_exit",
                "The reason query-colo-status gives for the last COLO exit",
                labels=["reason"],
            )
            exit_reason.add_metric([figures.last_colo_exit_reason], 1.0)
            yield exit_reason
        state = InfoMetricFamily("coloproxy_engine", "The checkpoint engine's states")
        state.add_metric(
            [],
            {"role": figures.role, "qemu": figures.qemu, "phase": figures.phase,
             "watch": figures.watch},
        )  # fmt: skip
        yield state
        period = GaugeMetricFamily("coloproxy_engine_period_seconds", "The checkpoint period")
        period.add_metric([], figures.period_ms / 1000)
        yield period
        if figures.time_to_colo is not None:
            colo = GaugeMetricFamily(
                "coloproxy_engine_time_to_colo_seconds", "migrate to COLO state, at bring-up"
            )
            colo.add_metric([], figures.time_to_colo)
            yield colo
        if figures.disk_sync_s is not None:
            sync = GaugeMetricFamily(
                "coloproxy_engine_disk_sync_seconds",
                "the disk's last full copy to the secondary (bring-up, reprotect)",
            )
            sync.add_metric([], figures.disk_sync_s)
            yield sync
        # query-migrate's ram figures, one metric per unit; each absent until QEMU gave it.
        for figure, name, kind, help_text in MIGRATION_METRICS:
            amount = figures.migration.get(figure)
            if amount is None:
                continue
            if kind == "counter":
                counter = CounterMetricFamily(name, help_text)
                counter.add_metric([], float(amount))
                yield counter
            else:
                gauge = GaugeMetricFamily(name, help_text)
                gauge.add_metric([], float(amount))
                yield gauge
        yield _counter(
            "coloproxy_engine_heartbeats",
            "Heartbeat datagrams sent, received, bad (by reason) and socket errors",
            ["event"],
            (((event,), count) for event, count in figures.heartbeats.items()),
        )
        if figures.peer_heard is not None:
            age = GaugeMetricFamily(
                "coloproxy_engine_peer_heartbeat_age_seconds", "Since the peer was last heard"
            )
            age.add_metric([], max(0.0, now - figures.peer_heard))
            yield age


def _counter(
    name: str, help_text: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for key, count in sorted(values):
        family.add_metric([str(part) for part in key], count)
    return family


# -- the HTTP endpoint -----------------------------------------------------------------------


class MetricsError(ColoproxyError):
    """The metrics endpoint cannot be served (address in use, bad address)."""


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on asyncio, one request per connection.

    Bounded: ``max_connections`` at once (more get 503), a request head of at most
    ``MAX_HEAD`` bytes (431), ``request_timeout`` seconds per connection. Scrapes run on the
    event loop (see the module docstring).
    """

    MAX_HEAD: Final = 8192

    def __init__(
        self,
        metrics: Metrics,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        max_connections: int = 8,
        request_timeout: float = 5.0,
    ) -> None:
        if max_connections < 1 or request_timeout <= 0:
            raise UsageError("metrics server bounds must be positive")
        self.metrics = metrics
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when ``port`` was 0)."""
        if self._server is None or not self._server.sockets:
            raise UsageError("the metrics server is not running")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        if self._server is not None:
            raise UsageError("the metrics server runs already")
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=self.MAX_HEAD, reuse_address=True
            )
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        log.info("metrics at http://%s:%d/metrics", *self.address)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._active += 1
        try:
            try:
                async with asyncio.timeout(self.request_timeout):
                    if self._active > self.max_connections:
                        await self._respond(writer, 503, b"too many scrapes at once\n")
                    else:
                        await self._handle(reader, writer)
            except TimeoutError:
                log.info("metrics request timed out")
                with contextlib.suppress(ConnectionError):
                    await self._respond(writer, 408, b"request timed out\n")
            except ConnectionError as exc:
                log.debug("metrics connection ended: %s", exc)
            await self._linger(reader, writer)
        except asyncio.CancelledError:
            log.debug("metrics connection cancelled")
            raise
        finally:
            self._active -= 1
            writer.transport.abort()
            if task is not None:
                self._tasks.discard(task)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close politely: end our side, then read (and drop) what the client still sends
        until it closes, briefly. Closing a TCP socket with unread input sends a reset, which
        can destroy the response before the client has read it."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                while await reader.read(READ_CHUNK):
                    pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._respond(writer, 431, b"request head too large\n")
            return
        except asyncio.IncompleteReadError:
            return  # the client went away before finishing its request
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, 400, b"not an HTTP/1.x request line\n")
            return
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if target.split("?", 1)[0] != "/metrics":
            await self._respond(writer, 404, b"try /metrics\n")
            return
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"GET or HEAD only\n", extra={"Allow": "GET, HEAD"})
            return
        try:
            body, content_type = self.metrics.exposition(headers.get("accept"))
        except Exception:
            log.exception("collecting metrics failed")
            await self._respond(writer, 500, b"collecting metrics failed; see the log\n")
            return
        await self._respond(writer, 200, body, content_type, head_only=method == "HEAD")

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        head_only: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        fields = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(extra or {}),
        }
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in fields.items()
        )
        writer.write(head.encode("latin-1") + b"\r\n" + (b"" if head_only else body))
        await writer.drain()
