"""What the trainer trains on: the iteration manifest, the replay buffer, the image set, the pixels.

An iteration's training set is its candidates C plus `ratio` x |C| images drawn from the replay
buffer of earlier iterations together with the target's train images (the paper uses ratio 2).
The replay buffer is persisted per exploration as `explorations/<id>/replay.json`, one entry per
iteration, so that the pool an iteration draws from is a pure function of the earlier entries and
a redelivered iteration draws exactly the same images.

The planner's manifest names plain keys plus the bucket of each group (`images_bucket` for
candidates and replay, `target_bucket` for the target's images; the service's bucket when absent);
a key may also be a full `s3://bucket/key`. Parsing turns every reference into `s3://bucket/key`,
so the replay buffer and the training set are unambiguous whatever bucket an image lives in.
"""

from __future__ import annotations

import json
import logging
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

from services.common.errors import PermanentError
from services.common.images import square_pixels
from services.common.objectstore import InvalidObjectRequest, ObjectStore, parse_s3_uri

log = logging.getLogger(__name__)

# A truncated download is a bad image, not a half-decoded one.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Far above any real photo, far below what exhausts memory (the scorer uses the same ceiling).
DEFAULT_MAX_PIXELS = 64_000_000

EXPLORATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")

# <target>/train_labels.json: the labels of the target's train split, read by the evaluation only
# (services.offlineweb.targets.TRAIN_LABELS_FILE; the trainer does not import the offline-web tooling).
TRAIN_LABELS_FILE = "train_labels.json"


def replay_key(exploration_id: str) -> str:
    return f"explorations/{exploration_id}/replay.json"


def resolve(reference: str, default_bucket: str) -> tuple[str, str]:
    """(bucket, key) of a reference: `s3://bucket/key`, or a key in `default_bucket`."""
    if reference.startswith("s3://"):
        bucket, key = parse_s3_uri(reference)
        if not key:
            raise ValueError(f"s3 reference without a key: {reference!r}")
        return bucket, key
    if not reference or reference.startswith("/"):
        raise ValueError(f"bad object key {reference!r}")
    return default_bucket, reference


def qualify(reference: str, default_bucket: str) -> str:
    """The reference as `s3://bucket/key`."""
    bucket, key = resolve(reference, default_bucket)
    return f"s3://{bucket}/{key}"


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class LabelledImage:
    key: str
    label: str


