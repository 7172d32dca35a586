"""One benchmark run of img2dataset (the reference), as its own process: `python -m bench.crawler.reference URLS_FILE OUT_DIR`.

The anchor's configuration: 2 processes x 64 threads, resize so the longest side is 256 keeping the
ratio (`keep_ratio_largest`), never upscaling (as our crawler), JPEG re-encoded at the same quality,
sha256 computed as we do, and the dummy writer so neither side pays for writing files. Prints one
JSON line with the successes read from img2dataset's own stats files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

# Albumentations (imported by img2dataset) otherwise asks PyPI for a newer version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls_file")
    parser.add_argument("out_dir")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    args = parser.parse_args()

    from img2dataset import download

    started = time.perf_counter()
    download(
        url_list=args.urls_file,
        input_format="txt",
        output_folder=args.out_dir,
        output_format="dummy",
        processes_count=args.processes,
        thread_count=args.threads,
        image_size=args.max_side,
        resize_mode="keep_ratio_largest",
        resize_only_if_bigger=True,
        encode_quality=args.jpeg_quality,
        encode_format="jpg",
        compute_hash="sha256",
        timeout=15,
        retries=0,
        number_sample_per_shard=1000,
        enable_wandb=False,
        distributor="multiprocessing",
    )
    elapsed = time.perf_counter() - started
    successes = failures = 0
    for stats_file in glob.glob(os.path.join(args.out_dir, "*_stats.json")):
        with open(stats_file) as source:
            stats = json.load(source)
        successes += int(stats.get("successes", 0))
        failures += int(stats.get("failed_to_download", 0)) + int(stats.get("failed_to_resize", 0))
    print(json.dumps({"ok": successes, "statuses": {"ok": successes, "failed": failures}, "seconds": elapsed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
