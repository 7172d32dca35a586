"""Concept vocabularies and their MiniLM embeddings, computed once and cached (memory, local disk, S3).

The default vocabulary is the paper's: every (lemma, synset) pair of the WordNet 3.0 nouns (146,347
concepts), searched for as the lemma. What the Gaussian process compares concepts by is the
embedding of their `concept_text`: the paper's "{lemma} ({hypernym}): {definition}." (`definition`)
or, the project's default, the lemma itself (`name`): the text that is searched for, whose embedding
predicts a concept's reward better (bench/README.md, "The project's planner: the GP over the names"). A custom vocabulary is the
user's list of concepts, embedded and searched as written.

Embeddings are addressed by a digest of the model name and the embedded texts:
`vocabularies/<digest>/embeddings.npy` (float32 [N, 384]) and `meta.json` in S3, mirrored under the
local cache directory. The digest names the model, not the runtime: onnxruntime and torch give
the same vectors to float rounding (max difference ~2e-7, services/common/textembed.py), so a cache
built by either serves both. The first build of the WordNet vocabulary takes minutes on a CPU
(about 4 on two quiet cores with onnxruntime; it was 8-17 with torch), so it runs on a background
thread; explorations that need it wait in PENDING, with the progress in their `detail`. Every later
start loads the cached file in seconds.

Run `python -m services.planner.vocabulary build` to build and upload the cache ahead of time (a
progress line on stderr at every 10%).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from services.common.errors import DependencyUnavailable
from services.common.settings import load, setting

log = logging.getLogger(__name__)

WORDNET = "wordnet"
CUSTOM = "custom"
VOCABULARY_KINDS = (WORDNET, CUSTOM)
S3_PREFIX = "vocabularies"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIMENSION = 384
EMBED_CHUNK = 2048
# What a WordNet concept is embedded as: the paper's gloss text, or its name (the query's text).
DEFINITION, NAME = "definition", "name"
CONCEPT_TEXTS = (DEFINITION, NAME)
PAPER_CONCEPT_TEXT = DEFINITION
PROJECT_CONCEPT_TEXT = NAME


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "iex" / "vocabularies"


@dataclass
class Vocabulary:
    """Concepts with unique keys (what observations and the API name), search names and embedding texts."""

    kind: str
    keys: list[str]
    names: list[str]
    texts: list[str]
    # WordNet synset offset of each concept (descriptor sources use it); empty for custom vocabularies.
    synsets: list[int] = field(default_factory=list)
    digest: str = ""
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.names) == len(self.texts)):
            raise ValueError("keys, names and texts must have one entry per concept")
        if not self.digest:
            self.digest = embedding_digest(self.texts)
        if not self.index:
            self.index = {key: i for i, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)


def embedding_digest(texts: Sequence[str], model: str = EMBEDDING_MODEL) -> str:
    h = hashlib.sha256(f"{model}\n{len(texts)}\n".encode())
    for text in texts:
        h.update(text.encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


def wordnet_key(lemma: str, synset_offset: int) -> str:
    """Unique, readable concept key: the lemma and its synset's ImageNet-style id ("dog.n02084071")."""
    return f"{lemma}.n{synset_offset:08d}"


@dataclass(frozen=True)
class VocabularySettings:
    """The planner's settings that decide which vocabulary cache it reads. `PlannerSettings` inherits
    them; the tools that build the cache ahead of the planner (`build` below, the main job) load them
    alone, with the same parsing and checks."""

    planner_vocabulary_cache_dir: str = setting("", help="local cache of vocabulary embeddings; empty: $XDG_CACHE_HOME (or ~/.cache)/iex/vocabularies")
    planner_concept_text: str = setting(
        PROJECT_CONCEPT_TEXT,
        help="what the GP compares WordNet concepts by: the embedding of their 'name' (the text searched for) or of the paper's 'definition' text (\"{lemma} ({hypernym}): {definition}.\")",
        choices=CONCEPT_TEXTS,
    )

    def cache_dir(self) -> Path:
        return Path(self.planner_vocabulary_cache_dir) if self.planner_vocabulary_cache_dir else default_cache_dir()


def wordnet_vocabulary(directory: Path | None = None, concept_text: str = PROJECT_CONCEPT_TEXT) -> Vocabulary:
    """`concept_text`: what each concept is embedded as, `definition` (the paper's) or `name`."""
    from services.common.wordnet import WordNet

    if concept_text not in CONCEPT_TEXTS:
        raise ValueError(f"concept_text must be one of {', '.join(CONCEPT_TEXTS)}, got {concept_text!r}")

    wn = WordNet.load(directory)
    keys, names, texts, synsets = [], [], [], []
    seen: set[str] = set()
    for concept in wn.concepts():
        key = wordnet_key(concept.lemma, concept.synset)
        if key in seen:
            continue
        seen.add(key)
        keys.append(key)
        names.append(concept.lemma)
        texts.append(concept.text if concept_text == DEFINITION else concept.lemma)
        synsets.append(concept.synset)
    return Vocabulary(WORDNET, keys, names, texts, synsets)


