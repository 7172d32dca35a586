"""One benchmark run of our downloader, as its own process: `python -m bench.crawler.ours URLS_FILE [options]`.

The production ImageDownloader with production checks (address policy, robots.txt, X-Robots-Tag,
content type, magic bytes, bomb guard, size policy, sha256), resizing to a longest side of 256 and
re-encoding JPEG. Results are streamed and dropped once counted (like img2dataset's dummy writer),
so memory reflects the downloader, not the result list. With --processes N the list is split over
N spawned processes, each with its own downloader: what N crawler replicas on one machine do.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections import Counter

from services.crawler.fetch import FetchPolicy, ImageDownloader, new_event_loop
from services.crawler.images import ImagePolicy


async def run(urls: list[str], policy: FetchPolicy, window: int) -> tuple[Counter, int, float]:
    statuses: Counter = Counter()
    staged_bytes = 0
    async with ImageDownloader(policy) as downloader:
        started = time.perf_counter()
        async for result in downloader.fetch_stream(urls, window=window):
            statuses[result.status] += 1
            staged_bytes += result.size_bytes
        elapsed = time.perf_counter() - started
    return statuses, staged_bytes, elapsed


def run_shard(urls: list[str], settings: dict) -> tuple[dict, int, float]:
    policy = FetchPolicy(
        concurrency=settings["concurrency"],
        per_host=settings["concurrency"],  # one local host serves everything
        allow_networks=("127.0.0.0/8",),
        decode_workers=settings["decode_workers"],
        decode_processes=settings["decode_processes"],
        image=ImagePolicy(max_side=settings["max_side"], jpeg_quality=settings["jpeg_quality"]),
    )
    # The event loop the crawler service runs (uvloop when installed), unless told otherwise.
    loop_factory = asyncio.new_event_loop if settings["asyncio_loop"] else new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        statuses, staged_bytes, elapsed = runner.run(run(urls, policy, window=2 * settings["concurrency"]))
    return dict(statuses), staged_bytes, elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls_file")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--decode-processes", action="store_true")
    parser.add_argument("--processes", type=int, default=1, help="downloader processes sharing the list (replicas)")
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--asyncio-loop", action="store_true", help="asyncio's own event loop even when uvloop is installed")
    args = parser.parse_args()
    with open(args.urls_file) as source:
        urls = [line.strip() for line in source if line.strip()]
    settings = {
        "concurrency": args.concurrency,
        "decode_workers": args.decode_workers,
        "decode_processes": args.decode_processes,
        "max_side": args.max_side,
        "jpeg_quality": args.jpeg_quality,
        "asyncio_loop": args.asyncio_loop,
    }
    started = time.perf_counter()
    if args.processes == 1:
        shards = [run_shard(urls, settings)]
    else:
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            shards = pool.starmap(run_shard, [(urls[i :: args.processes], settings) for i in range(args.processes)])
    statuses: Counter = Counter()
    for shard_statuses, _bytes, _elapsed in shards:
        statuses.update(shard_statuses)
    # One process: the downloader's own clock. Several: from before the pool started until the last
    # shard finished, process start-up included (as img2dataset's figure includes its pool's).
    elapsed = shards[0][2] if args.processes == 1 else time.perf_counter() - started
    loop = "asyncio" if args.asyncio_loop else type(new_event_loop()).__module__.split(".")[0]
    print(
        json.dumps(
            {
                "ok": statuses.get("ok", 0),
                "statuses": dict(statuses),
                "seconds": elapsed,
                "staged_bytes": sum(s[1] for s in shards),
                "event_loop": loop,
                "processes": args.processes,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
