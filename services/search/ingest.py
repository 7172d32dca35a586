"""Turns a user's image collection into a search corpus (corpus.jsonl, see corpus.py).

    python -m services.search.ingest folder ~/photos [--out DIR]
    python -m services.search.ingest parquet laion-subset.parquet OUT_DIR [--url-col url --caption-col caption]
    python -m services.search.ingest webdataset 'shards/{00000..00009}.tar' OUT_DIR

folder      every image under the folder (recursively). Caption: a sidecar `<name>.txt` (or
            `<name>.caption`, or `<name>.json` with a "caption" key) when there is one, else words
            of the file name ("red_apple-02.jpg" -> "red apple"), else the folder's name. By
            default corpus.jsonl is written into the folder itself and images stay where they are;
            with --out they are hard-linked (copied across file systems) under OUT/images/.
parquet     rows of (url, caption): remote images, as LAION-style indices list them. Results point
            at the original URLs and the crawler downloads them (with all its safety checks).
webdataset  tar shards (`{000..009}` ranges and directories accepted): each sample's image (jpg,
            jpeg, png, webp, gif, bmp) and caption (txt, or json "caption") are extracted under
            OUT/images/<shard>/.

Images are recognised by their magic bytes (a .jpg that is HTML is skipped), and their sha256 is
recorded so that search can drop duplicates. What is skipped is counted by reason and printed at
the end, never line by line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from services.search.corpus import CONTENT_TYPES, MAX_CAPTION_CHARS, CorpusRecord, url_problem, write_corpus

CAPTION_SIDECARS = (".txt", ".caption")
_MAGIC = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
)
# Extensions each detected format may be named with.
_EXTENSIONS = {".jpg": (".jpg", ".jpeg"), ".png": (".png",), ".gif": (".gif",), ".bmp": (".bmp",), ".webp": (".webp",)}
_WORDS = re.compile(r"[A-Za-z]+")
# File-name words that describe the file, not the picture.
_NOISE_WORDS = frozenset({"img", "image", "dsc", "dscn", "dscf", "pic", "photo", "copy", "final", "edit", "edited", "small", "large", "thumb", "jpg", "jpeg", "png", "webp", "gif", "bmp"})
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class IngestReport:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"images": self.written, "skipped": dict(self.skipped)}


def image_kind(head: bytes) -> str | None:
    """The canonical extension of an image by its first bytes (None: not an image we index)."""
    for magic, extension in _MAGIC:
        if head.startswith(magic):
            return extension
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return None


def _matches_extension(head: bytes, suffix: str) -> bool:
    kind = image_kind(head)
    return kind is not None and suffix in _EXTENSIONS[kind]


def caption_from_name(stem: str) -> str:
    words = [w.lower() for w in _WORDS.findall(stem.replace("_", " "))]
    return " ".join(w for w in words if w not in _NOISE_WORDS)


def clean_caption(text: str) -> str:
    return " ".join(text.split())[:MAX_CAPTION_CHARS]


def make_id(hint: str, unique: str) -> str:
    """A corpus id: readable prefix + a hash of something unique (path, URL, row)."""
    prefix = _ID_UNSAFE.sub("-", hint).strip("-._")[:60] or "img"
    if not prefix[0].isalnum():
        prefix = "i" + prefix
    return f"{prefix}-{hashlib.sha1(unique.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"


# ---- folder --------------------------------------------------------------------------------------


def _sidecar_caption(image: Path) -> str:
    for suffix in CAPTION_SIDECARS:
        sidecar = image.with_suffix(suffix)
        if sidecar.is_file():
            return clean_caption(sidecar.read_text(encoding="utf-8", errors="replace"))
    sidecar = image.with_suffix(".json")
    if sidecar.is_file():
        try:
            value = json.loads(sidecar.read_text(encoding="utf-8", errors="replace"))
        except ValueError:
            return ""
        if isinstance(value, dict) and isinstance(value.get("caption"), str):
            return clean_caption(value["caption"])
    return ""


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def ingest_folder(source: str | Path, out: str | Path | None = None) -> IngestReport:
    source = Path(source).resolve()
    if not source.is_dir():
        raise ValueError(f"{source}: not a directory")
    out_dir = Path(out).resolve() if out else source
    in_place = out_dir == source
    report = IngestReport()

    def records() -> Iterator[CorpusRecord]:
        for path in sorted(source.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            relative = path.relative_to(source)
            if any(part.startswith(".") for part in relative.parts):
                continue  # hidden files, and the service's own index cache
            if not in_place and path.is_relative_to(out_dir):
                continue  # our own output, when --out lies inside the folder
            suffix = path.suffix.lower()
            if suffix not in CONTENT_TYPES:
                if suffix not in (*CAPTION_SIDECARS, ".json") and relative.name != "corpus.jsonl":
                    report.skipped["not_an_image_extension"] += 1
                continue
            data = path.read_bytes()
            if not _matches_extension(data[:12], suffix):
                report.skipped["content_is_not_the_named_format"] += 1
                continue
            caption = _sidecar_caption(path) or caption_from_name(path.stem) or caption_from_name(path.parent.name)
            if not caption:
                report.skipped["no_caption"] += 1
                continue
            image_id = make_id(path.stem, relative.as_posix())
            if in_place:
                file = relative.as_posix()
            else:
                file = f"images/{image_id}{suffix}"
                _place(path, out_dir / file)
            report.written += 1
            yield CorpusRecord(id=image_id, file=file, caption=caption, sha256=hashlib.sha256(data).hexdigest())

    write_corpus(out_dir, records())
    return report


# ---- parquet --------------------------------------------------------------------------------------


def ingest_parquet(sources: Sequence[str | Path], out: str | Path, url_col: str = "url", caption_col: str = "caption", batch_rows: int = 65_536) -> IngestReport:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a project dependency
        raise RuntimeError("reading parquet needs pyarrow: pip install pyarrow") from None
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        files.extend(sorted(path.glob("*.parquet")) if path.is_dir() else [path])
    if not files:
        raise ValueError("no parquet files given")
    report = IngestReport()
    seen_urls: set[str] = set()

    def records() -> Iterator[CorpusRecord]:
        for file in files:
            parquet = pq.ParquetFile(file)
            names = parquet.schema_arrow.names
            for column in (url_col, caption_col):
                if column not in names:
                    raise ValueError(f"{file}: no column {column!r} (columns: {', '.join(names)})")
            row = 0
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[url_col, caption_col]):
                urls = batch.column(0).to_pylist()
                captions = batch.column(1).to_pylist()
                for url, caption in zip(urls, captions):
                    row += 1
                    if not isinstance(url, str) or url_problem(url) is not None:
                        report.skipped["bad_url"] += 1
                        continue
                    caption = clean_caption(caption) if isinstance(caption, str) else ""
                    if not caption:
                        report.skipped["no_caption"] += 1
                        continue
                    if url in seen_urls:
                        report.skipped["duplicate_url"] += 1
                        continue
                    seen_urls.add(url)
                    report.written += 1
                    yield CorpusRecord(id=make_id(file.stem, f"{file.name}:{row}"), file="", url=url, caption=caption)

    write_corpus(out, records())
    return report


# ---- WebDataset ------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar'] (zero padding kept), recursively."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    low, high = match.group(1), match.group(2)
    width = len(low) if low.startswith("0") else 0
    out = []
    for number in range(int(low), int(high) + 1):
        out.extend(expand_braces(pattern[: match.start()] + str(number).zfill(width) + pattern[match.end() :]))
    return out


def _shard_paths(sources: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for source in sources:
        for expanded in expand_braces(source):
            path = Path(expanded)
            paths.extend(sorted(path.glob("*.tar")) if path.is_dir() else [path])
    return paths


def _samples(shard: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample; WebDataset keeps a sample's files next to each other."""
    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    for member in shard:
        if not member.isfile():
            continue
        directory, _, base = member.name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if not dot:
            continue
        sample = f"{directory}/{stem}" if directory else stem
        if sample != key:
            if key is not None:
                yield key, members
            key, members = sample, {}
        members[extension.lower()] = member
    if key is not None:
        yield key, members


