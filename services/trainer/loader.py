"""Training batches: streamed from the object store by decode workers, with bounded prefetch.

A run reads its images epoch after epoch in an order that is a pure function of (seed, epoch), so
the batch at any (epoch, batch) position is known in advance: a resumed run continues at the exact
batch it stopped at, and every rank of a data-parallel run takes its own rows of the same global
batch. Nothing holds the whole set: `prefetch_batches` batches are in flight (read + decode on
`workers` threads; Pillow releases the GIL while decoding and resizing), and an optional cache of
decoded pixels (`cache_bytes`) spares later epochs the decode for as many images as fit.

An image that is missing or undecodable is remembered (never read again) and its slot in the
batch is filled with another image of the same batch, so every batch is full, every rank takes
the same number of steps, and the step count of a run is known before it starts.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from services.common.objectstore import ObjectStore
from services.trainer import data

log = logging.getLogger(__name__)

# Exceptions of a bad image (never of an unreachable store: that one stops the run).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning)


class NoUsableImages(RuntimeError):
    """Not one image of the training set can be read and decoded."""


# ---------------------------------------------------------------------------------------------
# Where the bytes come from


class ImageSource(Protocol):
    def read(self, reference: str) -> bytes | None:
        """The encoded image, None when it does not exist; raises DependencyUnavailable when the
        source cannot be reached and ValueError for a malformed reference."""


class StoreSource:
    """References are `s3://bucket/key` or keys in `default_bucket`."""

    def __init__(self, store: ObjectStore, default_bucket: str) -> None:
        self.store = store
        self.default_bucket = default_bucket

    def read(self, reference: str) -> bytes | None:
        bucket, key = data.resolve(reference, self.default_bucket)
        return self.store.get_or_none(bucket, key)


class DirectorySource:
    """References are paths relative to `root` (benchmarks and the command-line runner)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def read(self, reference: str) -> bytes | None:
        path = (self.root / reference).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"reference outside the source directory: {reference!r}")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None


# ---------------------------------------------------------------------------------------------
# Positions and orders


@dataclass(frozen=True, order=True)
class Position:
    """The next global batch of a run: batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of one epoch; the same on every rank and after every restart."""
    digest = hashlib.sha256(f"order:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return torch.randperm(num_images, generator=generator)


@dataclass
class Batch:
    """uint8 pixels [B, 3, S, S] (a channels-first view of the loader's buffer, valid until the
    next-but-one batch is requested), where it sits in the run, and how long the trainer waited."""

    pixels: torch.Tensor
    position: Position
    wait_seconds: float
    filled: int = 0  # slots filled with repeats of the batch's other images


@dataclass
class LoaderStats:
    images_read: int = 0
    cache_hits: int = 0
    decode_seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)  # unique images by reason


