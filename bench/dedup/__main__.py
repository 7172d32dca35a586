"""Near-duplicate detection, side by side with imagededup (PyPI) PHash on the same images.

    .venv/bin/python -m bench.dedup [--originals 8000] [--variants 2000] [--rounds 3] [--workers 1]

The image set (services.dedup.synthetic: synthetic photo-like pictures in families of look-alikes, one
variant each for a fifth of them: JPEG q60, 0.5x, 5% crop, recolour, watermark) is generated once
under bench/work/dedup/ (git-ignored) and reused. Both tools then find every pair of images within
their threshold, from the files, with the same number of worker processes:

- reference: imagededup PHash, `encode_images` + `find_duplicates(max_distance_threshold=10)`
  (its documented default threshold and search, brute_force_cython), run by bench/dedup/reference.py
  in its own environment (.venv-bench-dedup, built by bench/envs.py on first use);
- ours: services.dedup.hashing.perceptual_hashes (reduced JPEG decode, pHash + dHash) and the
  services.dedup.nearindex multi-index hash, each image queried then inserted (what the dedup
  service does per image), threshold IEX_NEAR_DUPLICATE_MAX_DISTANCE's default.

Throughput is images / (hashing + lookup) seconds, the median of `--rounds` runs alternating
reference and ours. Precision is over every pair reported (a pair is right when both images are the
same picture: an original and its variant); recall is over the original-variant pairs, also per
variant kind. Also reported, for information: our whole per-image CPU path in the service (full
decode and pixel sha256 for exact identity, then the same hashing and lookup).

Writes bench/results/dedup.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

from services.dedup import synthetic as image_set
from services.dedup.hashing import decode_image, image_hashes, perceptual_hashes
from services.dedup.nearindex import NearIndex
from services.dedup.settings import DedupSettings

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "dedup.json"
REFERENCE_THRESHOLD = 10
OUR_THRESHOLD = DedupSettings.__dataclass_fields__["near_duplicate_max_distance"].default
GOAL_RATIO = 3.0
CHUNK = 100  # imagededup's own imap chunk size, used for both


@dataclass
class Run:
    hash_s: float
    search_s: float
    pairs: set[frozenset[str]] = field(repr=False)
    # CPU seconds of this process and its (finished) worker processes: less sensitive than wall
    # time to the other jobs of a shared machine.
    cpu_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.hash_s + self.search_s


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run_once) -> Run:
    started = cpu_seconds()
    run = run_once()
    run.cpu_s = cpu_seconds() - started
    return run


# ---- the reference ---------------------------------------------------------------------------
# imagededup runs in its own environment (.venv-bench-dedup, bench/envs.py), one process per run;
# it times itself after its imports, so the numbers compare with ours as before.
_reference_version = "unknown"


def run_reference(image_dir: Path, workers: int) -> Run:
    global _reference_version
    from bench import envs

    python = envs.ensure(envs.REFERENCES["dedup"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run(
        [str(python), "-m", "bench.dedup.reference", str(image_dir), "--workers", str(workers), "--threshold", str(REFERENCE_THRESHOLD)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the imagededup run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    _reference_version = result["version"]
    return Run(result["hash_s"], result["search_s"], {frozenset(pair) for pair in result["pairs"]}, cpu_s=result["cpu_s"])


# ---- ours ------------------------------------------------------------------------------------
def _our_hashes(path: str):
    hashes = perceptual_hashes(Path(path).read_bytes())
    return hashes.phash, hashes.dhash, hashes.informative


def _service_path(path: str):
    """What the dedup service computes per image: full decode, pixel sha256 and the perceptual hashes."""
    data = Path(path).read_bytes()
    hashes = image_hashes(data, decode_image(data))
    return hashes.phash, hashes.dhash, hashes.informative


def _lookup_all(names: list[str], hashes: list[tuple[int, int, bool]], threshold: int) -> set[frozenset[str]]:
    index = NearIndex()
    by_row: list[str] = []
    pairs: set[frozenset[str]] = set()
    for name, (phash, dhash, informative) in zip(names, hashes):
        if not informative:
            continue
        rows, _ = index.within(phash, dhash, threshold)
        pairs.update(frozenset((name, by_row[row])) for row in rows.tolist())
        # The index keys rows by pixel sha256; here any unique 32-byte id will do.
        if index.add(hashlib.sha256(name.encode()).hexdigest(), phash, dhash):
            by_row.append(name)
    return pairs


def run_ours(image_dir: Path, names: list[str], workers: int, service_path: bool = False) -> Run:
    paths = [str(image_dir / name) for name in names]
    started = time.perf_counter()
    with Pool(processes=workers) as pool:
        hashes = list(pool.imap(_service_path if service_path else _our_hashes, paths, CHUNK))
    hashed = time.perf_counter()
    pairs = _lookup_all(names, hashes, OUR_THRESHOLD)
    return Run(hashed - started, time.perf_counter() - hashed, pairs)


# ---- scoring ---------------------------------------------------------------------------------
def score(run: Run, items: list[image_set.Item]) -> dict:
    group = {item.name: item.original or item.name for item in items}
    truth = {frozenset((original, variant)): kind for original, variant, kind in image_set.duplicate_pairs(items)}
    right = {pair for pair in run.pairs if len({group[name] for name in pair}) == 1}
    found = {pair for pair in truth if pair in run.pairs}
    by_kind = {}
    for kind in image_set.VARIANT_KINDS:
        of_kind = [pair for pair, k in truth.items() if k == kind]
        by_kind[kind] = round(sum(pair in run.pairs for pair in of_kind) / max(1, len(of_kind)), 4)
    return {
        "pairs_reported": len(run.pairs),
        "false_pairs": len(run.pairs) - len(right),
        "precision": round(len(right) / max(1, len(run.pairs)), 4),
        "recall": round(len(found) / max(1, len(truth)), 4),
        "recall_by_kind": by_kind,
    }


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "python": platform.python_version(), "load_average": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="near-duplicate detection vs imagededup PHash")
    parser.add_argument("--originals", type=int, default=8000)
    parser.add_argument("--variants", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="worker processes for hashing, the same for both tools")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "bench" / "work" / "dedup")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    root = args.data_dir / f"set-{args.originals}-{args.variants}-{args.seed}"
    print(f"image set: {root} ({args.originals} originals + {args.variants} variants)", flush=True)
    items = image_set.load_or_generate(
        root, args.originals, args.variants, args.seed, progress=lambda done, total: print(f"  generated {done}/{total}", end="\r", flush=True) if done % 500 == 0 else None
    )
    image_dir = image_set.images_dir(root)
    names = sorted(item.name for item in items)
    # Warm the page cache, so neither tool pays the disk for the other.
    size = sum(len((image_dir / name).read_bytes()) for name in names)
    print(f"{len(names)} images, {size / 1e6:.0f} MB; {args.rounds} rounds alternating, {args.workers} worker process(es) each", flush=True)
    start_machine = machine()
    from bench import envs

    envs.ensure(envs.REFERENCES["dedup"])  # before anything is timed (once; cached afterwards)

    reference_runs: list[Run] = []
    our_runs: list[Run] = []
    for round_index in range(args.rounds):
        order = ("reference", "ours") if round_index % 2 == 0 else ("ours", "reference")
        for who in order:
            if who == "reference":
                run = run_reference(image_dir, args.workers)  # its CPU time is its own, imports excluded
                reference_runs.append(run)
            else:
                run = timed(lambda: run_ours(image_dir, names, args.workers))
                our_runs.append(run)
            print(
                f"  round {round_index + 1} {who:9s}: hashing {run.hash_s:6.2f}s  lookup {run.search_s:6.2f}s  "
                f"-> {len(names) / run.total_s:7.0f} images/s  ({run.cpu_s:6.1f} CPU s)",
                flush=True,
            )
    service_run = timed(lambda: run_ours(image_dir, names, args.workers, service_path=True))

    def summary(runs: list[Run]) -> dict:
        return {
            "images_per_s": round(statistics.median(len(names) / r.total_s for r in runs), 1),
            "hashing_s": round(statistics.median(r.hash_s for r in runs), 3),
            "lookup_s": round(statistics.median(r.search_s for r in runs), 3),
            "cpu_s": round(statistics.median(r.cpu_s for r in runs), 2),
            "images_per_cpu_s": round(statistics.median(len(names) / r.cpu_s for r in runs), 1),
            "runs_images_per_s": [round(len(names) / r.total_s, 1) for r in runs],
        }

    reference = {**summary(reference_runs), **score(reference_runs[-1], items), "threshold": REFERENCE_THRESHOLD}
    ours = {**summary(our_runs), **score(our_runs[-1], items), "threshold": OUR_THRESHOLD}
    service = {**summary([service_run]), **score(service_run, items), "threshold": OUR_THRESHOLD}
    ratio = round(ours["images_per_s"] / reference["images_per_s"], 2)
    cpu_ratio = round(ours["images_per_cpu_s"] / reference["images_per_cpu_s"], 2)
    hashing_ratio = round(reference["hashing_s"] / ours["hashing_s"], 2)
    lookup_ratio = round(reference["lookup_s"] / ours["lookup_s"], 2)
    passed = ratio >= GOAL_RATIO and ours["precision"] >= reference["precision"] and ours["recall"] >= reference["recall"]

    rows = [
        ("images/s (hashing + lookup)", reference["images_per_s"], ours["images_per_s"]),
        ("hashing s", reference["hashing_s"], ours["hashing_s"]),
        ("lookup s", reference["lookup_s"], ours["lookup_s"]),
        ("images per CPU second", reference["images_per_cpu_s"], ours["images_per_cpu_s"]),
        ("precision", reference["precision"], ours["precision"]),
        ("recall (original-variant pairs)", reference["recall"], ours["recall"]),
        *((f"  recall {kind}", reference["recall_by_kind"][kind], ours["recall_by_kind"][kind]) for kind in image_set.VARIANT_KINDS),
        ("pairs reported / false", f"{reference['pairs_reported']} / {reference['false_pairs']}", f"{ours['pairs_reported']} / {ours['false_pairs']}"),
        ("threshold", f"pHash <= {REFERENCE_THRESHOLD}", f"pHash + dHash <= {OUR_THRESHOLD}"),
    ]
    print()
    print(f"{'':34s} {'imagededup PHash':>22s} {'iex dedup':>22s}")
    for label, a, b in rows:
        print(f"{label:34s} {a!s:>22s} {b!s:>22s}")
    print(f"\nthroughput ratio (ours / imagededup): {ratio}x  (goal >= {GOAL_RATIO}x at equal or better precision and recall): {'PASS' if passed else 'FAIL'}")
    print(f"  by part: hashing {hashing_ratio}x, lookup {lookup_ratio}x; per CPU second: {cpu_ratio}x")
    print(f"for information, the service's whole per-image CPU path (full decode + pixel sha256 + the above): {service['images_per_s']} images/s")

    end_machine = machine()
    load_at_end = end_machine.pop("load_average")
    result = {
        "benchmark": "dedup",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**end_machine, "load_average_at_start": start_machine["load_average"], "load_average_at_end": load_at_end},
        "note": "shared machine: other jobs ran at the same time (see load averages); runs alternate to share the noise",
        "parameters": {
            "originals": args.originals,
            "variants": args.variants,
            "images": len(names),
            "seed": args.seed,
            "rounds": args.rounds,
            "workers": args.workers,
            "generator_version": image_set.GENERATOR_VERSION,
        },
        "reference": {"tool": "imagededup PHash", "version": _imagededup_version(), **reference},
        "ours": {"tool": "services.dedup (perceptual_hashes + NearIndex)", **ours},
        "ours_service_path": {"tool": "services.dedup full decode + pixel sha256 + perceptual_hashes + NearIndex", **service},
        "ratio": ratio,
        "hashing_ratio": hashing_ratio,
        "lookup_ratio": lookup_ratio,
        "cpu_ratio": cpu_ratio,
        "service_path_ratio": round(service["images_per_s"] / reference["images_per_s"], 2),
        "goal": f">= {GOAL_RATIO}x imagededup's images/s at equal or better precision and recall",
        "passed": passed,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


def _imagededup_version() -> str:
    return _reference_version


if __name__ == "__main__":
    sys.exit(main())
