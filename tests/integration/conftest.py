"""The full local stack for the integration suite: real servers and all six services, in a private state dir.

With --compat, Kafka and S3 are Apache Kafka (KRaft) and MinIO instead of tansu and SeaweedFS; the
services and the rest of the stack are the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common import endpoints
from services.stack import servers
from services.stack.process import port_open


@pytest.fixture(scope="session")
def stack_env(request, tmp_path_factory):
    """Starts everything once per session and stops exactly that at the end (by PID)."""
    state = tmp_path_factory.mktemp("iex-state")
    saved = dict(os.environ)
    os.environ["IEX_STATE_DIR"] = str(state)
    compat_processes = []
    if request.config.getoption("--compat"):
        from services.stack import compat

        ok, reason = compat.available()
        if not ok:
            pytest.fail(f"--compat asked for, but production servers cannot run here: {reason}")
        compat.fetch()
        for proc in (compat.minio(), compat.kafka_kraft()):
            proc.start()
            compat_processes.append(proc)
            proc.wait_ready()
        os.environ.update(compat.compat_env())
    busy = [p for name in servers.ALL_NAMES if servers.external_endpoint(name) is None for p in servers.ports(name) if port_open(endpoints.LOOPBACK, p)]
    if busy:
        pytest.fail(f"ports {busy} are in use: stop the other stack (make down) before running the integration suite")
    stack = servers.Stack(servers=servers.SERVER_NAMES, services=servers.SERVICE_NAMES, echo=print)
    try:
        stack.up()
        env = dict(stack.env())
        env["IEX_STATE_DIR"] = str(state)
        yield env
    finally:
        try:
            stack.down()
        finally:
            for proc in reversed(compat_processes):
                proc.stop()
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="session")
def state_dir(stack_env) -> Path:
    return Path(stack_env["IEX_STATE_DIR"])


def pytest_collection_modifyitems(session, config, items):
    """Modules that start their own servers run before the shared session stack exists.

    The shared stack lives until the session ends; a module with its own stack on the same ports
    would otherwise find them taken.
    """
    items.sort(key=lambda item: "stack_env" in getattr(item, "fixturenames", ()))