@dataclass(frozen=True)
class IterationManifest:
    exploration_id: str
    iteration: int
    candidates: tuple[str, ...]
    replay: tuple[str, ...]
    target_train: tuple[str, ...]
    target_eval: tuple[LabelledImage, ...] = ()
    # s3://bucket/prefix of the target (where its train_labels.json lives); "" when unknown.
    target_uri: str = ""

    @classmethod
    def parse(cls, doc: Any, default_bucket: str) -> "IterationManifest":
        """Validates the planner's manifest; ValueError names the bad field."""
        if not isinstance(doc, dict):
            raise ValueError("manifest is not a JSON object")
        images_bucket = _bucket(doc, "images_bucket", default_bucket)
        target_bucket = _bucket(doc, "target_bucket", default_bucket)

        def references(name: str, bucket: str, required: bool = True) -> tuple[str, ...]:
            value = doc.get(name)
            if value is None and not required:
                return ()
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name}: expected a list of object keys")
            try:
                return tuple(qualify(v, bucket) for v in value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

        exploration_id = doc.get("exploration_id")
        if not isinstance(exploration_id, str) or not EXPLORATION_ID_RE.match(exploration_id):
            raise ValueError("exploration_id: missing or malformed")
        iteration = doc.get("iteration")
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ValueError("iteration: expected a non-negative integer")
        evaluation = []
        for entry in doc.get("target_eval") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not isinstance(entry.get("label"), str):
                raise ValueError("target_eval: expected a list of {key, label}")
            try:
                evaluation.append(LabelledImage(qualify(entry["key"], target_bucket), entry["label"]))
            except ValueError as exc:
                raise ValueError(f"target_eval: {exc}") from None
        target_train = references("target_train", target_bucket)
        target_uri = doc.get("target_uri") or _target_uri_of(target_train)
        if not isinstance(target_uri, str) or (target_uri and not target_uri.startswith("s3://")):
            raise ValueError("target_uri: expected s3://bucket/prefix")
        return cls(
            exploration_id=exploration_id,
            iteration=iteration,
            candidates=references("candidates", images_bucket),
            replay=references("replay", images_bucket, required=False),
            target_train=target_train,
            target_eval=tuple(evaluation),
            target_uri=target_uri.rstrip("/"),
        )


def _target_uri_of(train: Sequence[str]) -> str:
    """The target of manifests written before they named it: the one prefix every train image
    sits under (s3://bucket/prefix/train/...), else ""."""
    if not train or not all("/train/" in reference for reference in train):
        return ""
    prefixes = {reference.rpartition("/train/")[0] for reference in train}
    return prefixes.pop() if len(prefixes) == 1 else ""


def _bucket(doc: dict[str, Any], name: str, default: str) -> str:
    value = doc.get(name) or default
    if not isinstance(value, str) or "/" in value:
        raise ValueError(f"{name}: expected a bucket name")
    return value


def read_manifest(store: ObjectStore, bucket: str, key: str) -> IterationManifest:
    doc = store.get_json(bucket, key)
    if doc is None:
        raise PermanentError("manifest_missing", key)
    try:
        return IterationManifest.parse(doc, bucket)
    except ValueError as exc:
        raise PermanentError("manifest_invalid", f"{key}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Replay buffer


@dataclass
class ReplayBuffer:
    """Images selected for replay, by the iteration that selected them."""

    exploration_id: str
    by_iteration: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, store: ObjectStore, bucket: str, exploration_id: str) -> "ReplayBuffer":
        doc = store.get_json(bucket, replay_key(exploration_id))
        if doc is None:
            return cls(exploration_id)
        entries = doc.get("iterations", {}) if isinstance(doc, dict) else {}
        return cls(exploration_id, {int(k): tuple(v) for k, v in entries.items()})

    def pool_before(self, iteration: int) -> list[str]:
        """The buffer as it stood when `iteration` started: the union of earlier selections."""
        pool: set[str] = set()
        for it, keys in self.by_iteration.items():
            if it < iteration:
                pool.update(keys)
        return sorted(pool)

    def record(self, store: ObjectStore, bucket: str, iteration: int, keys: Iterable[str]) -> None:
        """Stores `iteration`'s selection; writing the same selection again changes nothing."""
        selection = tuple(sorted(set(keys)))
        if self.by_iteration.get(iteration) == selection:
            return
        self.by_iteration[iteration] = selection
        doc = {
            "exploration_id": self.exploration_id,
            "iterations": {str(k): list(v) for k, v in sorted(self.by_iteration.items())},
            "size": len(self.pool_before(max(self.by_iteration) + 1)),
        }
        store.put_json(bucket, replay_key(self.exploration_id), doc)


# ---------------------------------------------------------------------------------------------
# Training set


def plan_training_set(
    candidates: Sequence[str],
    pool: Sequence[str],
    ratio: float,
    rng: random.Random,
    limit: int = 0,
) -> list[str]:
    """Candidates plus round(ratio x |candidates|) draws from `pool` (replay buffer + target
    train). The draws are without replacement while the pool is large enough, and repeat pool
    images otherwise, so the candidates never outweigh the target-side images by more than the
    ratio says. With no candidates the whole pool is the set. `limit` > 0 caps the total (CPU
    runs that train a few steps need no more images than they will see), keeping the proportion.
    """
    candidates = list(dict.fromkeys(candidates))
    pool = sorted(set(pool))
    if not candidates:
        chosen_pool = list(pool)
        rng.shuffle(chosen_pool)
        return chosen_pool[:limit] if limit > 0 else chosen_pool
    wanted = int(round(ratio * len(candidates)))
    if limit > 0 and len(candidates) + wanted > limit:
        scale = limit / (len(candidates) + wanted)
        kept = max(1, int(round(len(candidates) * scale)))
        candidates = rng.sample(candidates, kept)
        wanted = max(0, limit - kept)
    if not pool or wanted == 0:
        return list(candidates)
    if wanted <= len(pool):
        drawn = rng.sample(pool, wanted)
    else:
        drawn = list(pool) + rng.choices(pool, k=wanted - len(pool))
    return list(candidates) + drawn


# ---------------------------------------------------------------------------------------------
# Pixels


def decode_square(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3] RGB: the centre square resized to `size`, the framing
    the scorer uses for the served encoder, so training and scoring see images alike (both go
    through services.common.images: allow-listed formats, bomb guard, orientation, transparency
    composited on white). Raises ImageRejected (a ValueError) for anything unusable."""
    return square_pixels(data, size, max_pixels=max_pixels)


@dataclass
class ImageBatch:
    """Decoded images [N, 3, size, size] (uint8) and the references they came from."""

    pixels: torch.Tensor
    references: list[str]
    skipped: dict[str, int]


def fetch_images(store: ObjectStore, default_bucket: str, references: Sequence[str], size: int, workers: int = 8) -> ImageBatch:
    """Reads and decodes `references` concurrently. Missing and undecodable images are skipped
    and counted by reason; an unreachable store raises DependencyUnavailable (the caller retries
    the whole iteration)."""

    def load(reference: str) -> tuple[str, np.ndarray | None]:
        try:
            bucket, key = resolve(reference, default_bucket)
        except ValueError:
            return "bad_reference", None
        try:
            data = store.get_or_none(bucket, key)
        except InvalidObjectRequest:
            # S3 refuses the request itself (a key it cannot store): a bad reference, not an outage.
            return "bad_reference", None
        if data is None:
            return "missing", None
        try:
            return "ok", decode_square(data, size)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            return "undecodable", None

    unique = list(dict.fromkeys(references))
    decoded: dict[str, np.ndarray] = {}
    skipped: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="trainer-fetch") as pool:
        for reference, (outcome, pixels) in zip(unique, pool.map(load, unique)):
            if pixels is None:
                skipped[outcome] = skipped.get(outcome, 0) + 1
            else:
                decoded[reference] = pixels
    kept = [r for r in references if r in decoded]  # repeats in `references` are kept as repeats
    if skipped:
        log.warning("images skipped", extra={"skipped": skipped, "kept": len(kept)})
    if not kept:
        return ImageBatch(torch.zeros(0, 3, size, size, dtype=torch.uint8), [], skipped)
    array = np.stack([decoded[r] for r in kept])
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    return ImageBatch(pixels, kept, skipped)


def list_target_eval(store: ObjectStore, target_uri: str, limit: int) -> list[LabelledImage]:
    """Labelled images under `<target_uri>/eval/<label>/...`, at most `limit`, spread evenly
    over the sorted listing so every label keeps its share."""
    bucket, prefix = parse_s3_uri(target_uri)
    eval_prefix = f"{prefix}/eval/" if prefix else "eval/"
    found = []
    for key in sorted(store.list_keys(bucket, eval_prefix)):
        label, _, name = key[len(eval_prefix) :].partition("/")
        if label and name:
            found.append(LabelledImage(f"s3://{bucket}/{key}", label))
    return spread(found, limit)


def read_train_labels(store: ObjectStore, target_uri: str, limit: int = 0) -> list[LabelledImage] | None:
    """The labelled images of the target's train split, from `<target_uri>/train_labels.json`
    (`{"labels": {"train/<file>": label}}`), at most `limit` (0: all), spread evenly over the
    images sorted by label so every class keeps its share; None when the target has no such file.

    For evaluation only (the k-NN memory bank and the linear probe are fitted on them): training
    reads the train split as unlabelled images and never calls this. A name outside `train/` (an
    eval image above all) or a label that is not a non-empty string makes the file invalid
    (ValueError), never half-read."""
    bucket, prefix = parse_s3_uri(target_uri)
    key = f"{prefix}/{TRAIN_LABELS_FILE}" if prefix else TRAIN_LABELS_FILE
    raw = store.get_or_none(bucket, key)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{key}: not JSON ({exc})") from None
    labels = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(labels, dict):
        raise ValueError(f'{key}: expected {{"labels": {{"train/<file>": label}}}}')
    found = []
    for name, label in labels.items():
        parts = name.split("/") if isinstance(name, str) else []
        if len(parts) < 2 or parts[0] != "train" or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{key}: {str(name)[:80]!r} is not an image of the train split (train/<file>)")
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{key}: the label of {name!r} is not a non-empty string")
        found.append(LabelledImage(f"s3://{bucket}/{prefix}/{name}" if prefix else f"s3://{bucket}/{name}", label))
    found.sort(key=lambda item: (item.label, item.key))
    return spread(found, limit)


def spread(items: Sequence[Any], limit: int) -> list[Any]:
    """At most `limit` items taken at even strides (deterministic, keeps the order's mix)."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]
