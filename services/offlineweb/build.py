"""Builds the offline web: fetch the packages, caption and map every image, render, write the corpus,
the targets and a manifest.

Output (the data directory, default $IEX_DATA_DIR or ~/.cache/iex/offline-web):
  corpus.jsonl            one record per web image (services/search/corpus.py format)
  images/<source>/*.png   RGB PNGs, longer side <= 256 px, transparency on white
  targets/<branch>/...    train/*.png, eval/<label>/*.png, target.json for every Tux Paint branch
  targets/branches.json   every branch with its photo counts and WordNet roots
  manifest.json           inputs (packages, versions, checksums), parameters, counts, licences,
                          checksums of the outputs: the same inputs give the same bytes, this file included
  build-stats.json        what varies between runs: timings, download sizes, worker count

A build whose inputs (package checksums, parameters, builder version) match the manifest already
there is skipped; `--force` rebuilds. Only changed image files are rewritten.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from services.common import settings as settings_mod
from services.offlineweb import clipart, emoji, render, sources, tuxpaint
from services.offlineweb import targets as target_sets
from services.offlineweb.captions import compose
from services.offlineweb.items import RenderTask, WebItem, make_id
from services.offlineweb.synsets import SynsetMapper
from services.search.corpus import CorpusRecord, write_corpus

# Bump when the same inputs would give different output (captions, mapping rules, rendering).
BUILDER_VERSION = "1"
# Bump when rendering changes: it invalidates the rendered images kept between builds.
RENDER_VERSION = "2"
MANIFEST_FILE = "manifest.json"
RENDER_INDEX_FILE = ".render-index.json"  # item id -> (render key, png sha256): reuse between builds
STATS_FILE = "build-stats.json"
IMAGES_DIR = "images"
BRANCHES_FILE = "branches.json"
WORDNET_SUBDIR = Path("usr/share/wordnet")
TUXPAINT_DRAWING_SUFFIX = "Tux Paint stamp, drawing"


@dataclass(frozen=True)
class OfflineWebSettings(settings_mod.ServiceSettings):
    data_dir: str = settings_mod.setting("", help="directory of the built offline web (corpus, images, targets); empty: ~/.cache/iex/offline-web")


def default_data_dir(environ: dict | None = None) -> Path:
    configured = settings_mod.load(OfflineWebSettings, environ).data_dir
    if configured:
        return Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "iex" / "offline-web"


def default_workers() -> int:
    """Every core this process may use: rendering is the one-off work of a fresh machine (13,841
    images: ~316 s on one core, about half that on two; docs/offline-web.md), and the output is the
    same bytes whatever the count (tests/unit/test_offlineweb.py)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    sources: tuple[str, ...] = ()  # empty: every source
    max_side: int = render.MAX_SIDE
    workers: int = field(default_factory=default_workers)
    targets: bool = True
    eval_fraction: float = target_sets.DEFAULT_EVAL_FRACTION
    split_seed: str = target_sets.DEFAULT_SPLIT_SEED
    label_by: str = "auto"
    force: bool = False

    def parameters(self) -> dict:
        """What shapes the output (the worker count does not)."""
        return {
            "max_side": self.max_side,
            "background": "white",
            "format": "png-rgb",
            "targets": self.targets,
            "eval_fraction": self.eval_fraction,
            "split_seed": self.split_seed,
            "label_by": self.label_by,
        }


def _render_one(job: tuple[int, RenderTask, int]) -> tuple[int, bytes | None, str]:
    index, task, max_side = job
    try:
        return index, task.run(max_side), ""
    except render.RenderError as exc:
        return index, None, exc.code