class BatchLoader:
    """Rows [offset, offset + local_batch) of each global batch of `global_batch` images."""

    def __init__(self, num_images: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        if global_batch < world_size or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split over {world_size} processes")
        self.num_images = num_images
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.offset = rank * self.local_batch
        self.seed = seed
        self.stats = LoaderStats()

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.global_batch

    def rows(self, order: torch.Tensor, batch: int) -> list[int]:
        start = batch * self.global_batch + self.offset
        return order[start : start + self.local_batch].tolist()

    def batches(self, start: Position = Position()) -> Iterator[Batch]:
        """Batches from `start` on, epoch after epoch, until the caller stops asking."""
        raise NotImplementedError

    def close(self) -> None:
        """Stops the workers (idempotent)."""


class TensorLoader(BatchLoader):
    """Images already decoded in memory, uint8 [N, 3, H, W] (tests and small sets)."""

    def __init__(self, images: torch.Tensor, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        super().__init__(images.shape[0], global_batch, seed, rank, world_size)
        self.images = images

    def batches(self, start: Position = Position()) -> Iterator[Batch]:
        if self.steps_per_epoch == 0:
            return
        epoch, batch = start.epoch, start.batch
        while True:
            order = epoch_order(self.num_images, self.seed, epoch)
            for index in range(batch, self.steps_per_epoch):
                yield Batch(self.images[self.rows(order, index)], Position(epoch, index), 0.0)
            epoch, batch = epoch + 1, 0


class DecodedCache:
    """Decoded images by reference, up to `max_bytes`; first come, never evicted: under random
    epoch orders eviction would buy no hits, only churn."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.used = 0
        self._items: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, reference: str) -> np.ndarray | None:
        return self._items.get(reference)

    def put(self, reference: str, pixels: np.ndarray) -> None:
        if self.max_bytes == 0:
            return
        with self._lock:
            if reference in self._items or self.used + pixels.nbytes > self.max_bytes:
                return
            self._items[reference] = pixels
            self.used += pixels.nbytes

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Pending:
    position: Position
    slot: int
    futures: list[Future]


class StreamingLoader(BatchLoader):
    """Reads and decodes each batch's images on worker threads, `prefetch_batches` ahead."""

    def __init__(
        self,
        source: ImageSource,
        references: Sequence[str],
        decode_size: int,
        global_batch: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 8,
        prefetch_batches: int = 4,
        cache_bytes: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(len(references), global_batch, seed, rank, world_size)
        if decode_size < 8:
            raise ValueError(f"decode_size must be >= 8, got {decode_size}")
        self.source = source
        self.references = list(references)
        self.decode_size = decode_size
        self.prefetch_batches = max(1, prefetch_batches)
        self.cache = DecodedCache(cache_bytes)
        self._bad: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="trainer-decode")
        self._closed = False
        self._fallback: np.ndarray | None = None
        # One buffer per batch in flight, plus the batch being trained on and the one before it
        # (its pixels may still be on their way to the GPU).
        shape = (self.local_batch, decode_size, decode_size, 3)
        pin = pin_memory and torch.cuda.is_available()
        self._buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(self.prefetch_batches + 2)]

    # ---- one image -----------------------------------------------------------------------------
    def _load_into(self, reference: str, buffer: np.ndarray, row: int) -> bool:
        """Reads and decodes `reference` into buffer[row]; False when the image is unusable."""
        if reference in self._bad:
            return False
        cached = self.cache.get(reference)
        if cached is not None:
            buffer[row] = cached
            with self._lock:
                self.stats.cache_hits += 1
            return True
        try:
            encoded = self.source.read(reference)
        except ValueError:
            return self._mark_bad(reference, "bad_reference")
        if encoded is None:
            return self._mark_bad(reference, "missing")
        started = time.perf_counter()
        try:
            pixels = data.decode_square(encoded, self.decode_size)
        except DECODE_ERRORS:
            return self._mark_bad(reference, "undecodable")
        buffer[row] = pixels
        self.cache.put(reference, pixels)
        with self._lock:
            self.stats.images_read += 1
            self.stats.decode_seconds += time.perf_counter() - started
        return True

    def _mark_bad(self, reference: str, reason: str) -> bool:
        with self._lock:
            if reference not in self._bad:
                self._bad[reference] = reason
                self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
        return False

    # ---- batches -------------------------------------------------------------------------------
    def _submit(self, position: Position, order: torch.Tensor, slot: int) -> _Pending:
        buffer = self._buffers[slot].numpy()
        rows = self.rows(order, position.batch)
        futures = [self._pool.submit(self._load_into, self.references[i], buffer, row) for row, i in enumerate(rows)]
        return _Pending(position, slot, futures)

    def _complete(self, pending: _Pending) -> Batch:
        started = time.perf_counter()
        ok = [future.result() for future in pending.futures]  # re-raises DependencyUnavailable
        waited = time.perf_counter() - started
        buffer = self._buffers[pending.slot]
        good = [row for row, usable in enumerate(ok) if usable]
        holes = [row for row, usable in enumerate(ok) if not usable]
        if holes and not good:
            buffer[0] = torch.from_numpy(self._fallback_image())
            good = [0]
            holes = holes[1:]
        for index, row in enumerate(holes):
            buffer[row] = buffer[good[index % len(good)]]
        pixels = buffer.permute(0, 3, 1, 2)
        return Batch(pixels, pending.position, waited, filled=len(ok) - sum(ok))

    def _fallback_image(self) -> np.ndarray:
        """A usable image for a batch whose images are all unusable: the first one that decodes,
        in reference order (deterministic, so every restart fills the batch the same way)."""
        if self._fallback is None:
            scratch = np.empty((1, self.decode_size, self.decode_size, 3), dtype=np.uint8)
            for reference in self.references:
                if self._load_into(reference, scratch, 0):
                    self._fallback = scratch[0].copy()
                    break
            else:
                raise NoUsableImages(f"none of the {len(self.references)} training images can be read and decoded: {self.stats.skipped}")
        return self._fallback

    def batches(self, start: Position = Position()) -> Iterator[Batch]:
        if self.steps_per_epoch == 0:
            return
        pending: deque[_Pending] = deque()
        orders: dict[int, torch.Tensor] = {}

        def positions() -> Iterator[Position]:
            epoch, batch = start.epoch, start.batch
            while True:
                for index in range(batch, self.steps_per_epoch):
                    yield Position(epoch, index)
                epoch, batch = epoch + 1, 0

        upcoming = positions()
        slot = 0

        def submit_next() -> None:
            nonlocal slot
            position = next(upcoming)
            if position.epoch not in orders:
                orders[position.epoch] = epoch_order(self.num_images, self.seed, position.epoch)
                orders.pop(position.epoch - 2, None)
            pending.append(self._submit(position, orders[position.epoch], slot))
            slot = (slot + 1) % len(self._buffers)

        try:
            for _ in range(self.prefetch_batches):
                submit_next()
            while not self._closed:
                batch = self._complete(pending.popleft())
                submit_next()
                yield batch
        finally:
            # Cancel what has not started and let running reads finish: they write into buffers
            # a later call of batches() would hand out.
            for item in pending:
                for future in item.futures:
                    if not future.cancel():
                        try:
                            future.result()
                        except Exception:  # noqa: BLE001 - the batch is abandoned anyway
                            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "StreamingLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