def ingest_webdataset(sources: Sequence[str], out: str | Path, max_image_bytes: int = 64 * 1024 * 1024) -> IngestReport:
    shards = _shard_paths(sources)
    missing = [str(p) for p in shards if not p.is_file()]
    if not shards or missing:
        raise ValueError(f"shards not found: {', '.join(missing[:5]) or 'none given'}")
    out_dir = Path(out)
    report = IngestReport()

    def records() -> Iterator[CorpusRecord]:
        for shard_path in shards:
            shard_name = shard_path.name.removesuffix(".tar")
            with tarfile.open(shard_path, "r") as shard:
                for key, members in _samples(shard):
                    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "gif", "bmp") if e in members), None)
                    if image_ext is None:
                        report.skipped["no_image"] += 1
                        continue
                    if members[image_ext].size > max_image_bytes:
                        report.skipped["too_large"] += 1
                        continue
                    caption = _webdataset_caption(shard, members)
                    if not caption:
                        report.skipped["no_caption"] += 1
                        continue
                    data = shard.extractfile(members[image_ext]).read()  # type: ignore[union-attr]
                    suffix = f".{image_ext}"
                    if not _matches_extension(data[:12], suffix):
                        report.skipped["content_is_not_the_named_format"] += 1
                        continue
                    image_id = make_id(f"{shard_name}-{key.rsplit('/', 1)[-1]}", f"{shard_path.name}:{key}")
                    file = f"images/{_ID_UNSAFE.sub('-', shard_name)}/{image_id}{suffix}"
                    target = out_dir / file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    report.written += 1
                    yield CorpusRecord(id=image_id, file=file, caption=caption, sha256=hashlib.sha256(data).hexdigest())

    write_corpus(out_dir, records())
    return report


