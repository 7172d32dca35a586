"""A private tritonserver (the one in the nvidia-pytriton wheel) for benchmarks.

Started the way the local stack starts its own (services.stack.servers), but on free ports and
with a state directory of its own, so it never collides with a stack running beside it (the
python backend names its shared-memory regions after the state directory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from services.common import endpoints
from services.common import modelrepo as mr
from services.stack import servers


@contextmanager
def private_tritonserver(repository: Path, work: Path, *, ort_threads: int, log_name: str = "tritonserver.log") -> Iterator[str]:
    """Runs tritonserver (explicit model control) over `repository`; yields its gRPC address."""
    dist = servers.triton_dist()
    dist.stub()
    state = work / "state"
    saved = os.environ.get("IEX_STATE_DIR")
    os.environ["IEX_STATE_DIR"] = str(state)
    try:
        backends = servers.prepare_triton_backends(dist)
        shm_prefix = servers.triton_shm_prefix()
    finally:
        if saved is None:
            os.environ.pop("IEX_STATE_DIR", None)
        else:
            os.environ["IEX_STATE_DIR"] = saved
    http, grpc_port, metrics = endpoints.free_listen_port(), endpoints.free_listen_port(), endpoints.free_listen_port()
    argv = [
        str(dist.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]
    env = {**os.environ, **servers.triton_env(dist), mr.THREADS_ENV: str(ort_threads)}
    log_path = work / log_name
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)  # noqa: S603
    address = f"127.0.0.1:{grpc_port}"
    try:
        client = mr.TritonEncoder(address, timeout_s=10.0)
        try:
            deadline = time.monotonic() + 60.0
            while not client.server_ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tritonserver did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)
        finally:
            client.close()
        yield address
    finally:
        # SIGTERM is tritonserver's clean shutdown; SIGKILL the group only if it hangs.
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
