"""`python -m services.trainer`: the trainer service, alone or as one rank of a torchrun group.

    torchrun --nproc-per-node=8 -m services.trainer

Rank 0 runs the service; every other rank follows its training jobs (followers.py).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import torch

from services.common import logs
from services.common.objectstore import ObjectStore
from services.common.service import main
from services.common.settings import SettingsError, load_service_settings
from services.trainer import distributed, followers
from services.trainer.jobs import JobRunner, TrainingJob
from services.trainer.service import TrainerService, TrainerSettings, configure_backends, resolve_device

log = logging.getLogger("services.trainer")


def follower_main(settings: TrainerSettings) -> int:
    device = resolve_device(settings.trainer_device)
    if settings.trainer_threads > 0:
        torch.set_num_threads(settings.trainer_threads)
    configure_backends(device)
    group = followers.control_group()  # the same collective call as rank 0's TrainerService
    runner = JobRunner(ObjectStore.from_settings(settings), settings.s3_bucket, device, 0.0)
    stopping = threading.Event()
    # A SIGTERM stops the job in hand at the next step, agreed with every rank; rank 0 then
    # releases the followers.
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def execute(job: TrainingJob) -> None:
        runner.run(job, should_stop=stopping.is_set)

    return followers.follow(group, execute)


def run() -> int:
    if not distributed.launched_by_torchrun():
        return main(TrainerService)
    try:
        settings = load_service_settings(TrainerSettings, TrainerService.name)
    except SettingsError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    kind = resolve_device(settings.trainer_device).type
    info = distributed.init_from_environment(kind)
    try:
        if info.is_leader:
            return main(TrainerService)
        logs.configure(f"{TrainerService.name}-rank{info.rank}", settings.log_level)
        return follower_main(settings)
    finally:
        distributed.shutdown()


raise SystemExit(run())
