"""One run of imagededup PHash (the reference of bench/dedup), as its own process in .venv-bench-dedup:

    python -m bench.dedup.reference IMAGE_DIR [--workers N] [--threshold 10]

`encode_images` then `find_duplicates(max_distance_threshold=...)` (its documented default search).
imagededup is imported before anything is timed. Prints one JSON object: hashing and search
seconds, CPU seconds of this process and its workers over the timed part, imagededup's version and
every pair found. Imports only the standard library and imagededup (never the stack's code).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
import warnings


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dedup.reference")
    parser.add_argument("image_dir")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threshold", type=int, default=10)
    args = parser.parse_args(argv)

    from importlib.metadata import version

    from imagededup.methods import PHash

    # Its modules log every step at INFO through their own handlers.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("imagededup"):
            logging.getLogger(name).setLevel(logging.WARNING)
    phasher = PHash(verbose=False)
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    encodings = phasher.encode_images(image_dir=args.image_dir, num_enc_workers=args.workers)
    hashed = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        duplicates = phasher.find_duplicates(encoding_map=encodings, max_distance_threshold=args.threshold, num_dist_workers=args.workers)
    searched = time.perf_counter()
    cpu = cpu_seconds() - cpu_started
    pairs = sorted({tuple(sorted((a, b))) for a, found in duplicates.items() for b in found})
    json.dump(
        {"version": version("imagededup"), "hash_s": hashed - started, "search_s": searched - hashed, "cpu_s": cpu, "images": len(encodings), "pairs": pairs},
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
