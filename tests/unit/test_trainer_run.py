"""The training job end to end on CPU, through `python -m services.trainer.run` (the service's
job, loader, loop and checkpoints on a local folder):

- a run killed with SIGKILL and started again continues from its last mid-run checkpoint and takes
  the same steps (same losses, same weights) as an uninterrupted run;
- under torchrun with two gloo processes, both ranks end with identical parameters and only
  rank 0 writes.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.trainer import run
from services.trainer.encoder import EncoderState

pytestmark = pytest.mark.slow

STEPS = 30
KILL_AT_CHECKPOINT = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        base = rng.integers(0, 256, size=3)
        pixels = np.clip(base + rng.normal(0, 40, size=(30, 36, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (root / f"{i:03d}.png").write_bytes(buffer.getvalue())
    return root


@pytest.fixture(autouse=True)
def _restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def arguments(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--images", str(images), "--out", str(out), "--backbone", "test_resnet", "--image-size", "32",
        "--mlp-dim", "64", "--projection-dim", "32", "--batch-size", "8", "--threads", "1", "--workers", "1",
        "--device", "cpu", "--seed", "3", "--epochs", "20", *extra,
    ]  # fmt: skip


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_a_killed_run_resumes_with_the_same_next_steps(images, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run.main(arguments(images, straight, "--steps", str(STEPS))) == 0
    expected = report(straight)["losses"]
    assert len(expected) == STEPS

    child = subprocess.Popen(
        [sys.executable, "-m", "services.trainer.run", *arguments(images, killed, "--steps", str(STEPS), "--checkpoint-every", "1")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        for line in child.stdout:
            if line.strip() == f"checkpoint {KILL_AT_CHECKPOINT}":
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (killed / "v2-running.pt").exists() and not (killed / "v2.pt").exists()

    assert run.main(arguments(images, killed, "--steps", str(STEPS), "--checkpoint-every", "1")) == 0
    resumed = report(killed)
    start = resumed["resumed_from_step"]
    assert KILL_AT_CHECKPOINT <= start < STEPS
    assert resumed["first_step"] == start + 1 and resumed["steps"] == STEPS
    # The next step after the kill, and every one after it, is the uninterrupted run's.
    assert resumed["losses"] == pytest.approx(expected[start:], rel=1e-5, abs=1e-6)
    a = EncoderState.from_bytes((straight / "v2.pt").read_bytes(), torch.device("cpu"))
    b = EncoderState.from_bytes((killed / "v2.pt").read_bytes(), torch.device("cpu"))
    assert a.global_step == b.global_step == STEPS
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    assert not (killed / "v2-running.pt").exists()


def test_two_gloo_processes_train_in_step_and_only_rank_0_writes(images, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "services.trainer.run", *arguments(images, out, "--steps", "3")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    digests = {int(rank): (digest, int(steps)) for rank, digest, steps in re.findall(r"rank (\d+) params (\w+) steps (\d+)", done.stdout)}
    assert set(digests) == {0, 1}, done.stdout[-3000:]
    assert digests[0] == digests[1] and digests[0][1] == 3  # DDP kept the ranks identical
    writers = {line.split()[0] for line in (out / "writes.log").read_text().splitlines()}
    assert writers == {"0"}
    result = report(out)
    assert result["world_size"] == 2 and result["steps"] == 3 and result["global_batch"] == 8
    state = EncoderState.from_bytes((out / "v2.pt").read_bytes(), torch.device("cpu"))
    assert state.global_step == 3
    assert run.parameter_digest(state.model) == digests[0][0]
