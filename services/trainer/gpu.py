"""GPU memory and utilisation of the training device, for metrics and benchmarks.

Memory comes from torch's caching allocator (tensors, not the allocator's reserve); utilisation
from NVML (PyPI `nvidia-ml-py`, a project dependency), when the driver answers.
On a CPU every sample is empty and `available` is False.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 5.0


@dataclass(frozen=True)
class GpuSample:
    allocated_bytes: int = 0
    peak_bytes: int = 0
    reserved_bytes: int = 0
    total_bytes: int = 0
    utilization: float | None = None  # 0..1


class GpuMonitor:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = device.type == "cuda" and torch.cuda.is_available()
        self._nvml_handle = None
        if self.available:
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as exc:  # noqa: BLE001 - utilisation is optional
                log.info("GPU utilisation unavailable (NVML)", extra={"error": str(exc)[:200]})

    def reset_peak(self) -> None:
        if self.available:
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> GpuSample:
        if not self.available:
            return GpuSample()
        utilization = None
        if self._nvml_handle is not None:
            try:
                import pynvml

                utilization = pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu / 100.0
            except Exception:  # noqa: BLE001 - a failed NVML read leaves the gauge alone
                utilization = None
        return GpuSample(
            allocated_bytes=int(torch.cuda.memory_allocated(self.device)),
            peak_bytes=int(torch.cuda.max_memory_allocated(self.device)),
            reserved_bytes=int(torch.cuda.memory_reserved(self.device)),
            total_bytes=int(torch.cuda.get_device_properties(self.device).total_memory),
            utilization=utilization,
        )
