"""The benchmark's URL targets: JPEGs of 15-84 KB, photo-like sizes, generated once and cached.

Like the anchor's 6k JPEGs: 360-900 px wide, smooth content plus sensor-like noise (which is what
makes JPEG bytes), quality adjusted until the file lands in 15-84 KB. Deterministic per index, so
every run and machine benchmarks the same bytes.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

MIN_BYTES = 15 * 1024
MAX_BYTES = 84 * 1024
FORMAT_VERSION = "v1"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iex" / "bench-crawler" / FORMAT_VERSION


def render_jpeg(index: int) -> bytes:
    rng = np.random.default_rng([20230301, index])
    width = int(rng.integers(360, 900))
    height = int(min(1024, max(300, width * rng.uniform(0.6, 1.4))))
    low = rng.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(low, "RGB").resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, rng.uniform(1.0, 6.0), size=(height, width, 1)).astype(np.float32)
    pixels = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")
    quality = int(rng.integers(70, 88))
    for _ in range(8):
        buffer = io.BytesIO()
        pixels.save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
        if len(data) > MAX_BYTES and quality > 30:
            quality -= 8
        elif len(data) < MIN_BYTES and quality < 97:
            quality += 4
        else:
            break
    return data


def _write(args: tuple[Path, int]) -> int:
    folder, index = args
    target = folder / f"{index:06d}.jpg"
    if not target.exists():
        data = render_jpeg(index)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target.stat().st_size


def ensure_images(count: int, workers: int = 2, folder: Path | None = None) -> tuple[Path, list[int]]:
    """Writes (or reuses) images 000000.jpg … under the cache folder; returns it and the file sizes."""
    folder = folder or cache_root() / "images"
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        sizes = list(pool.map(_write, [(folder, i) for i in range(count)], chunksize=64))
    return folder, sizes
