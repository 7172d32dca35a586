"""Options and the skip policy of every suite.

A test may skip only for an optional capability declared here, with a reason that starts with
`optional capability <name>:`. Under IEX_STRICT_SKIPS=1 (what .ci/run sets) any other skip (busy
ports, data that `make data` should have fetched, a tool that `make setup` installs) fails the
run; every run prints the skips it saw, with the verdict, at the end.
"""

from __future__ import annotations

import os
import re

import pytest

# What a machine may lack and still pass: the name, and what it is.
OPTIONAL_CAPABILITIES: dict[str, str] = {
    "gpu": "a CUDA device (tests marked gpu)",
    "compat-servers": "Java 17, Maven and Go, for Apache Kafka (KRaft) and MinIO (make test-compat)",
}
OPTIONAL = re.compile(r"^optional capability ([a-z0-9-]+):")
STRICT_ENV = "IEX_STRICT_SKIPS"


def optional_skip_reason(capability: str, why: str) -> str:
    if capability not in OPTIONAL_CAPABILITIES:
        raise ValueError(f"{capability!r} is not an optional capability declared in tests/conftest.py")
    return f"optional capability {capability}: {why}"


def skip_allowed(reason: str) -> bool:
    match = OPTIONAL.match(reason.removeprefix("Skipped: ").strip())
    return bool(match) and match.group(1) in OPTIONAL_CAPABILITIES


def pytest_addoption(parser):
    parser.addoption(
        "--compat",
        action="store_true",
        default=False,
        help="point the integration suite at production servers (Apache Kafka KRaft, MinIO) started by services.stack.compat",
    )


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        return False


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        marker = pytest.mark.skip(reason=optional_skip_reason("gpu", "no CUDA device on this machine"))
        for item in gpu_items:
            item.add_marker(marker)


class SkipPolicy:
    """Collects every skip (of a test or of a whole module) and judges it against the declared capabilities."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skips: list[tuple[str, str, bool]] = []

    @staticmethod
    def _reason(report) -> str:
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            return str(longrepr[2]).removeprefix("Skipped: ")
        return str(longrepr)

    def _record(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = self._reason(report)
            self.skips.append((report.nodeid, reason, skip_allowed(reason)))

    def pytest_runtest_logreport(self, report):
        if report.when in ("setup", "call"):
            self._record(report)

    def pytest_collectreport(self, report):
        self._record(report)

    @property
    def unexpected(self) -> list[tuple[str, str, bool]]:
        return [skip for skip in self.skips if not skip[2]]

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.skips:
            terminalreporter.write_line(f"skip policy: no test skipped ({'strict' if self.strict else 'not strict'})")
            return
        terminalreporter.section("skip summary (tests/conftest.py: optional capabilities only)")
        grouped: dict[tuple[str, bool], list[str]] = {}
        for nodeid, reason, allowed in self.skips:
            grouped.setdefault((reason, allowed), []).append(nodeid)
        for (reason, allowed), nodeids in sorted(grouped.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            verdict = "allowed" if allowed else "UNEXPECTED"
            terminalreporter.write_line(f"{verdict:10s} {len(nodeids):3d} x {reason}  (e.g. {nodeids[0]})")
        unexpected = len(self.unexpected)
        tail = "; strict (IEX_STRICT_SKIPS=1): the run fails" if self.strict and unexpected else ""
        terminalreporter.write_line(f"skips: {len(self.skips) - unexpected} allowed, {unexpected} unexpected{tail}")

    def pytest_sessionfinish(self, session, exitstatus):
        if self.strict and self.unexpected and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    strict = os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    config.pluginmanager.register(SkipPolicy(strict), "iex-skip-policy")
