"""Peak resident memory of a process and all its descendants, sampled from /proc (Linux).

`resource.getrusage(RUSAGE_CHILDREN)` reports the largest single child, not the sum of a pool of
worker processes; benchmarks that compare a multi-process tool with a single process need the sum.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return found


def tree_rss_bytes(pid: int) -> int:
    total = 0
    stack = [pid]
    seen = set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
        stack.extend(_children(current))
    return total


class PeakRss:
    """Samples a process tree every `interval_s` until stopped; `peak` is the largest sum seen."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)


def run_measured(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 1800) -> tuple[subprocess.CompletedProcess, int, float, float]:
    """Runs argv to completion; (completed process, peak RSS of its tree in bytes, wall seconds, CPU seconds).

    CPU seconds are user + system of the process and every descendant it waited for (a pool's workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    with PeakRss(process.pid) as sampler:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
    completed = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return completed, sampler.peak, wall, cpu