def _webdataset_caption(shard: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> str:
    for extension in ("txt", "caption"):
        if extension in members:
            return clean_caption(shard.extractfile(members[extension]).read().decode("utf-8", errors="replace"))  # type: ignore[union-attr]
    if "json" in members:
        try:
            value = json.loads(shard.extractfile(members["json"]).read())  # type: ignore[union-attr]
        except ValueError:
            return ""
        if isinstance(value, dict) and isinstance(value.get("caption"), str):
            return clean_caption(value["caption"])
    return ""


# ---- command line ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.search.ingest", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    folder = commands.add_parser("folder", help="index every image under a folder")
    folder.add_argument("source")
    folder.add_argument("--out", help="write the corpus here (images hard-linked or copied); default: into the folder itself")
    parquet = commands.add_parser("parquet", help="index remote images listed as url,caption rows")
    parquet.add_argument("sources", nargs="+", help="parquet files or directories of them, then OUT_DIR last")
    parquet.add_argument("--url-col", default="url")
    parquet.add_argument("--caption-col", default="caption")
    shards = commands.add_parser("webdataset", help="index the samples of WebDataset tar shards")
    shards.add_argument("sources", nargs="+", help="shards ('{000..009}' ranges, directories), then OUT_DIR last")
    args = parser.parse_args(argv)
    try:
        if args.command == "folder":
            report = ingest_folder(args.source, args.out)
            out = args.out or args.source
        elif args.command == "parquet":
            if len(args.sources) < 2:
                parser.error("parquet needs at least one source and OUT_DIR")
            *sources, out = args.sources
            report = ingest_parquet(sources, out, args.url_col, args.caption_col)
        else:
            if len(args.sources) < 2:
                parser.error("webdataset needs at least one shard and OUT_DIR")
            *sources, out = args.sources
            report = ingest_webdataset(sources, out)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"corpus": str(out), **report.to_json()}))
    return 0 if report.written else 1


if __name__ == "__main__":
    raise SystemExit(main())
