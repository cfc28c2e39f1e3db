"""deploy/prometheus and deploy/grafana, checked with Prometheus's own tools, and every
metric name that documents and deploy files use checked against what the daemon exports.

The rules and the dashboard evaluated by a real Prometheus scraping real daemons:
tests/test_monitoring.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import metric_names

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "coloproxy-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "coloproxy.json"
# Where operators and these files name metrics (the CHANGELOG keeps old names as history).
DOCUMENTS = [
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "README.md",
    *sorted(path for path in (ROOT / "deploy").rglob("*") if path.is_file()),
]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("needs promtool (package prometheus; scripts/setup test installs it)")
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=60, check=False, cwd=PROMETHEUS
    )


def alerts() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_the_rules_check() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_the_rules_unit_tests_pass() -> None:
    done = promtool("test", "rules", "tests.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((PROMETHEUS / "tests.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alerts():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: never quiet"


def test_every_alert_says_how_bad_and_where_its_runbook_is() -> None:
    for rule in alerts():
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and labels["severity"] in ("critical", "warning")
        assert isinstance(annotations, dict)
        assert annotations["runbook_url"] == f"docs/operations.md#{str(rule['alert']).lower()}"


def test_the_scrape_config_and_the_rules_load_into_prometheus(tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "scrape-config.yml").read_text())
    config["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert config["scrape_configs"][0]["job_name"] == "coloproxy"  # what the rules select


def test_the_dashboard_has_every_panel_the_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "coloproxy"
    queries = "\n".join(dashboard_queries())
    for needed in (
        "coloproxy_protected",  # protection state
        "coloproxy_engine_checkpoints_total",  # checkpoints by reason
        "coloproxy_engine_checkpoint_pause_seconds_bucket",  # pause histogram
        "coloproxy_divergences_total",
        "coloproxy_held_packets",
        "coloproxy_stored_bytes",
        "coloproxy_engine_failovers_total",
        "coloproxy_nfqueue_queue_dropped_total",  # queue drops
    ):
        assert needed in queries, needed
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_name_only_metrics_the_daemon_exports(path: Path) -> None:
    text = path.read_text()
    assert not metric_names.unknown(metric_names.mentioned(text))
    assert not metric_names.wrong_labels(text)
    assert not metric_names.table_problems(text)


def test_the_name_check_catches_what_it_should() -> None:
    # The mistakes docs/operations.md once had.
    assert metric_names.unknown({"coloproxy_nfqueue_queue_dropped"}) == {
        "coloproxy_nfqueue_queue_dropped"
    }
    table = "| metric | labels | meaning |\n|---|---|---|\n"
    table += "| `coloproxy_rewrites_total` | reason | x |"
    assert metric_names.table_problems(table) == [
        "coloproxy_rewrites_total: labels are none, the table says reason"
    ]
    assert metric_names.wrong_labels('coloproxy_rewrites_total{reason="x"}')
    assert not metric_names.wrong_labels('coloproxy_packets_total{job="c", queue="p"}')
    assert not metric_names.unknown({"coloproxy_engine_checkpoint_pause_seconds"})
    assert not metric_names.unknown({"coloproxy_chardev_*"})


def test_every_alert_has_its_runbook_in_the_operators_guide() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    headings = {line[4:].strip() for line in guide.splitlines() if line.startswith("### ")}
    for rule in alerts():
        # GitHub's anchor of "### ColoproxyDown" is #coloproxydown: the rule's runbook_url.
        assert rule["alert"] in headings, f"no runbook for {rule['alert']}"
