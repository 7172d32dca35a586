"""The scorer's alerting rules are valid Prometheus rules and fire on the scorer's own metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import services.scorer
from services.scorer.metrics import ScorerMetrics
from services.common.metrics import Metrics

HERE = Path(services.scorer.__file__).parent
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian prometheus) is not installed")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=HERE, capture_output=True, text=True, timeout=60, check=False)


def test_rules_are_valid():
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_fire_and_clear_as_expected():
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_metrics_the_scorer_exports():
    ScorerMetrics(Metrics("scorer"))
    exported = {metric.name for metric in REGISTRY.collect()}
    for name in ("iex_scorer_model_load_failing", "iex_scorer_decisions_dead_lettered"):
        assert name in exported, name
        assert name in (HERE / "alerts.yml").read_text()
