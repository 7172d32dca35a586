"""The streaming loader: deterministic orders, rank shards, resume positions, bad images, bounded
prefetch, the decoded-pixel cache, and store failures."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import DependencyUnavailable
from services.trainer.loader import DirectorySource, NoUsableImages, Position, StreamingLoader, TensorLoader, epoch_order

SIZE = 8


def solid_png(index: int) -> bytes:
    """A solid image whose red channel is its index (decoding keeps a solid colour exact)."""
    pixels = np.zeros((12, 10, 3), dtype=np.uint8)
    pixels[..., 0] = index
    pixels[..., 1] = 200
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class MemorySource:
    """Encoded images by reference; counts reads and the most reads in flight at once."""

    def __init__(self, images: dict[str, bytes], delay_s: float = 0.0) -> None:
        self.images = images
        self.delay_s = delay_s
        self.reads: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.down = False
        self._lock = threading.Lock()

    def read(self, reference: str) -> bytes | None:
        with self._lock:
            self.reads.append(reference)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.down:
                raise DependencyUnavailable("s3 down")
            if self.delay_s:
                time.sleep(self.delay_s)
            return self.images.get(reference)
        finally:
            with self._lock:
                self.in_flight -= 1


def references(n: int) -> list[str]:
    return [f"img/{i}" for i in range(n)]


def source_of(n: int, **kwargs) -> MemorySource:
    return MemorySource({f"img/{i}": solid_png(i) for i in range(n)}, **kwargs)


def indices(pixels: torch.Tensor) -> list[int]:
    """The image index every row shows (red channel of its corner)."""
    return [int(v) for v in pixels[:, 0, 0, 0]]


def take(loader, count: int, start: Position = Position()) -> list[tuple[Position, list[int], int]]:
    out = []
    stream = loader.batches(start)
    for _ in range(count):
        batch = next(stream)
        out.append((batch.position, indices(batch.pixels), batch.filled))
    stream.close()
    return out


def test_epoch_orders_are_pure_functions_of_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


def test_batches_follow_the_epoch_order_and_span_epochs():
    loader = StreamingLoader(source_of(10), references(10), SIZE, global_batch=4, seed=5, workers=2)
    with loader:
        got = take(loader, 5)
    assert loader.steps_per_epoch == 2  # 10 // 4: the remainder of each epoch is dropped
    assert [p for p, _, _ in got] == [Position(0, 0), Position(0, 1), Position(1, 0), Position(1, 1), Position(2, 0)]
    for position, rows, filled in got:
        order = epoch_order(10, 5, position.epoch).tolist()
        assert rows == order[position.batch * 4 : position.batch * 4 + 4] and filled == 0
    assert len(set(got[0][1])) == 4


def test_ranks_take_disjoint_rows_that_make_up_the_single_process_batch():
    single = StreamingLoader(source_of(12), references(12), SIZE, global_batch=6, seed=1, workers=2)
    ranks = [StreamingLoader(source_of(12), references(12), SIZE, global_batch=6, seed=1, rank=r, world_size=2, workers=2) for r in range(2)]
    with single, ranks[0], ranks[1]:
        whole = take(single, 4)
        parts = [take(loader, 4) for loader in ranks]
    for step in range(4):
        assert parts[0][step][1] + parts[1][step][1] == whole[step][1]
        assert not set(parts[0][step][1]) & set(parts[1][step][1])
    assert ranks[1].offset == 3 and ranks[1].local_batch == 3
    with pytest.raises(ValueError, match="does not split"):
        StreamingLoader(source_of(4), references(4), SIZE, global_batch=5, seed=1, rank=0, world_size=2)


def test_a_loader_started_at_a_position_continues_the_uninterrupted_stream():
    with StreamingLoader(source_of(9), references(9), SIZE, global_batch=3, seed=2, workers=2) as loader:
        uninterrupted = take(loader, 7)
    with StreamingLoader(source_of(9), references(9), SIZE, global_batch=3, seed=2, workers=2) as loader:
        resumed = take(loader, 3, start=Position(1, 1))
    assert resumed == uninterrupted[4:7]


def test_tensor_and_streaming_loaders_agree():
    source = source_of(8)
    decoded = torch.stack([torch.full((3, SIZE, SIZE), 0, dtype=torch.uint8) for _ in range(8)])
    decoded[:, 0] = torch.arange(8, dtype=torch.uint8).view(8, 1, 1)
    with StreamingLoader(source, references(8), SIZE, global_batch=4, seed=9, workers=2) as streaming:
        assert [rows for _, rows, _ in take(streaming, 3)] == [rows for _, rows, _ in take(TensorLoader(decoded, 4, seed=9), 3)]


def test_unusable_images_are_skipped_once_and_their_slots_filled_from_the_same_batch():
    source = source_of(8)
    del source.images["img/2"]  # missing
    source.images["img/5"] = b"not an image"  # undecodable
    # One batch ahead: a bad image is known as bad before any later batch is read (with more
    # prefetch, batches already in flight may read it once more, but count it once).
    with StreamingLoader(source, references(8), SIZE, global_batch=4, seed=0, workers=2, prefetch_batches=1) as loader:
        got = take(loader, 6)  # three epochs
        assert loader.stats.skipped == {"missing": 1, "undecodable": 1}
    assert source.reads.count("img/2") == 1 and source.reads.count("img/5") == 1
    for position, rows, filled in got:
        order = epoch_order(8, 0, position.epoch).tolist()
        wanted = order[position.batch * 4 : position.batch * 4 + 4]
        good = [i for i in wanted if i not in (2, 5)]
        assert filled == 4 - len(good)
        assert set(rows) == set(good) and len(rows) == 4  # holes hold repeats of the batch's images


def test_a_batch_without_one_usable_image_borrows_the_first_usable_image():
    source = source_of(6)
    for i in (0, 1, 2):
        source.images[f"img/{i}"] = b"broken"
    with StreamingLoader(source, references(6), SIZE, global_batch=3, seed=0, workers=1) as loader:
        for _, rows, _ in take(loader, 4):
            assert all(i in (3, 4, 5) for i in rows)
    empty = MemorySource({})
    with StreamingLoader(empty, references(4), SIZE, global_batch=2, seed=0, workers=1) as loader:
        with pytest.raises(NoUsableImages):
            take(loader, 1)


def test_prefetch_is_bounded():
    source = source_of(40, delay_s=0.002)
    with StreamingLoader(source, references(40), SIZE, global_batch=4, seed=0, workers=3, prefetch_batches=2) as loader:
        stream = loader.batches()
        next(stream)
        time.sleep(0.2)  # the workers have all the time they want to run ahead
        assert len(source.reads) <= (1 + 2) * 4
        assert source.max_in_flight <= 3
        stream.close()


def test_the_cache_spares_later_epochs_the_reads():
    cached_source, plain_source = source_of(8), source_of(8)
    with StreamingLoader(cached_source, references(8), SIZE, global_batch=4, seed=0, workers=2, prefetch_batches=1, cache_bytes=10**6) as cached:
        cached_rows = take(cached, 6)
        assert cached.stats.cache_hits > 0
    with StreamingLoader(plain_source, references(8), SIZE, global_batch=4, seed=0, workers=2, prefetch_batches=1) as plain:
        assert take(plain, 6) == cached_rows
        assert plain.stats.cache_hits == 0
    assert len(set(cached_source.reads)) == len(cached_source.reads) == 8  # each image read once
    assert len(plain_source.reads) > 8


def test_a_store_outage_stops_the_stream_and_waiting_is_measured():
    source = source_of(8, delay_s=0.05)
    with StreamingLoader(source, references(8), SIZE, global_batch=4, seed=0, workers=1, prefetch_batches=1) as loader:
        stream = loader.batches()
        assert next(stream).wait_seconds > 0.05  # four 50 ms reads on one worker
        source.down = True
        with pytest.raises(DependencyUnavailable):
            for _ in range(3):
                next(stream)


def test_directory_source_reads_files_and_refuses_paths_outside(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(solid_png(7))
    source = DirectorySource(tmp_path)
    assert source.read("a/x.png") == solid_png(7)
    assert source.read("a/missing.png") is None
    with pytest.raises(ValueError):
        source.read("../etc/passwd")
