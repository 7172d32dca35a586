"""A search corpus on disk: a directory holding `corpus.jsonl` plus the image files it names.

Each line of corpus.jsonl is one JSON object:
  id       (required) URL-safe identifier, [A-Za-z0-9][A-Za-z0-9._-]{0,127}; unique
  file     path of the image relative to the directory; must stay inside it (served at /images/<id>)
  url      or an http(s) URL of an image hosted elsewhere (a parquet of url,caption, a LAION-style
           index): results point at that URL and this service serves no bytes for it
           (exactly one of file and url)
  caption  (required) the text that search matches against
  synset, concept, license, sha256 (optional strings; sha256 of the file's bytes enables
           deduplication of identical images in results)
Unknown keys are ignored so that corpora can carry extra provenance. `services.search.ingest`
writes corpora from a folder of images, a parquet of url,caption or WebDataset shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable
from urllib.parse import urlsplit

CORPUS_FILE = "corpus.jsonl"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_CAPTION_CHARS = 2000
MAX_URL_CHARS = 2048
# SVG is left out on purpose: served from our origin it could carry script.
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}
_OPTIONAL_STRINGS = ("synset", "concept", "license", "sha256")
# A broken corpus usually breaks many lines the same way; the first few problems are enough to fix it.
_MAX_REPORTED_PROBLEMS = 20


class CorpusError(ValueError):
    """The corpus directory or one of its records is invalid; the message names the lines."""


@dataclass(frozen=True)
class CorpusRecord:
    id: str
    file: str
    caption: str
    synset: str = ""
    concept: str = ""
    license: str = ""
    sha256: str = ""
    url: str = ""

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[PurePosixPath(self.file).suffix.lower()]

    @property
    def is_remote(self) -> bool:
        """Hosted elsewhere: results carry `url`, and no bytes are served for it here."""
        return bool(self.url)

    @property
    def identity(self) -> str:
        """What makes two records the same image for deduplication: bytes when known, else location."""
        return self.sha256 or self.file or self.url

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != "" or k in ("id", "caption") or (k == "file" and not self.url)}


@dataclass
class Corpus:
    root: Path
    records: tuple[CorpusRecord, ...]
    # sha256 of corpus.jsonl: identifies this exact corpus version.
    checksum: str
    by_id: dict[str, CorpusRecord] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {r.id: r for r in self.records}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, image_id: str) -> CorpusRecord | None:
        return self.by_id.get(image_id)

    def path_of(self, record: CorpusRecord) -> Path | None:
        """The image file of a local record; None for a remote one."""
        return None if record.is_remote else self.root / record.file


def _safe_relative(file: str) -> str | None:
    """The problem with a record's file path, or None when it is a plain relative path."""
    if not file or "\\" in file or "\x00" in file:
        return "must be a non-empty relative POSIX path"
    path = PurePosixPath(file)
    if path.is_absolute() or any(part in ("..", "") for part in file.split("/")):
        return "must be relative and must not contain '..' or empty segments"
    if path.suffix.lower() not in CONTENT_TYPES:
        return f"unsupported image type {path.suffix!r} (allowed: {', '.join(sorted(CONTENT_TYPES))})"
    return None


def url_problem(url: str) -> str | None:
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL with a host"
    if any(c in url for c in " \t\r\n\x00"):
        return "must not contain whitespace or control characters"
    return None


def parse_record(obj: object) -> tuple[CorpusRecord | None, str | None]:
    """(record, None) or (None, "<field>: <problem>")."""
    if not isinstance(obj, dict):
        return None, "line: must be a JSON object"
    for name in ("id", "caption"):
        if not isinstance(obj.get(name), str):
            return None, f"{name}: required string"
    image_id, caption = obj["id"], obj["caption"]
    file, url = obj.get("file"), obj.get("url")
    if not ID_PATTERN.match(image_id):
        return None, f"id: {image_id[:60]!r} must match {ID_PATTERN.pattern}"
    if (file is None) == (url is None):
        return None, "file: exactly one of file and url is required"
    if url is not None:
        if not isinstance(url, str):
            return None, "url: must be a string"
        problem = url_problem(url)
        if problem:
            return None, f"url: {problem}"
        file = ""
    else:
        if not isinstance(file, str):
            return None, "file: required string"
        problem = _safe_relative(file)
        if problem:
            return None, f"file: {problem}"
        url = ""
    if not caption.strip():
        return None, "caption: must not be empty"
    if len(caption) > MAX_CAPTION_CHARS:
        return None, f"caption: longer than {MAX_CAPTION_CHARS} characters"
    optional = {}
    for name in _OPTIONAL_STRINGS:
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            return None, f"{name}: must be a string"
        optional[name] = value
    if optional.get("sha256") and not SHA256_PATTERN.match(optional["sha256"]):
        return None, "sha256: must be 64 lowercase hex digits"
    return CorpusRecord(id=image_id, file=file, caption=caption.strip(), url=url, **optional), None


def load_corpus(root: str | Path, check_files: bool = True) -> Corpus:
    """Reads and validates a corpus directory; raises CorpusError listing the problems found."""
    root = Path(root)
    listing = root / CORPUS_FILE
    if not root.is_dir():
        raise CorpusError(f"{root}: not a directory")
    if not listing.is_file():
        raise CorpusError(f"{root}: no {CORPUS_FILE}")
    raw = listing.read_bytes()
    resolved_root = root.resolve()
    records: list[CorpusRecord] = []
    first_line_of: dict[str, int] = {}
    problems: list[str] = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if len(problems) >= _MAX_REPORTED_PROBLEMS:
            problems.append("... (further problems not listed)")
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{CORPUS_FILE}:{number}: not JSON ({exc.msg})")
            continue
        record, problem = parse_record(obj)
        if problem:
            problems.append(f"{CORPUS_FILE}:{number}: {problem}")
            continue
        assert record is not None
        if record.id in first_line_of:
            problems.append(f"{CORPUS_FILE}:{number}: id: {record.id!r} duplicates line {first_line_of[record.id]}")
            continue
        if check_files and not record.is_remote:
            # resolve() follows symlinks, so a link pointing outside the corpus is refused here too.
            target = (root / record.file).resolve()
            if not target.is_relative_to(resolved_root):
                problems.append(f"{CORPUS_FILE}:{number}: file: {record.file!r} resolves outside the corpus")
                continue
            if not target.is_file():
                problems.append(f"{CORPUS_FILE}:{number}: file: {record.file!r} does not exist")
                continue
        first_line_of[record.id] = number
        records.append(record)
    if problems:
        raise CorpusError(f"{root}: invalid corpus:\n  " + "\n  ".join(problems))
    if not records:
        raise CorpusError(f"{root}: {CORPUS_FILE} holds no records")
    return Corpus(root=root, records=tuple(records), checksum=hashlib.sha256(raw).hexdigest())


def write_corpus(root: str | Path, records: Iterable[CorpusRecord]) -> Path:
    """Writes corpus.jsonl atomically (readers never see half a listing), streaming the records."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".corpus-", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, root / CORPUS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return root / CORPUS_FILE
