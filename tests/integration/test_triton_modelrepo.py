"""The encoder model repository served by a real tritonserver (the one in the nvidia-pytriton wheel).

Versions are exported from a tiny timm model, published with write_model_version and loaded
through explicit model control; the served embeddings are compared with in-process torch. The
server is started as the local stack starts it (services.stack.servers), on ports of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")

from services.common import endpoints  # noqa: E402
from services.common import modelrepo as mr  # noqa: E402
from services.stack import servers  # noqa: E402

# Away from the local stack's Triton ports (18000-18002), so both can run at once.
HTTP_PORT, GRPC_PORT, METRICS_PORT = endpoints.port(28000), endpoints.port(28001), endpoints.port(28002)
MODEL = "encoder"
SIZE = 64
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
COSINE_MIN = 0.999


def _server_env(dist: servers.TritonDist) -> dict[str, str]:
    # LD_LIBRARY_PATH (this interpreter's LIBDIR + the wheel's vendored libraries) and PATH (the
    # venv first, so the stub's embedded interpreter finds numpy and onnxruntime) as the stack sets them.
    env = {**os.environ, **servers.triton_env(dist)}
    env[mr.THREADS_ENV] = "1"  # a 2-core CI machine: one intra-op thread per instance
    return env


def _server_argv(dist: servers.TritonDist, repository: Path, backends: Path, shm_prefix: str) -> list[str]:
    return [
        str(dist.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        "--http-address=127.0.0.1",
        f"--http-port={HTTP_PORT}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={GRPC_PORT}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={METRICS_PORT}",
        "--allow-gpu-metrics=false",
        # No CUDA here: skip the pinned host pool that would only log a failure.
        "--pinned-memory-pool-byte-size=0",
        # The python stubs talk to the server through /dev/shm regions named by this prefix;
        # a prefix of its own lets this server run beside the stack's.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, mr.TritonEncoder]]:
    """A real tritonserver on loopback with an empty repository; yields (repository, client)."""
    try:
        dist = servers.triton_dist()
        dist.stub()
    except servers.StackError as exc:
        pytest.skip(str(exc))
    work = tmp_path_factory.mktemp("triton")
    repository = work / "models"
    repository.mkdir()
    # The stack's helpers keep the backend copy and the shm prefix under the state directory:
    # a private one keeps this server apart from a running local stack.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IEX_STATE_DIR", str(work / "state"))
        backends = servers.prepare_triton_backends(dist)
        shm_prefix = servers.triton_shm_prefix()
    log_path = work / "tritonserver.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(  # noqa: S603 - fixed argv
            _server_argv(dist, repository, backends, shm_prefix),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_server_env(dist),
            start_new_session=True,
        )
    client = mr.TritonEncoder(f"127.0.0.1:{GRPC_PORT}", timeout_s=60.0, load_timeout_s=120.0)
    try:
        deadline = time.monotonic() + 60.0
        while not client.server_ready():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tritonserver did not become ready:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        yield repository, client
    finally:
        client.close()
        # SIGTERM is tritonserver's clean shutdown (unload models, stop stubs); SIGINT is not.
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


def _encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=0).eval()


def _torch_embeddings(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.nn.functional.normalize(model(x), dim=1).numpy()


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _publish(repository: Path, model: torch.nn.Module, version: int, scratch: Path) -> float:
    started = time.perf_counter()
    onnx_path = scratch / f"v{version}.onnx"
    mr.export_encoder_onnx(model, SIZE, onnx_path, MEAN, STD)
    elapsed = time.perf_counter() - started
    mr.write_model_version(repository, MODEL, version, onnx_path, SIZE, 512)
    return elapsed


def _timed(fn, repeat: int = 5) -> float:
    fn()  # warm
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def test_versions_load_serve_roll_forward_and_survive_a_broken_one(triton, tmp_path: Path) -> None:
    repository, client = triton
    torch.set_num_threads(1)  # leave the second core to tritonserver
    images = np.random.default_rng(0).integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
    timings: dict[str, float] = {}

    # Version 1.
    v1 = _encoder(seed=0)
    timings["export_v1_s"] = _publish(repository, v1, 1, tmp_path)
    started = time.perf_counter()
    assert client.load(MODEL, 1) == [1]
    timings["load_v1_s"] = time.perf_counter() - started
    assert client.is_ready(MODEL, 1)
    want_v1 = _torch_embeddings(v1, images)
    got_v1 = client.embed(MODEL, 1, images)
    assert got_v1.dtype == np.float32 and got_v1.shape == (32, 512)
    assert _min_cosine(got_v1, want_v1) > COSINE_MIN

    # Same batch: Triton round trip vs onnxruntime in-process on the same graph.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "v1.onnx"), sess_options=options, providers=["CPUExecutionProvider"])
    timings["embed32_triton_ms"] = 1000 * _timed(lambda: client.embed(MODEL, 1, images))
    timings["embed32_onnxruntime_ms"] = 1000 * _timed(lambda: session.run(None, {"images": images}))
    timings["embed32_torch_ms"] = 1000 * _timed(lambda: _torch_embeddings(v1, images), repeat=2)

    # Version 2 with other weights: both served, the newest by default, v1 for rollback.
    v2 = _encoder(seed=1)
    _publish(repository, v2, 2, tmp_path)
    started = time.perf_counter()
    assert client.load(MODEL, 2) == [1, 2]
    timings["load_v2_s"] = time.perf_counter() - started
    want_v2 = _torch_embeddings(v2, images)
    assert _min_cosine(client.embed(MODEL, 2, images), want_v2) > COSINE_MIN
    assert _min_cosine(client.embed(MODEL, None, images), want_v2) > COSINE_MIN
    assert _min_cosine(client.embed(MODEL, 1, images), want_v1) > COSINE_MIN
    assert _min_cosine(want_v1, want_v2) < 0.99  # the two versions really differ

    # Larger than max_batch_size: split and sent concurrently, answered in order.
    big = np.concatenate([images] * 3)  # 96 > 64
    np.testing.assert_allclose(client.embed(MODEL, 2, big), np.concatenate([want_v2] * 3), atol=1e-4)

    # Version 3 is published, then its graph is corrupted (a bad upload): Triton refuses the
    # load, and the versions loaded before keep serving.
    _publish(repository, v2, 3, tmp_path)
    (repository / MODEL / "3" / "model.onnx").write_bytes(b"\x00 not an onnx graph")
    started = time.perf_counter()
    with pytest.raises(mr.ModelLoadError, match="version 3"):
        client.load(MODEL, 3)
    timings["failed_load_v3_s"] = time.perf_counter() - started
    assert client.ready_versions(MODEL) == [1, 2]
    assert not client.is_ready(MODEL, 3)
    assert _min_cosine(client.embed(MODEL, 2, images), want_v2) > COSINE_MIN
    assert _min_cosine(client.embed(MODEL, None, images), want_v2) > COSINE_MIN
    with pytest.raises(mr.ModelNotReadyError):
        client.embed(MODEL, 3, images[:2])

    # Triton validates requests against the config before the backend sees them.
    with pytest.raises(mr.InferenceError, match="shape"):
        client.embed(MODEL, 2, images[:, : SIZE // 2])

    # Removing the broken version unblocks the next one (latest-2 would retry it forever).
    assert mr.discard_version(repository, MODEL, 3)
    _publish(repository, v1, 4, tmp_path)
    assert client.load(MODEL, 4) == [2, 4]
    assert _min_cosine(client.embed(MODEL, 4, images), want_v1) > COSINE_MIN
    assert mr.list_versions(repository, MODEL) == [1, 2, 4]

    client.unload(MODEL)
    assert not client.is_ready(MODEL)
    print("\n" + " ".join(f"{k}={v:.3f}" for k, v in timings.items()))
