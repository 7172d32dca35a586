"""A cap on response bytes held in memory at once, across every download of one event loop.

The image semaphore bounds how many downloads run; it does not bound memory, because one body may
be 8 MB and the next 20 KB. Each download reserves its body size here before reading it (the
Content-Length when the server sends one, the byte limit when it does not) and gives the
reservation back once the image is decoded, so memory stays under the cap at any speed.

A reservation is taken whole, never grown while waiting, so two downloads can never each hold half
and wait for the other (no hold-and-wait, no deadlock). Waiters are served first come, first served,
so a large body is not starved by a stream of small ones.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """Async byte semaphore; use within one event loop."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def _clamp(self, size: int) -> int:
        # A request above the whole budget waits for everything else to finish, then runs alone.
        return max(0, min(size, self.capacity))

    async def acquire(self, size: int) -> int:
        """Waits until `size` bytes fit; returns the amount reserved (give exactly that to release)."""
        size = self._clamp(size)
        if not self._waiters and self.used + size <= self.capacity:
            self._take(size)
            return size
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                # Granted just as we were cancelled: hand it straight back.
                self.release(size)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            raise
        return size

    def release(self, size: int) -> None:
        self.used -= size
        if self.used < 0:
            raise RuntimeError("ByteBudget released more than was acquired")
        self._wake()

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.used + size > self.capacity:
                return
            self._waiters.popleft()
            self._take(size)
            future.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
