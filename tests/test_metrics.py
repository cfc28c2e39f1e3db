"""Metrics: a real HTTP endpoint on 127.0.0.1, scraped and parsed with prometheus_client's
own parsers; the sources are the real ones (the daemon's counters, a comparator, the
capture layer's queue stats)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from coloproxy import __version__
from coloproxy.capture.stats import QueueStats
from coloproxy.compare import Comparator, CompareConfig, Side
from coloproxy.daemon.primary import ProxyCounters
from coloproxy.metrics import (
    EngineFigures,
    Histogram,
    Metrics,
    MetricsError,
    MetricsServer,
    protocol_label,
)
from craft import udp


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def http(address: tuple[str, int], request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP exchange: status, headers (lower-case names), body."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(path: str = "/metrics", accept: str | None = None, method: str = "GET") -> bytes:
    extra = f"Accept: {accept}\r\n" if accept else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
def metrics(clock: FakeClock) -> Metrics:
    return Metrics(pair="lab", role="primary", clock=clock, queue_names={10: "primary-out"})


@pytest_asyncio.fixture
async def server(metrics: Metrics) -> AsyncIterator[MetricsServer]:
    async with MetricsServer(metrics, "127.0.0.1", 0) as running:
        yield running


async def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = await http(server.address, get())
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    return samples(body.decode())


@pytest.mark.asyncio
async def test_scrape_the_packet_counters(metrics: Metrics, server: MetricsServer) -> None:
    counts = ProxyCounters()  # the daemon's own counters, read at scrape time
    metrics.counts = counts
    metrics.protected = True
    counts.packets["primary-out", "accept-matched"] += 3
    counts.packets["secondary-out", "drop-compared"] += 2
    counts.packets["secondary-in", "accept"] += 4
    counts.divergences["tcp", "payload"] += 2
    counts.divergences["ethertype-0x0806", "payload"] += 1
    counts.divergences["ip-proto-47", "fate"] += 1
    counts.divergences["ip-proto-50", "fate"] += 1
    counts.requests["payload"] += 1
    counts.requests["restart"] += 1
    counts.coalesced["payload"] += 2
    counts.malformed["primary", "truncated"] += 1
    counts.rewrites["shifted"] += 5
    counts.rewrites["bad-tcp-options"] += 1
    counts.rewrites["no-offset"] += 2
    counts.rewrites["not-tcp"] += 7
    counts.egress_rewrites["shifted"] += 3
    counts.egress_rewrites["no-offset"] += 9
    counts.syns_replayed += 2
    counts.backoff_reverts += 4
    found = await scrape(server)
    expected = {
        ("coloproxy_protected", ()): 1.0,
        ("coloproxy_packets_total", (("queue", "primary-out"), ("reason", "matched"),
                                     ("verdict", "accept"))): 3.0,
        ("coloproxy_packets_total", (("queue", "secondary-out"), ("reason", "compared"),
                                     ("verdict", "drop"))): 2.0,
        ("coloproxy_packets_total", (("queue", "secondary-in"), ("reason", "none"),
                                     ("verdict", "accept"))): 4.0,
        ("coloproxy_divergences_total", (("protocol", "tcp"), ("reason", "payload"))): 2.0,
        ("coloproxy_divergences_total", (("protocol", "non-ip"), ("reason", "payload"))): 1.0,
        ("coloproxy_divergences_total", (("protocol", "ip-other"), ("reason", "fate"))): 2.0,
        ("coloproxy_checkpoint_requests_total", (("reason", "payload"),)): 1.0,
        ("coloproxy_checkpoint_requests_total", (("reason", "restart"),)): 1.0,
        ("coloproxy_checkpoint_requests_coalesced_total", (("reason", "payload"),)): 2.0,
        ("coloproxy_malformed_packets_total", (("reason", "truncated"), ("side", "primary"))): 1.0,
        ("coloproxy_rewrites_total", ()): 6.0,
        ("coloproxy_rewrite_failures_total", (("reason", "bad-tcp-options"),)): 1.0,
        ("coloproxy_rewrite_failures_total", (("reason", "no-offset"),)): 2.0,
        ("coloproxy_takeover_rewrites_total", ()): 3.0,
        ("coloproxy_syns_replayed_total", ()): 2.0,
        ("coloproxy_backoff_reverts_total", ()): 4.0,
        ("coloproxy_checkpoints_completed_total", ()): 0.0,
    }  # fmt: skip
    for key, value in expected.items():
        assert found.pop(key) == value, key
    assert found.pop(
        (
            "coloproxy_build_info",
            (("pair", "lab"), ("python", found_python(found)), ("role", "primary"),
             ("version", __version__)),
        )
    ) == 1.0  # fmt: skip
    assert not [key for key in found if not key[0].startswith("coloproxy_process_")], found
    assert "coloproxy_seconds_since_last_checkpoint" not in {name for name, _ in found}


def found_python(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    return next(dict(labels)["python"] for name, labels in found if name == "coloproxy_build_info")


@pytest.mark.asyncio
async def test_the_last_checkpoint_ages_on_the_metrics_clock(
    metrics: Metrics, server: MetricsServer, clock: FakeClock
) -> None:
    counts = ProxyCounters()
    metrics.counts = counts
    counts.checkpoints_completed = 4
    counts.last_checkpoint = 90.0
    found = await scrape(server)
    assert found["coloproxy_checkpoints_completed_total", ()] == 4.0
    assert found["coloproxy_seconds_since_last_checkpoint", ()] == 10.0
    clock.now = 112.5
    assert (await scrape(server))["coloproxy_seconds_since_last_checkpoint", ()] == 22.5


@pytest.mark.asyncio
async def test_comparator_gauges_are_read_at_scrape_time(
    metrics: Metrics, server: MetricsServer, clock: FakeClock
) -> None:
    comparator = Comparator(CompareConfig())  # no timer is run: nothing times out
    metrics.compare_stats = comparator.stats
    comparator.feed(Side.PRIMARY, udp(b"hello"), 10.0, "p1")  # matched below
    comparator.feed(Side.PRIMARY, udp(b"later"), 11.0, "p2")  # stays held
    comparator.feed(Side.SECONDARY, udp(b"hello"), 12.0, "s1")
    comparator.feed(Side.SECONDARY, udp(b"other"), 12.5, "s2")  # stays stored
    clock.now = 20.0
    stats = comparator.stats()
    found = await scrape(server)
    assert found["coloproxy_held_packets", ()] == stats.held_packets == 1
    assert found["coloproxy_stored_bytes", ()] == stats.stored_bytes > 0
    assert found["coloproxy_compared_bytes_total", ()] == stats.bytes_compared
    assert found["coloproxy_flows", ()] == stats.flows == 1
    assert found["coloproxy_oldest_held_age_seconds", (("side", "primary"),)] == 9.0
    assert found["coloproxy_oldest_held_age_seconds", (("side", "secondary"),)] == 7.5
    for name in ("checkpoint_requested", "checkpointing", "saturated", "isn_offsets_learned",
                 "tcp_connections", "fragments_pending"):  # fmt: skip
        assert found[f"coloproxy_{name}", ()] == float(getattr(stats, name)), name
    metrics.compare_stats = lambda: None  # a secondary has no comparator
    assert "coloproxy_held_packets" not in {name for name, _ in await scrape(server)}


@pytest.mark.asyncio
async def test_kernel_queue_counters_and_control_clients(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.queue_stats = lambda: [
        QueueStats(11, 4242, 0, 2, 65535, 0, 0, 99),
        QueueStats(10, 4242, 3, 2, 65535, 7, 8, 1000),
    ]
    metrics.control_clients = lambda: {"engine": 1, "cli": 0}
    found = await scrape(server)
    ten = (("name", "primary-out"), ("queue", "10"))
    eleven = (("name", ""), ("queue", "11"))
    assert found["coloproxy_nfqueue_packets", ten] == 3.0
    assert found["coloproxy_nfqueue_queue_dropped_total", ten] == 7.0
    assert found["coloproxy_nfqueue_user_dropped_total", ten] == 8.0
    assert found["coloproxy_nfqueue_packets", eleven] == 0.0
    assert found["coloproxy_control_clients", (("role", "engine"),)] == 1.0
    assert found["coloproxy_control_clients", (("role", "cli"),)] == 0.0


@pytest.mark.asyncio
async def test_a_failing_source_is_counted_and_the_scrape_goes_on(
    metrics: Metrics, server: MetricsServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list[QueueStats]:
        raise OSError("no /proc here")

    metrics.queue_stats = broken
    metrics.control_clients = lambda: {"engine": 2}
    found = await scrape(server)
    assert found["coloproxy_scrape_errors_total", (("source", "nfqueue"),)] == 1.0
    assert found["coloproxy_control_clients", (("role", "engine"),)] == 2.0
    assert "metrics source nfqueue failed" in caplog.text
    caplog.clear()
    assert (await scrape(server))["coloproxy_scrape_errors_total", (("source", "nfqueue"),)] == 2
    # Once in the log, then counted: not a traceback every scrape.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.asyncio
async def test_the_checkpoint_engines_figures(
    metrics: Metrics, server: MetricsServer, clock: FakeClock
) -> None:
    figures = EngineFigures(role="primary", qemu="running", colo_mode="primary", period_ms=2000)
    metrics.engine = figures
    figures.checkpoints.update({"payload": 3, "periodic": 2})
    figures.triggers.update({"first": 3, "retry": 1})
    for pause in (0.0025, 0.004, 0.03):
        figures.pause.observe(pause)
    figures.request_to_stop.observe(0.0015)
    figures.failovers["secondary-lost"] += 1
    figures.last_failover.update({"lost-heartbeat": 0.004, "proxy": 0.006})
    figures.last_colo_exit_reason = "request"
    figures.migration = {
        "ram_transferred": 1 << 20,
        "ram_total": 256 << 20,
        "ram_normal_pages": 300,
        "ram_duplicate_pages": 65000,
        "dirty_pages_rate": 250,
        "dirty_sync_count": 7,
    }
    figures.heartbeats = {"sent": 40, "received": 38, "bad-version": 1}
    figures.peer_heard = 99.95
    found = await scrape(server)
    assert found["coloproxy_engine_checkpoints_total", (("reason", "payload"),)] == 3.0
    assert found["coloproxy_engine_checkpoints_total", (("reason", "periodic"),)] == 2.0
    assert found["coloproxy_engine_triggers_total", (("kind", "retry"),)] == 1.0
    pause = "coloproxy_engine_checkpoint_pause_seconds"
    assert found[f"{pause}_bucket", (("le", "0.005"),)] == 2.0
    assert found[f"{pause}_bucket", (("le", "+Inf"),)] == 3.0
    assert found[f"{pause}_count", ()] == 3.0
    assert found[f"{pause}_sum", ()] == pytest.approx(0.0365)
    assert found["coloproxy_engine_request_to_stop_seconds_count", ()] == 1.0
    assert found["coloproxy_engine_failovers_total", (("kind", "secondary-lost"),)] == 1.0
    assert found["coloproxy_engine_last_failover_seconds", (("step", "proxy"),)] == 0.006
    assert found["coloproxy_engine_colo_mode", (("mode", "primary"),)] == 1.0
    assert found["coloproxy_engine_colo_mode", (("mode", "none"),)] == 0.0
    assert found["coloproxy_engine_last_colo_exit", (("reason", "request"),)] == 1.0
    assert found["coloproxy_engine_period_seconds", ()] == 2.0
    # One metric per unit (bytes, pages, pages per second), not one gauge with a label.
    assert found["coloproxy_engine_migration_transferred_bytes_total", ()] == 1 << 20
    assert found["coloproxy_engine_migration_ram_bytes", ()] == 256 << 20
    assert found["coloproxy_engine_migration_normal_pages_total", ()] == 300
    assert found["coloproxy_engine_migration_duplicate_pages_total", ()] == 65000
    assert found["coloproxy_engine_migration_dirty_pages_per_second", ()] == 250
    assert found["coloproxy_engine_migration_dirty_syncs_total", ()] == 7
    assert not [key for key in found if key[0] == "coloproxy_engine_migration"]
    assert found["coloproxy_engine_heartbeats_total", (("event", "bad-version"),)] == 1.0
    assert found["coloproxy_engine_peer_heartbeat_age_seconds", ()] == pytest.approx(0.05)
    info = (("phase", "off"), ("qemu", "running"), ("role", "primary"), ("watch", "standby"))
    assert found["coloproxy_engine_info", info] == 1.0


def test_histogram_buckets_and_recent_values() -> None:
    histogram = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.005, 5.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.001", 2.0), ("0.01", 3.0), ("+Inf", 4.0)]
    assert list(histogram.recent) == [0.0005, 0.001, 0.005, 5.0]
    assert histogram.count == 4


@pytest.mark.asyncio
async def test_openmetrics_on_request(metrics: Metrics, server: MetricsServer) -> None:
    metrics.counts = ProxyCounters()
    status, headers, body = await http(
        server.address, get(accept="application/openmetrics-text; version=1.0.0")
    )
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(body.decode())}
    assert {"coloproxy_packets", "coloproxy_build", "coloproxy_protected"} <= names


@pytest.mark.asyncio
async def test_the_registry_is_our_own(metrics: Metrics) -> None:
    metrics.counts = ProxyCounters()
    assert b"coloproxy_packets" in metrics.exposition()[0]
    assert b"coloproxy_" not in generate_latest(REGISTRY)


# -- HTTP ------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/"), 404),
        (get("/metrics", method="POST"), 405),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
)
async def test_http_errors(server: MetricsServer, request_bytes: bytes, status: int) -> None:
    assert (await http(server.address, request_bytes))[0] == status


@pytest.mark.asyncio
async def test_head_has_no_body(server: MetricsServer) -> None:
    status, headers, body = await http(server.address, get(method="HEAD"))
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0


@pytest.mark.asyncio
async def test_connections_are_bounded(metrics: Metrics) -> None:
    async with MetricsServer(metrics, "127.0.0.1", 0, max_connections=1, request_timeout=0.5) as s:
        idle_reader, idle_writer = await asyncio.open_connection(*s.address)  # sends nothing
        async with asyncio.timeout(5):
            while s._active < 1:  # until the server took the idle connection
                await asyncio.sleep(0.005)
        assert (await http(s.address, get()))[0] == 503
        async with asyncio.timeout(5):
            late = await idle_reader.read()
        assert late.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        idle_writer.close()
        await idle_writer.wait_closed()
        assert (await http(s.address, get()))[0] == 200


@pytest.mark.asyncio
async def test_an_address_in_use_is_an_error(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await MetricsServer(metrics, "127.0.0.1", port).start()


def test_protocol_labels_are_bounded() -> None:
    assert [protocol_label(p) for p in ("tcp", "icmpv6", "any")] == ["tcp", "icmpv6", "any"]
    assert protocol_label("ip-proto-132") == "ip-other"
    assert protocol_label("ethertype-0x88cc") == "non-ip"


@pytest.mark.asyncio
async def test_the_comparators_bounds_beside_what_it_holds(
    metrics: Metrics, server: MetricsServer
) -> None:
    # Alerts compare held packets and stored bytes with these (deploy/prometheus).
    metrics.compare_bounds = lambda: (4096, 64 << 20)
    found = await scrape(server)
    assert found["coloproxy_max_held_packets", ()] == 4096
    assert found["coloproxy_max_held_bytes", ()] == 64 << 20
