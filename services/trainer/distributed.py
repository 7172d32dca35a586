"""Data-parallel training over the processes torchrun starts: one code path for 1 process or N.

`init_from_environment` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): NCCL between GPUs, gloo on CPUs. Without torchrun every helper here is an
identity, so a single CPU process runs exactly the code a GPU node runs. The model is wrapped in
DistributedDataParallel (gradients averaged across ranks), BatchNorm layers are synchronised on
GPUs for the run (MoCo-v3's recipe; PyTorch has no CPU SyncBatchNorm), and MoCo's keys are
gathered across ranks in `moco.gather_across_ranks`. Only rank 0 writes anything.
"""

from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_info() -> ProcessInfo:
    if is_initialized():
        return ProcessInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return ProcessInfo()


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True under torchrun (even with one process: DDP on one GPU is the production path)."""
    env = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in env or int(env.get("WORLD_SIZE", "1") or 1) > 1


def init_from_environment(device_type: str, timeout_s: float = 1800.0) -> ProcessInfo:
    """Joins torchrun's process group (NCCL on GPUs, gloo on CPUs) and picks this process's GPU.
    A single process (no torchrun) stays outside any group."""
    if is_initialized() or not launched_by_torchrun():
        return process_info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = process_info()
    log.info("joined process group", extra={"rank": info.rank, "world_size": info.world_size, "backend": backend})
    return info


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def device_for(device_type: str) -> torch.device:
    """This process's device: its local GPU under torchrun, else the plain device."""
    if device_type == "cuda":
        return torch.device("cuda", process_info().local_rank if is_initialized() else torch.cuda.current_device())
    return torch.device(device_type)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped for data-parallel training under torchrun (one process included); the
    model itself otherwise. Wrapping broadcasts rank 0's parameters and buffers, so every rank
    starts identical."""
    if not is_initialized():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextmanager
def synchronised_batchnorm(model: nn.Module, device: torch.device) -> Iterator[None]:
    """BatchNorm statistics over the global batch for the duration of a run (GPUs, several
    ranks); the original layers (sharing parameters and running statistics) come back after, so
    checkpoints and exports never see SyncBatchNorm."""
    if device.type != "cuda" or not is_initialized() or dist.get_world_size() == 1:
        yield
        return
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                if child.affine:
                    sync.weight, sync.bias = child.weight, child.bias
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
                sync.train(child.training)
                setattr(parent, name, sync)
                replaced.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, original in replaced:
            setattr(parent, name, original)


def agree(loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """(mean loss over ranks, whether any rank wants to stop): one small all-reduce per step, so
    every rank makes the same early-stopping and interruption decisions at the same step."""
    if not is_initialized() or dist.get_world_size() == 1:
        return float(loss.detach()), stop
    packed = torch.stack([loss.detach().float(), torch.tensor(1.0 if stop else 0.0, device=loss.device)])
    dist.all_reduce(packed)
    values = packed.tolist()
    return values[0] / dist.get_world_size(), values[1] > 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()
