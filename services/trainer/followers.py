"""The trainer service on several processes (torchrun): rank 0 serves, the other ranks follow.

Rank 0 runs the whole service (Kafka consumer, gRPC, metrics, checkpoints, exports, events). Every
other rank runs `follow`: it waits for jobs that rank 0 broadcasts on a gloo control group and
runs each one on its rows of every batch, in lockstep with rank 0 (gradients are averaged by
DistributedDataParallel, keys gathered by MoCo's loss). Followers write nothing.

While idle, rank 0 sends a heartbeat every `HEARTBEAT_S` seconds, so a follower whose leader died
gives up after the control group's timeout instead of waiting forever; torchrun then restarts the
whole group (--max-restarts), and the unfinished record is redelivered to the new rank 0, which
resumes from the last mid-run checkpoint. After every job the ranks exchange their outcomes, so a
job that fails everywhere alike (a missing checkpoint) leaves the group in step for the next one.
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any, Callable

import torch.distributed as dist

from services.trainer.jobs import TrainingJob

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
CONTROL_TIMEOUT_S = 300.0

_HEARTBEAT = "heartbeat"
_JOB = "job"
_STOP = "stop"


def control_group(timeout_s: float = CONTROL_TIMEOUT_S) -> Any:
    """A gloo group for control messages (CPU objects, whatever the training backend); every rank
    must create it, in the same order relative to other groups."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def _broadcast(message: tuple[str, Any] | None, group: Any) -> tuple[str, Any]:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class FollowerFailed(RuntimeError):
    """A follower failed a job that rank 0 completed."""


def _outcomes(ok: bool, group: Any) -> list[bool]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, ok, group=group)
    return [bool(v) for v in gathered]


class Coordinator:
    """Rank 0's side: jobs and heartbeats to the followers, one collective at a time."""

    def __init__(self, group: Any, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.group = group
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), name="trainer-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self, every_s: float) -> None:
        while not self._closed.wait(every_s):
            with self._lock:
                if self._closed.is_set():
                    return
                _broadcast((_HEARTBEAT, None), self.group)

    def run(self, job: TrainingJob, execute: Callable[[TrainingJob], Any]) -> Any:
        """Sends `job` to every follower and runs it here too; the followers train in lockstep.
        Raises this rank's error, or FollowerFailed when only a follower failed."""
        with self._lock:
            _broadcast((_JOB, job), self.group)
            error: BaseException | None = None
            try:
                result = execute(job)
            except BaseException as exc:  # noqa: BLE001 - re-raised once the ranks agree
                error = exc
            outcomes = _outcomes(error is None, self.group)
            if error is not None:
                raise error
            if not all(outcomes):
                raise FollowerFailed(f"{outcomes.count(False)} follower(s) failed {job.exploration_id} v{job.version}")
            return result

    def close(self) -> None:
        """Releases the followers (they exit)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            try:
                _broadcast((_STOP, None), self.group)
            except Exception as exc:  # noqa: BLE001 - followers already gone
                log.warning("followers not reachable at shutdown", extra={"error": str(exc)[:200]})


def follow(group: Any, execute: Callable[[TrainingJob], Any]) -> int:
    """A follower's life: run every job rank 0 sends until it says stop. Returns an exit code."""
    jobs = 0
    while True:
        kind, payload = _broadcast(None, group)
        if kind == _HEARTBEAT:
            continue
        if kind == _STOP:
            log.info("released by rank 0", extra={"jobs": jobs})
            return 0
        if kind != _JOB or not isinstance(payload, TrainingJob):
            log.error("unknown control message", extra={"kind": str(kind)[:40]})
            return 1
        jobs += 1
        ok = True
        try:
            execute(payload)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which decides
            ok = False
            log.error("job failed on follower", extra={"exploration": payload.exploration_id, "version": payload.version, "error": str(exc)[:300]})
        # A follower's trained state is discarded either way; what matters is that every rank
        # reaches this point, so the group is in step for the next job.
        _outcomes(ok, group)
