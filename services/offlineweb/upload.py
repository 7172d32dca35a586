"""Uploads a built target to S3 in the layout explorations read: <prefix>/train/*.png (unlabelled),
<prefix>/eval/<label>/*.png (the test split), <prefix>/target.json (roots and relevant synsets for
benchmarks) and <prefix>/train_labels.json (the train split's labels, read only by the trainer's
evaluation: the classifier is fitted on them and scored on eval/).

Only the target's own entries are uploaded: targets nest like their branches (targets/animals/ holds
targets/animals/birds/), and a child target must not leak into its parent's train split.
"""

from __future__ import annotations

from pathlib import Path

from services.common import settings as settings_mod
from services.common.objectstore import ObjectStore, parse_s3_uri
from services.offlineweb.targets import TARGET_FILE, TRAIN_LABELS_FILE

CONTENT_TYPES = {".png": "image/png", ".json": "application/json"}


def target_files(directory: Path) -> list[Path]:
    files = [directory / name for name in (TARGET_FILE, TRAIN_LABELS_FILE) if (directory / name).is_file()]
    for split in ("train", "eval"):
        if (directory / split).is_dir():
            files.extend(sorted(p for p in (directory / split).rglob("*") if p.is_file()))
    return files


def upload_target(directory: Path, uri: str, store: ObjectStore | None = None) -> tuple[str, int]:
    """Uploads the target in `directory` under the s3:// URI; returns (uri, objects uploaded)."""
    bucket, prefix = parse_s3_uri(uri)
    files = target_files(directory)
    if not any(p.parent.name == "train" for p in files):
        raise ValueError(f"{directory}: no train/ images to upload (build the target first)")
    if store is None:
        settings = settings_mod.load_service_settings(settings_mod.ServiceSettings, "offlineweb")
        store = ObjectStore.from_settings(settings)
    store.ensure_bucket(bucket)
    for path in files:
        key = f"{prefix}/{path.relative_to(directory).as_posix()}" if prefix else path.relative_to(directory).as_posix()
        store.put_bytes(bucket, key, path.read_bytes(), content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", len(files)
