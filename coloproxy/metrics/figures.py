"""What the parts of a proxy count, in the shapes the metrics read at scrape time (shell).

The packet path, the kernel's queues, the chardev transport and the rules' watch are read
through the protocols here (any object of that shape will do); the checkpoint engine fills
in an :class:`EngineFigures` the metrics own. Nothing here imports prometheus_client: the
parts bump plain counters and :class:`Histogram` buckets (coloproxy.metrics.collector says
why), and coloproxy.metrics.families turns them into metric families at scrape time.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol


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


class KernelQueueStats(Protocol):
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
