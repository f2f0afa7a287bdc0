"""The Prometheus alert rules and the Grafana dashboard in monitoring/: the rules pass their
promtool tests, and every metric they name is one the relay exposes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client.metrics_core import Metric

from segment_relay.metrics import Metrics
from support import requires

MONITORING = Path(__file__).parents[1] / "monitoring"
METRIC_NAME = re.compile(r"\bsegment_relay_[a-z_]+")


def exposed_names() -> set[str]:
    """The series names the relay's /metrics can carry."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    families: list[Metric] = list(Metrics().registry.collect())
    return {f.name + suffix for f in families for suffix in suffixes[f.type]}


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_the_rules_and_the_dashboard_name_only_metrics_the_relay_exposes() -> None:
    exposed = exposed_names()
    for expressions in (rule_expressions(), dashboard_expressions()):
        named = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
        assert named, "no segment_relay_ metric named"
        assert named <= exposed, sorted(named - exposed)


@requires("promtool")
def test_the_alert_rules_pass_their_promtool_tests() -> None:
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run(
            ["promtool", *command],
            cwd=MONITORING,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