def render_all(items: Sequence[WebItem], max_side: int, workers: int, progress: Callable[[str], None] | None = None) -> list[tuple[bytes | None, str]]:
    """(png bytes or None, failure code) per item, in item order, whatever the worker count."""
    jobs = [(i, item.task, max_side) for i, item in enumerate(items)]
    results: list[tuple[bytes | None, str]] = [(None, "not-rendered")] * len(items)
    step = max(1, len(jobs) // 10)
    if workers <= 1:
        outputs: Iterable = map(_render_one, jobs)
        pool = None
    else:
        # fork: the workers inherit the loaded modules; nothing here holds threads or sockets.
        pool = multiprocessing.get_context("fork").Pool(workers)
        outputs = pool.imap_unordered(_render_one, jobs, chunksize=16)
    try:
        for done, (index, data, code) in enumerate(outputs, start=1):
            results[index] = (data, code)
            if progress and done % step == 0:
                progress(f"rendered {done}/{len(jobs)}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return results


def render_keys(items: Sequence[WebItem], max_side: int) -> dict[str, str]:
    """item id -> a digest of everything its PNG depends on: the source file's bytes, the glyph, the
    size, the rendering code and library versions."""
    software = software_versions()
    file_digests: dict[str, str] = {}
    keys = {}
    for item in items:
        task = item.task
        if task.path not in file_digests:
            file_digests[task.path] = hashlib.sha256(Path(task.path).read_bytes()).hexdigest() if Path(task.path).is_file() else ""
        keys[item.id] = _digest([RENDER_VERSION, software, max_side, task.kind, file_digests[task.path], task.text])
    return keys


def reuse_rendered(out: Path, items: Sequence[WebItem], keys: dict[str, str]) -> dict[str, bytes]:
    """PNG bytes of the items whose render key matches the last build's and whose file is intact."""
    path = out / RENDER_INDEX_FILE
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        return {}
    reused = {}
    for item in items:
        entry = previous.get(item.id)
        image = out / item.file
        if not entry or entry[0] != keys[item.id] or not image.is_file():
            continue
        data = image.read_bytes()
        if hashlib.sha256(data).hexdigest() == entry[1]:
            reused[item.id] = data
    return reused


def tuxpaint_drawing_items(stamps: Iterable[tuxpaint.Stamp], package_root: Path, mapper: SynsetMapper) -> list[WebItem]:
    """Tux Paint's drawings (never its photos: those are the targets) as distractors of the web."""
    root = tuxpaint.stamps_root(package_root)
    out = []
    for stamp in stamps:
        if stamp.kind != "drawing":
            continue
        match = mapper.map_texts([stamp.caption, stamp.name_text], mapper.context_roots(stamp.folder_words))
        kind = "svg" if stamp.path.lower().endswith(".svg") else "raster"
        out.append(
            WebItem(
                id=make_id("tuxpaint", stamp.path.rsplit(".", 1)[0]),
                source="tuxpaint",
                caption=compose(stamp.text(), [stamp.name_text], stamp.folder_words, TUXPAINT_DRAWING_SUFFIX),
                synset=match.wnid if match else "",
                concept=match.lemma if match else stamp.name_text,
                license=sources.BY_NAME["tuxpaint"].license,
                task=RenderTask(kind, str(root / stamp.path)),
            )
        )
    return out


def collect_items(fetched: dict[str, sources.Fetched], mapper: SynsetMapper, stamps: list[tuxpaint.Stamp]) -> list[WebItem]:
    items: list[WebItem] = []
    styles = [s for s in sources.EMOJI_STYLES if s in fetched]
    if styles:
        names_from = next((s for s in ("google", "twitter") if s in fetched), None)
        if names_from is None:
            raise ValueError("sources: emoji styles need emoji-datasource for their names: add google or twitter")
        concepts = emoji.load_concepts(fetched[names_from].root / "emoji.json")
        tags = emoji.openmoji_tags(fetched["openmoji"].root / "data" / "openmoji.json") if "openmoji" in fetched else {}
        items.extend(emoji.items(concepts, {s: fetched[s].root for s in styles}, mapper, tags))
    if "openclipart" in fetched:
        items.extend(clipart.items(fetched["openclipart"].root, mapper))
    if "tuxpaint" in fetched:
        items.extend(tuxpaint_drawing_items(stamps, fetched["tuxpaint"].root, mapper))
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise AssertionError(f"duplicate corpus id {item.id}")
        seen.add(item.id)
    return items


def code_digest() -> str:
    """Digest of this package's source: a change of caption, mapping or split rules is a changed
    input even when nobody remembered to bump BUILDER_VERSION."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _inputs(fetched: dict[str, sources.Fetched], options: BuildOptions) -> dict:
    return {
        "builder_version": BUILDER_VERSION,
        "code": code_digest(),
        "parameters": options.parameters(),
        "sources": {name: {"package": f.source.package, "version": f.version, "archive_sha256": f.archive_sha256} for name, f in sorted(fetched.items())},
        "software": software_versions(),
    }


def software_versions() -> dict:
    """Libraries whose versions change output bytes (PNG encoding, SVG rasterisation, glyphs)."""
    import zlib

    import PIL

    versions = {"pillow": PIL.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION}
    try:
        import cairocffi
        import cairosvg

        versions["cairosvg"] = cairosvg.__version__
        versions["cairo"] = cairocffi.cairo_version_string()
    except (ImportError, OSError):
        versions["cairosvg"] = "unavailable"
    from PIL import features

    versions["freetype"] = features.version("freetype2") or ""
    versions["raqm"] = features.version("raqm") or ""
    versions["fonts"] = fonts_fingerprint()
    return versions


def fonts_fingerprint() -> str:
    """A digest of the fonts fontconfig offers: SVGs with text (road signs, dials) are drawn with
    whatever font matches their font-family, so installing a font can change those images."""
    try:
        listed = subprocess.run(["fc-list", "--format", "%{file}\\n"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return hashlib.sha256("\n".join(sorted(set(listed.splitlines()))).encode()).hexdigest()[:16]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the render workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def _remove_stale(images_dir: Path, keep: set[Path]) -> int:
    removed = 0
    if not images_dir.is_dir():
        return 0
    for path in sorted(images_dir.rglob("*")):
        if path.is_file() and path not in keep:
            path.unlink()
            removed += 1
    for directory in sorted((p for p in images_dir.rglob("*") if p.is_dir()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    return removed


def load_manifest(out: Path) -> dict | None:
    path = out / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def build(options: BuildOptions, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Builds (or finds up to date) the offline web in options.out; returns the manifest."""
    started = time.monotonic()
    cpu_started = _cpu_seconds()
    timings: dict[str, float] = {}
    names = sources.select(options.sources)
    fetched = sources.fetch_all(names, progress)
    timings["fetch_s"] = time.monotonic() - started
    inputs = _inputs(fetched, options)
    inputs_digest = _digest(inputs)
    out = options.out
    previous = load_manifest(out)
    if not options.force and previous and previous.get("inputs_digest") == inputs_digest and (out / "corpus.jsonl").is_file():
        progress(f"up to date: {out} (inputs unchanged; --force rebuilds)")
        return previous
    out.mkdir(parents=True, exist_ok=True)

    step = time.monotonic()
    mapper = SynsetMapper.load(fetched["wordnet"].root / WORDNET_SUBDIR)
    stamps = list(tuxpaint.scan(fetched["tuxpaint"].root)) if "tuxpaint" in fetched else []
    items = collect_items(fetched, mapper, stamps)
    timings["caption_and_map_s"] = time.monotonic() - step
    progress(f"{len(items)} web images to render with {options.workers} worker(s)")

    step = time.monotonic()
    keys = render_keys(items, options.max_side)
    reused = reuse_rendered(out, items, keys)
    todo = [i for i, item in enumerate(items) if item.id not in reused]
    progress(f"{len(items) - len(todo)} images unchanged since the last build, {len(todo)} to render")
    fresh = render_all([items[i] for i in todo], options.max_side, options.workers, progress)
    rendered: list[tuple[bytes | None, str]] = [(reused[item.id], "") if item.id in reused else (None, "") for item in items]
    for i, result in zip(todo, fresh):
        rendered[i] = result
    timings["render_s"] = time.monotonic() - step

    step = time.monotonic()
    records: list[CorpusRecord] = []
    kept_paths: set[Path] = set()
    failures: dict[str, Counter] = defaultdict(Counter)
    written = 0
    image_bytes: Counter = Counter()
    for item, (data, code) in zip(items, rendered):
        if data is None:
            failures[item.source][code] += 1
            continue
        path = out / item.file
        written += _write_if_changed(path, data)
        kept_paths.add(path)
        image_bytes[item.source] += len(data)
        records.append(
            CorpusRecord(
                id=item.id,
                file=item.file,
                caption=item.caption,
                synset=item.synset,
                concept=item.concept,
                license=item.license,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    removed = _remove_stale(out / IMAGES_DIR, kept_paths)
    corpus_path = write_corpus(out, records)
    index = {r.id: [keys[r.id], r.sha256] for r in records}
    _write_json(out / RENDER_INDEX_FILE, index)
    timings["write_s"] = time.monotonic() - step

    step = time.monotonic()
    target_summary = build_targets(out, fetched, stamps, mapper, options, records) if options.targets and "tuxpaint" in fetched else {}
    timings["targets_s"] = time.monotonic() - step

    manifest = {
        "format": 1,
        "inputs": inputs,
        "inputs_digest": inputs_digest,
        "licenses": {name: f.source.license for name, f in sorted(fetched.items())},
        "sources": {
            name: {
                "package": f.source.package,
                "kind": f.source.kind,
                "version": f.version,
                "archive": f.archive,
                "archive_bytes": f.archive_bytes,
                "archive_sha256": f.archive_sha256,
                "license": f.source.license,
                "role": f.source.role,
                "description": f.source.description,
            }
            for name, f in sorted(fetched.items())
        },
        "corpus": corpus_counts(items, rendered, records, failures, image_bytes),
        "corpus_sha256": hashlib.sha256(corpus_path.read_bytes()).hexdigest(),
        "targets": target_summary,
    }
    _write_json(out / MANIFEST_FILE, manifest)
    download = sum(f.archive_bytes for f in fetched.values())
    stats = {
        "builder_version": BUILDER_VERSION,
        "seconds": {k: round(v, 2) for k, v in {**timings, "total_s": time.monotonic() - started}.items()},
        "cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
        "workers": options.workers,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "download_bytes": download,
        "fetch_seconds_by_source": {name: round(f.seconds, 2) for name, f in fetched.items()},
        "unpacked_bytes": sum(f.unpacked_bytes for f in fetched.values()),
        "images_rendered": len(todo),
        "images_reused": len(items) - len(todo),
        "images_written": written,
        "images_removed": removed,
        "output_image_bytes": sum(image_bytes.values()),
    }
    _write_json(out / STATS_FILE, stats)
    progress(f"built {len(records)} web images, {target_summary.get('branches', 0)} targets in {stats['seconds']['total_s']:.0f} s -> {out}")
    return manifest


def corpus_counts(items: Sequence[WebItem], rendered, records: Sequence[CorpusRecord], failures: dict[str, Counter], image_bytes: Counter) -> dict:
    by_source: dict[str, dict] = {}
    kept_ids = {r.id for r in records}
    for source in dict.fromkeys(i.source for i in items):
        chosen = [i for i in items if i.source == source]
        kept = [i for i in chosen if i.id in kept_ids]
        mapped = [i for i in kept if i.synset]
        by_source[source] = {
            "planned": len(chosen),
            "images": len(kept),
            "failed": dict(sorted(failures[source].items())),
            "with_synset": len(mapped),
            "with_synset_pct": round(100.0 * len(mapped) / len(kept), 1) if kept else 0.0,
            "distinct_synsets": len({i.synset for i in mapped}),
            "image_bytes": image_bytes[source],
        }
    mapped_total = sum(1 for r in records if r.synset)
    return {
        "images": len(records),
        "with_synset": mapped_total,
        "with_synset_pct": round(100.0 * mapped_total / len(records), 1) if records else 0.0,
        "distinct_synsets": len({r.synset for r in records if r.synset}),
        "emoji_concepts": len({i.group for i in items if i.group}),
        "by_source": by_source,
    }


def build_targets(
    out: Path, fetched: dict[str, sources.Fetched], stamps: list[tuxpaint.Stamp], mapper: SynsetMapper, options: BuildOptions, records: Sequence[CorpusRecord] = ()
) -> dict:
    """A target for every branch, written afresh under targets/ (swapped in when complete), each with
    the number of corpus images relevant to it (the positives a benchmark can hope to find)."""
    synset_counts = Counter(r.synset for r in records if r.synset)
    package_root = fetched["tuxpaint"].root
    stamps_root = tuxpaint.stamps_root(package_root)
    catalog = target_sets.Catalog.from_stamps(stamps, stamps_root, mapper)
    image_bytes = target_sets.photo_image(stamps_root, options.max_side)
    provenance = {"package": fetched["tuxpaint"].source.package, "version": fetched["tuxpaint"].version, "builder_version": BUILDER_VERSION}
    staging = out / f".{target_sets.TARGETS_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    branches = {}
    for branch, count in catalog.branches().items():
        summary = target_sets.write_target(
            catalog, branch, staging / branch, image_bytes, options.eval_fraction, options.split_seed, options.label_by, provenance
        )
        branches[branch] = branch_entry(summary)
        branches[branch]["relevant_web_images"] = sum(n for synset, n in synset_counts.items() if synset in summary["relevant_synsets"])
    _write_json(staging / BRANCHES_FILE, branches)
    final = out / target_sets.TARGETS_DIR
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    photos = catalog.photos
    return {
        "branches": len(branches),
        "photos": len(photos),
        "photos_with_synset": sum(1 for p in photos if p.synset),
        "drawings_in_corpus": sum(1 for s in stamps if s.kind == "drawing"),
        "photo_rule": dict(sorted(Counter(s.reason for s in stamps).items())),
        "branches_sha256": hashlib.sha256((final / BRANCHES_FILE).read_bytes()).hexdigest(),
    }


def branch_entry(summary: dict) -> dict:
    """The line of branches.json for one target."""
    return {
        "photos": summary["photos"],
        "train": summary["train"],
        "eval": summary["eval"],
        "labels": len(summary["labels"]),
        "train_labelled": sum(summary.get("train_labels", {}).values()),
        # Every test class has >= MIN_CLASS_PHOTOS photos in each split: two classes can measure.
        "measurable": len(summary["labels"]) >= 2,
        "label_by": summary["label_by"],
        "roots": [f"{r['wnid']} {r['lemma']}" for r in summary["roots"]],
        "subtree_size": summary["subtree_size"],
        "uncovered": len(summary["uncovered"]),
    }
