"""Every metric name the daemon's exposition can hold, and the names documents use.

``exportable()`` attaches every source ``coloproxy.metrics.Metrics`` reads (the packet
path's counters with a value under every label, the comparator, the kernel's queues, the
control socket, the engine, the chardev transport, the rules' watch) and reads the names off
one scrape: what any daemon, in any role, can show Prometheus. ``mentioned()`` finds the
``coloproxy_...`` names in a text. Used by tests/test_deploy_prometheus.py and
tests/test_monitoring.py.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from coloproxy.capture.stats import QueueStats
from coloproxy.compare import CompareStats
from coloproxy.daemon.primary import ProxyCounters
from coloproxy.metrics import EngineFigures, Metrics

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bcoloproxy_[a-z0-9_]*[a-z0-9_*]")


@dataclass
class _Link:
    name: str = "primary_in"
    connected: bool = True
    connections: int = 1
    disconnections: int = 1
    frames_in: int = 1
    bytes_in: int = 1
    frames_out: int = 1
    bytes_out: int = 1
    problems: dict[str, int] = field(default_factory=lambda: {"desync": 1})
    discarded_bytes: int = 1
    refused: dict[str, int] = field(default_factory=lambda: {"busy": 1})


@dataclass
class _Chardev:
    held_frames: int = 1
    outdev_buffered: int = 1
    primary_paused: bool = False
    notify_counts: dict[tuple[str, str], int] = field(
        default_factory=lambda: {("in", "checkpoint"): 1}
    )

    def figures(self) -> list[_Link]:
        return [_Link()]


@dataclass
class _Rules:
    restores: Counter[str] = field(default_factory=lambda: Counter({"ipv4": 1}))
    check_failures: int = 0


def full_metrics() -> Metrics:
    """A Metrics with every source attached and something under every label."""
    metrics = Metrics(pair="web1", role="primary", clock=lambda: 100.0, queue_names={10: "p"})
    counts = ProxyCounters()
    counts.packets["primary-out", "accept-matched"] += 1
    counts.divergences["tcp", "payload"] += 1
    counts.requests["payload"] += 1
    counts.coalesced["payload"] += 1
    counts.malformed["primary", "truncated"] += 1
    counts.rewrites["shifted"] += 1
    counts.rewrites["no-offset"] += 1
    counts.egress_rewrites["shifted"] += 1
    counts.reports_refused["checkpoint-completed", "not-started"] += 1
    counts.checkpoints_completed = 1
    counts.last_checkpoint = 99.0
    metrics.counts = counts
    metrics.compare_stats = lambda: CompareStats(
        flows=1, tcp_connections=1, held_packets=1, stored_bytes=1, bytes_compared=1,
        fragments_pending=0, oldest_primary=99.0, oldest_secondary=None,
        checkpoint_requested=False, checkpointing=False, saturated=False, isn_offsets_learned=1,
    )  # fmt: skip
    metrics.compare_bounds = lambda: (4096, 64 << 20)
    metrics.queue_stats = lambda: [QueueStats(10, 1, 0, 2, 65535, 0, 0, 0)]
    metrics.control_clients = lambda: {"engine": 1}
    metrics.control_refusals = lambda: {("hello", "forbidden"): 1}
    engine = EngineFigures(role="primary", qemu="running", colo_mode="primary")
    engine.checkpoints["payload"] += 1
    engine.triggers["first"] += 1
    engine.pause.observe(0.003)
    engine.failovers["primary-lost"] += 1
    engine.last_failover["done"] = 0.05
    engine.last_colo_exit_reason = "request"
    engine.time_to_colo = 0.8
    engine.disk_sync_s = 1.5
    engine.migration = {
        "ram_transferred": 1, "ram_total": 1, "ram_normal_pages": 1,
        "ram_duplicate_pages": 1, "dirty_pages_rate": 1, "dirty_sync_count": 1,
    }  # fmt: skip
    engine.heartbeats = {"sent": 1}
    engine.peer_heard = 99.9
    metrics.engine = engine
    metrics.chardev = _Chardev()
    metrics.rules = _Rules()
    return metrics


def exportable() -> tuple[set[str], set[str]]:
    """(sample names, histogram base names) of everything the daemon can export."""
    body, _ = full_metrics().exposition()
    samples: set[str] = set()
    histograms: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        if family.type == "histogram":
            histograms.add(family.name)
        samples.update(sample.name for sample in family.samples)
    return samples, histograms


def unknown(names: set[str]) -> set[str]:
    """The names that no exposition holds. A name ending in ``_`` or ``*`` is a prefix
    (``coloproxy_chardev_*``) and must start at least one name; a histogram may be named by
    its base name, a counter only with ``_total``."""
    samples, histograms = exportable()
    known = samples | histograms
    missing = set()
    for name in names:
        if name.endswith(("_", "*")):
            if not any(k.startswith(name.rstrip("*")) for k in known):
                missing.add(name)
        elif name not in known:
            missing.add(name)
    return missing


def mentioned(text: str) -> set[str]:
    return set(NAME.findall(text))


def labels() -> dict[str, set[str]]:
    """The label names of every exportable name (a histogram's base name without ``le``)."""
    body, _ = full_metrics().exposition()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
            if family.type == "histogram":
                found.setdefault(family.name, set()).update(set(sample.labels) - {"le"})
    return found


# Labels Prometheus adds to every series of a target: job and instance, and the target
# labels deploy/prometheus/scrape-config.yml sets.
TARGET_LABELS = frozenset({"job", "instance", "host"})
SELECTOR = re.compile(r"\b(coloproxy_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def wrong_labels(text: str) -> list[str]:
    """``name{label=...}`` selectors in ``text`` whose labels the name does not have."""
    known = labels()
    problems = []
    for name, matchers in SELECTOR.findall(text):
        used = set(MATCHER.findall(matchers)) - TARGET_LABELS
        extra = used - known.get(name, set())
        if name in known and extra:
            problems.append(f"{name}{{{matchers}}}: no label {', '.join(sorted(extra))}")
    return problems


def table_problems(text: str) -> list[str]:
    """Rows of ``| metric | labels | meaning |`` tables: each name known, with exactly the
    labels the row says."""
    known = labels()
    problems = []
    inside = False
    for line in text.splitlines():
        if line.startswith("| metric | labels |"):
            inside = True
            continue
        if not line.startswith("|"):
            inside = False
            continue
        if not inside or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        said = {label.strip() for label in cells[1].split(",") if label.strip()}
        for name in names:
            if name not in known:
                problems.append(f"{name}: not in the exposition")
            elif known[name] != said:
                shown = ", ".join(sorted(known[name])) or "none"
                problems.append(f"{name}: labels are {shown}, the table says {cells[1] or 'none'}")
    return problems
