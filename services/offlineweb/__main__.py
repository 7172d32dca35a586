"""python -m services.offlineweb: build the offline web and its targets, list branches, upload a target.

    python -m services.offlineweb build [--out DIR] [--sources google,twitter,...] [--workers N] [--force]
    python -m services.offlineweb list-branches [--data-dir DIR] [--json]
    python -m services.offlineweb target food/fruit [--data-dir DIR] [--out DIR] [--eval-fraction 0.5]
    python -m services.offlineweb upload-target food/fruit --to s3://iex/targets/food-fruit
    python -m services.offlineweb relevant food/fruit n07739125 [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from services.offlineweb import targets as target_sets
from services.offlineweb.build import BRANCHES_FILE, BuildOptions, build, default_data_dir, default_workers
from services.offlineweb.render import MAX_SIDE


def _progress(started: float):
    def report(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def _catalog():
    """The photo catalog straight from the cached packages (fetched when missing)."""
    from services.offlineweb import sources, tuxpaint
    from services.offlineweb.build import WORDNET_SUBDIR
    from services.offlineweb.synsets import SynsetMapper

    fetched = sources.fetch_all(["tuxpaint", "wordnet"])
    mapper = SynsetMapper.load(fetched["wordnet"].root / WORDNET_SUBDIR)
    stamps = list(tuxpaint.scan(fetched["tuxpaint"].root))
    stamps_root = tuxpaint.stamps_root(fetched["tuxpaint"].root)
    provenance = {"package": fetched["tuxpaint"].source.package, "version": fetched["tuxpaint"].version}
    return target_sets.Catalog.from_stamps(stamps, stamps_root, mapper), stamps_root, provenance


def cmd_build(args) -> int:
    options = BuildOptions(
        out=Path(args.out).expanduser() if args.out else default_data_dir(),
        sources=tuple(s for s in (args.sources or "").split(",") if s.strip()),
        max_side=args.max_side,
        workers=args.workers,
        targets=not args.no_targets,
        eval_fraction=args.eval_fraction,
        split_seed=args.split_seed,
        label_by=args.label_by,
        force=args.force,
    )
    manifest = build(options, _progress(time.monotonic()))
    corpus = manifest["corpus"]
    print(json.dumps({"data_dir": str(options.out), "images": corpus["images"], "with_synset_pct": corpus["with_synset_pct"], "targets": manifest["targets"].get("branches", 0)}))
    return 0


def cmd_list_branches(args) -> int:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    index = data_dir / target_sets.TARGETS_DIR / BRANCHES_FILE
    if index.is_file():
        branches = json.loads(index.read_text())
    else:
        catalog, _, _ = _catalog()
        branches = {}
        for branch, photos in catalog.branches().items():
            roots = catalog.roots(branch)
            branches[branch] = {"photos": photos, "roots": [f"{r.wnid} {r.lemma}" for r in roots], "subtree_size": len(catalog.relevant_synsets(roots))}
    branches = {b: v for b, v in branches.items() if v["photos"] >= args.min_photos}
    if args.json:
        print(json.dumps(branches, indent=1, sort_keys=True))
        return 0
    print(f"{'branch':36s} {'photos':>6s} {'train':>5s} {'eval':>5s} {'labels':>6s} {'measurable':>10s} {'subtree':>7s} {'relevant':>8s}  roots")
    for branch, entry in branches.items():
        roots = ", ".join(r.split(" ", 1)[1] for r in entry["roots"]) or "-"
        measurable = {True: "yes", False: "no"}.get(entry.get("measurable"), "")
        print(
            f"{branch:36s} {entry['photos']:6d} {entry.get('train', ''):>5} {entry.get('eval', ''):>5} {entry.get('labels', ''):>6} {measurable:>10} "
            f"{entry['subtree_size']:7d} {entry.get('relevant_web_images', ''):>8}  {roots}"
        )
    return 0


def cmd_target(args) -> int:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    branch = target_sets.validate_branch(args.branch)
    out = Path(args.out).expanduser() if args.out else target_sets.target_dir(data_dir, branch)
    catalog, stamps_root, provenance = _catalog()
    summary = target_sets.write_target(
        catalog, branch, out, target_sets.photo_image(stamps_root, args.max_side), args.eval_fraction, args.split_seed, args.label_by, provenance
    )
    brief = {k: v for k, v in summary.items() if k not in ("relevant_synsets", "images")}
    print(json.dumps({"target": str(out), **brief}, indent=1, sort_keys=True))
    return 0


def cmd_upload_target(args) -> int:
    from services.offlineweb.upload import upload_target

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    branch = target_sets.validate_branch(args.branch)
    directory = target_sets.target_dir(data_dir, branch)
    if not (directory / target_sets.TARGET_FILE).is_file():
        catalog, stamps_root, provenance = _catalog()
        target_sets.write_target(catalog, branch, directory, target_sets.photo_image(stamps_root), provenance=provenance)
    uri, count = upload_target(directory, args.to)
    print(json.dumps({"target_uri": uri, "objects": count, "branch": branch}))
    return 0


def cmd_relevant(args) -> int:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    target = target_sets.Target.load(target_sets.target_dir(data_dir, args.branch))
    answer = target_sets.relevant(args.synset, target)
    print(json.dumps({"branch": target.branch, "synset": args.synset, "relevant": answer}))
    return 0 if answer else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.offlineweb", description="Offline web corpus and Tux Paint targets, built from npm and Debian packages.")
    commands = parser.add_subparsers(dest="command", required=True)

    def split_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--eval-fraction", type=float, default=target_sets.DEFAULT_EVAL_FRACTION, help="share of photos held out as the labelled eval split")
        p.add_argument("--split-seed", default=target_sets.DEFAULT_SPLIT_SEED, help="seed of the hash-based split")
        p.add_argument("--label-by", choices=target_sets.LABEL_MODES, default="auto", help="labels (both splits): the folder below the branch, merged upwards until each class has 3 photos in each split (auto = folder), or the photo concept")
        p.add_argument("--max-side", type=int, default=MAX_SIDE, help="longest image side in pixels")

    b = commands.add_parser("build", help="fetch the packages and build corpus, images, targets and manifest")
    b.add_argument("--out", help="data directory (default: $IEX_DATA_DIR or ~/.cache/iex/offline-web)")
    b.add_argument("--sources", help="comma-separated subset of: google,twitter,openmoji,fluent3d,noto,openclipart,tuxpaint (default: all)")
    b.add_argument("--workers", type=int, default=default_workers(), help="render processes (default: every core)")
    b.add_argument("--no-targets", action="store_true", help="build the corpus only")
    b.add_argument("--force", action="store_true", help="rebuild even when the inputs match the manifest")
    split_options(b)
    b.set_defaults(func=cmd_build)

    lb = commands.add_parser("list-branches", help="Tux Paint branches with photo counts and WordNet roots")
    lb.add_argument("--data-dir")
    lb.add_argument("--json", action="store_true")
    lb.add_argument("--min-photos", type=int, default=1)
    lb.set_defaults(func=cmd_list_branches)

    t = commands.add_parser("target", help="write one branch's target (train/, eval/<label>/, target.json, train_labels.json)")
    t.add_argument("branch", help="a Tux Paint folder path, e.g. food/fruit or animals/birds")
    t.add_argument("--data-dir")
    t.add_argument("--out", help="target directory (default: <data dir>/targets/<branch>)")
    split_options(t)
    t.set_defaults(func=cmd_target)

    u = commands.add_parser("upload-target", help="upload a branch's target to S3 (settings from IEX_S3_*)")
    u.add_argument("branch")
    u.add_argument("--to", required=True, help="s3://bucket/prefix")
    u.add_argument("--data-dir")
    u.set_defaults(func=cmd_upload_target)

    r = commands.add_parser("relevant", help="is a synset relevant to a built target? (exit 0 yes, 1 no)")
    r.add_argument("branch")
    r.add_argument("synset", help="a WordNet noun id such as n07739125")
    r.add_argument("--data-dir")
    r.set_defaults(func=cmd_relevant)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, target_sets.UnknownBranch, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, target_sets.UnknownBranch) else str(exc)
        if isinstance(exc, target_sets.UnknownBranch):
            message = f"branch: no photos under {message!r} (see list-branches)"
        print(f"offlineweb: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