def custom_vocabulary(concepts: Sequence[str]) -> Vocabulary:
    unique = list(dict.fromkeys(c.strip() for c in concepts if c.strip()))
    return Vocabulary(CUSTOM, unique, list(unique), list(unique))


# ------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingJob:
    """Where a vocabulary's embeddings stand: absent -> building -> ready (or failed, retried later)."""

    digest: str
    state: str = "absent"  # absent | loading | embedding | ready | failed
    progress: float = 0.0
    error: str = ""
    source: str = ""  # memory | disk | s3 | computed
    started_at: float = 0.0
    seconds: float = 0.0
    embeddings: np.ndarray | None = None

    def describe(self) -> str:
        if self.state == "embedding":
            return f"embedding the vocabulary ({self.progress:.0%})"
        if self.state == "loading":
            return "loading cached vocabulary embeddings"
        if self.state == "failed":
            return f"vocabulary embeddings failed: {self.error}"
        return ""


Embed = Callable[[Sequence[str]], np.ndarray]


def _default_embed(texts: Sequence[str]) -> np.ndarray:
    from services.common.textembed import shared_minilm

    return shared_minilm().embed(texts)


class EmbeddingCache:
    """Embeddings by vocabulary digest: memory, then the local disk cache, then S3, else computed once.

    `request` never blocks: it starts a background build and returns the job, whose state callers
    poll (or get notified of through `on_ready`).
    """

    def __init__(
        self,
        store,
        bucket: str,
        cache_dir: Path | None = None,
        embed: Embed | None = None,
        on_ready: Callable[[str], None] | None = None,
        retry_after_s: float = 60.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """store: the S3 tier (None: memory and the local disk only, for tools and benchmarks).
        progress: called with (concepts embedded, concepts in all) after every chunk of a computed build."""
        self.store = store
        self.bucket = bucket
        self.cache_dir = cache_dir or default_cache_dir()
        self.embed = embed or _default_embed
        self.on_ready = on_ready
        self.retry_after_s = retry_after_s
        self.progress = progress
        self.jobs: dict[str, EmbeddingJob] = {}
        self.lock = threading.Lock()
        # One build at a time: two vocabularies embedding together would only share the same cores.
        self._build_lock = threading.Lock()

    def request(self, vocabulary: Vocabulary) -> EmbeddingJob:
        with self.lock:
            job = self.jobs.get(vocabulary.digest)
            if job is None or (job.state == "failed" and time.time() - job.started_at > self.retry_after_s):
                job = EmbeddingJob(vocabulary.digest, state="loading", started_at=time.time())
                self.jobs[vocabulary.digest] = job
                threading.Thread(target=self._build, args=(vocabulary, job), name=f"embed-{vocabulary.digest[:8]}", daemon=True).start()
            return job

    def get(self, vocabulary: Vocabulary, timeout_s: float | None = None) -> np.ndarray:
        """Blocks until the embeddings are ready (for tools and tests)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.request(vocabulary)
            if job.state == "ready" and job.embeddings is not None:
                return job.embeddings
            if job.state == "failed":
                raise RuntimeError(job.error)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"vocabulary {vocabulary.digest} not embedded within {timeout_s}s")
            time.sleep(0.1)

    # -- storage -----------------------------------------------------------------------------
    def local_path(self, digest: str) -> Path:
        return self.cache_dir / digest / "embeddings.npy"

    def s3_key(self, digest: str, name: str = "embeddings.npy") -> str:
        return f"{S3_PREFIX}/{digest}/{name}"

    def _valid(self, array: np.ndarray | None, vocabulary: Vocabulary) -> bool:
        return (
            array is not None
            and array.dtype == np.float32
            and array.shape == (len(vocabulary), EMBEDDING_DIMENSION)
            and bool(np.isfinite(array).all())
        )

    def _load_local(self, vocabulary: Vocabulary) -> np.ndarray | None:
        path = self.local_path(vocabulary.digest)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return array if self._valid(array, vocabulary) else None

    def _save_local(self, digest: str, array: np.ndarray) -> None:
        path = self.local_path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only disk only costs the next start a download
            log.warning("could not write the local embedding cache", extra={"path": str(path), "error": str(exc)})

    def _load_s3(self, vocabulary: Vocabulary) -> np.ndarray | None:
        if self.store is None:
            return None
        data = self.store.get_or_none(self.bucket, self.s3_key(vocabulary.digest))
        if data is None:
            return None
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:
            return None
        return array if self._valid(array, vocabulary) else None

    def _save_s3(self, vocabulary: Vocabulary, array: np.ndarray, seconds: float) -> None:
        if self.store is None:
            return
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        self.store.put_bytes(self.bucket, self.s3_key(vocabulary.digest), buffer.getvalue())
        meta = {
            "kind": vocabulary.kind,
            "model": EMBEDDING_MODEL,
            "dimension": EMBEDDING_DIMENSION,
            "count": len(vocabulary),
            "first_key": vocabulary.keys[0] if vocabulary.keys else "",
            "last_key": vocabulary.keys[-1] if vocabulary.keys else "",
            "embed_seconds": round(seconds, 1),
            "created_at": time.time(),
        }
        self.store.put_json(self.bucket, self.s3_key(vocabulary.digest, "meta.json"), meta)

    # -- the build ---------------------------------------------------------------------------
    def _build(self, vocabulary: Vocabulary, job: EmbeddingJob) -> None:
        started = time.monotonic()
        try:
            array = self._load_local(vocabulary)
            job.source = "disk"
            if array is None:
                try:
                    array = self._load_s3(vocabulary)
                    job.source = "s3"
                except DependencyUnavailable as exc:
                    log.warning("S3 unavailable for the embedding cache; computing", extra={"error": str(exc)[:200]})
                if array is not None:
                    self._save_local(vocabulary.digest, array)
            if array is None:
                with self._build_lock:
                    job.state = "embedding"
                    array = self._compute(vocabulary, job)
                job.source = "computed"
                self._save_local(vocabulary.digest, array)
                try:
                    self._save_s3(vocabulary, array, time.monotonic() - started)
                except DependencyUnavailable as exc:
                    log.warning("could not upload vocabulary embeddings; kept locally", extra={"error": str(exc)[:200]})
            job.embeddings = array
            job.seconds = time.monotonic() - started
            job.progress = 1.0
            job.state = "ready"
            log.info(
                "vocabulary embeddings ready",
                extra={"digest": vocabulary.digest, "concepts": len(vocabulary), "source": job.source, "seconds": round(job.seconds, 1)},
            )
        except Exception as exc:  # noqa: BLE001 - reported through the job and retried on a later request
            job.state = "failed"
            job.error = f"{type(exc).__name__}: {exc}"[:500]
            log.exception("vocabulary embeddings failed", extra={"digest": vocabulary.digest})
        if self.on_ready is not None:
            self.on_ready(vocabulary.digest)

    def _compute(self, vocabulary: Vocabulary, job: EmbeddingJob) -> np.ndarray:
        texts = vocabulary.texts
        out = np.empty((len(texts), EMBEDDING_DIMENSION), dtype=np.float32)
        # Chunks of texts of similar length (the embedder then sorts each chunk by token count, so its
        # batches carry almost no padding); rows go back to the vocabulary order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), EMBED_CHUNK):
            rows = order[start : start + EMBED_CHUNK]
            out[rows] = self.embed([texts[i] for i in rows])
            job.progress = min(1.0, (start + len(rows)) / max(1, len(texts)))
            if self.progress is not None:
                self.progress(start + len(rows), len(texts))
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.planner.vocabulary build`: embed the default vocabulary and upload it."""
    from services.common import logs
    from services.common.objectstore import ObjectStore
    from services.common.settings import ServiceSettings

    parser = argparse.ArgumentParser(prog="python -m services.planner.vocabulary")
    parser.add_argument("command", choices=("build", "digest"))
    parser.add_argument("--concepts-file", help="a custom vocabulary, one concept a line (default: WordNet nouns)")
    parser.add_argument("--concept-text", choices=CONCEPT_TEXTS, default=None, help="what WordNet concepts are embedded as (default: IEX_PLANNER_CONCEPT_TEXT, else name)")
    args = parser.parse_args(argv)
    logs.configure("planner-vocabulary", "INFO")
    planner = load(VocabularySettings)  # the planner's own settings, if the operator set them
    if args.concepts_file:
        vocabulary = custom_vocabulary(Path(args.concepts_file).read_text().splitlines())
    else:
        vocabulary = wordnet_vocabulary(concept_text=args.concept_text or planner.planner_concept_text)
    if args.command == "digest":
        print(json.dumps({"kind": vocabulary.kind, "concepts": len(vocabulary), "digest": vocabulary.digest}))
        return 0
    settings = load(ServiceSettings)
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket(settings.s3_bucket)
    from services.common.textembed import ProgressLine, shared_minilm

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    label = f"embedding {len(vocabulary):,} {vocabulary.kind} concepts"
    cache = EmbeddingCache(store, settings.s3_bucket, cache_dir=planner.cache_dir(), progress=ProgressLine(say, label))
    began = time.monotonic()
    cache.get(vocabulary)
    job = cache.jobs[vocabulary.digest]
    print(
        json.dumps(
            {
                "kind": vocabulary.kind,
                "concepts": len(vocabulary),
                "digest": vocabulary.digest,
                "source": job.source,
                "runtime": shared_minilm().runtime if job.source == "computed" else "",
                "seconds": round(time.monotonic() - began, 1),
                "s3_key": cache.s3_key(vocabulary.digest),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
