"""Prometheus metrics of one proxy, collected at scrape time (shell).

Theory of operation
-------------------
Nothing on the packet path touches prometheus_client. The packet path bumps plain dict
counters (the daemon's ``ProxyCounters``: ``counts[queue, verdict] += 1``); the comparator
keeps its own gauges (``Comparator.stats()``); the kernel keeps the NFQUEUE counters. A
custom collector, registered in a registry of our own (never the process-global one), reads
all of them when Prometheus scrapes and builds the metric families then
(coloproxy.metrics.families).

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

The HTTP endpoint (coloproxy.metrics.server) is served by asyncio on the event loop, not by
prometheus_client's thread: collecting then runs on the loop thread, the only one allowed to
read the comparator and the counters (no locks, no torn reads).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from coloproxy.compare import CompareStats
from coloproxy.metrics.families import (
    build_info,
    chardev_families,
    compare_bound_families,
    compare_families,
    control_families,
    counters,
    engine_families,
    gauge,
    packet_families,
    queue_families,
    rule_families,
)
from coloproxy.metrics.figures import (
    ChardevFigures,
    EngineFigures,
    KernelQueueStats,
    PacketCounts,
    RuleFigures,
)

log = logging.getLogger("coloproxy.metrics")  # the package's, as log lines have named it


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
        self.queue_stats: Callable[[], Iterable[KernelQueueStats]] | None = None
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
    """Reads every source attached to a :class:`Metrics` at scrape time, in a fixed order;
    a source that raises is left out of this scrape and counted."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # families depend on the sources; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        now = metrics.clock()
        yield build_info(metrics.pair, metrics.role)
        yield gauge(
            "coloproxy_protected",
            "1 while the pair runs protected (output compared and held)",
            metrics.protected,
        )
        if metrics.counts is not None:
            yield from packet_families(metrics.counts, now)
        compare_stats = metrics.compare_stats
        if compare_stats is not None:
            stats = metrics._read("compare", compare_stats)
            if isinstance(stats, CompareStats):
                yield from compare_families(stats, now)
        compare_bounds = metrics.compare_bounds
        if compare_bounds is not None:
            bounds = metrics._read("compare", compare_bounds)
            if isinstance(bounds, tuple):
                yield from compare_bound_families(bounds)
        queue_stats = metrics.queue_stats
        if queue_stats is not None:
            queues = metrics._read("nfqueue", lambda: list(queue_stats()))
            if isinstance(queues, list):
                yield from queue_families(queues, metrics.queue_names)
        control_clients, control_refusals = metrics.control_clients, metrics.control_refusals
        clients = refusals = None
        if control_clients is not None:
            clients = metrics._read("control", lambda: dict(control_clients()))
        if control_refusals is not None:
            refusals = metrics._read("control", lambda: dict(control_refusals()))
        yield from control_families(
            clients if isinstance(clients, dict) else None,
            refusals if isinstance(refusals, dict) else None,
        )
        if metrics.engine is not None:
            yield from engine_families(metrics.engine, now)
        if metrics.rules is not None:
            yield from rule_families(metrics.rules)
        chardev = metrics.chardev
        if chardev is not None:
            built = metrics._read("chardev", lambda: list(chardev_families(chardev)))
            if isinstance(built, list):
                yield from built
        yield counters(
            "coloproxy_scrape_errors",
            "Metric sources that failed at scrape time",
            ["source"],
            metrics.scrape_errors,
        )
