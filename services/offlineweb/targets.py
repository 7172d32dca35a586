"""Targets from the Tux Paint photos: any branch of the stamp folders (food/fruit, animals/birds,
animals) becomes an unlabelled train split, a labelled eval split, and its WordNet roots.

Relevance ground truth: a web image is relevant to a target when its synset lies in the subtree of
one of the target's roots. The roots of a branch (one rule for every branch, nothing tuned to one):

  For the branch folder and each folder below it that holds photos (at any depth), with P the
  synsets of the photos at or below that folder:
    1. folder name: of the noun senses of the folder's name ("birds" -> bird), the sense whose
       subtree holds the most of P; it is a root when it holds more than half of P;
    2. else majority: the deepest synset that is an ancestor (or self) of more than half of P, unless
       it is too general to mean anything (fewer than MIN_ROOT_DEPTH steps below `entity`, e.g.
       `artifact`, `whole`, `object`).
  Folders below the branch contribute only with at least MIN_FOLDER_PHOTOS mapped photos (one photo
  is no evidence of a category: the teddy bear of animals/mammals/bears/toys does not make every toy
  an animal). Roots inside another root's subtree are dropped. A branch may have several roots
  (household: dish, tool, ...) or none (seasonal/christmas: no noun covers candles, puddings and
  trees); photos outside every root are listed as `uncovered` in target.json.

Splits, stratified by stamp folder: in each folder the photos are ranked by a hash of (seed, the
file's sha256) and the first round(eval_fraction * n) go to eval, the paper's test split (a folder
of one photo keeps it in train). A photo's split depends only on its own folder, never on the branch
asked for, so the same photo lands in the same split in animals/birds and in animals; a file found
twice in a branch is kept once.

Labels (the paper's evaluation protocol: a classifier fitted on the labelled train split, scored on
the test split): in `folder` mode a photo's label is its folder below the branch; a label with fewer
than MIN_CLASS_PHOTOS photos in either split is merged into its parent folder's label, up to the
branch itself (its label is the branch's last name: "other photos of the branch"). Photos whose
label still falls short are unlabelled: they stay (or return) in train, where self-supervised
training uses them, and are never tested. The train split's labels are written to
TRAIN_LABELS_FILE, which exploration and self-supervised training never read; the test split's
labels are its folder names, eval/<label>/.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping, Sequence

from services.offlineweb import render
from services.offlineweb.synsets import PHYSICAL_ENTITY, SynsetMapper, offset_of, tokens_of, wnid
from services.offlineweb.tuxpaint import Stamp

TARGETS_DIR = "targets"
TARGET_FILE = "target.json"
# Labels of the train split, for evaluation only (never read by exploration or training).
TRAIN_LABELS_FILE = "train_labels.json"
TARGET_ENTRIES = ("train", "eval", TARGET_FILE, TRAIN_LABELS_FILE)  # what belongs to one target inside its folder
# Half of each folder is held out: tiny targets need test images more than a few more train images.
DEFAULT_EVAL_FRACTION = 0.5
# A class is tested only with at least this many photos in each split.
MIN_CLASS_PHOTOS = 3
DEFAULT_SPLIT_SEED = "iex-offlineweb-split-v1"
MIN_ROOT_DEPTH = 6
MIN_FOLDER_PHOTOS = 2
LABEL_MODES = ("auto", "folder", "concept")
_BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_LABEL_UNSAFE = re.compile(r"[^a-z0-9_-]+")


class UnknownBranch(KeyError):
    """No folder of the stamps holds photos under this branch."""


@dataclass(frozen=True)
class Photo:
    path: str  # the stamp, relative to the stamps folder
    caption: str
    synset: str  # wnid, "" when the caption names no WordNet noun
    concept: str  # the matched lemma, else the cleaned file name
    sha256: str  # of the source file

    @property
    def folder(self) -> str:
        return str(PurePosixPath(self.path).parent)


@dataclass(frozen=True)
class Root:
    wnid: str
    lemma: str
    rule: str  # "folder-name" | "majority"
    folder: str  # the folder whose photos it was derived from
    photos: int  # mapped photos of that folder inside the root


@dataclass
class Target:
    """What relevance needs: the branch, its roots and the closed set of relevant synsets."""

    branch: str
    roots: tuple[Root, ...]
    relevant_synsets: frozenset[str]
    summary: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Target":
        """From a target directory or its target.json."""
        path = Path(path)
        if path.is_dir():
            path = path / TARGET_FILE
        data = json.loads(path.read_text())
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: Mapping) -> "Target":
        return cls(
            branch=data["branch"],
            roots=tuple(Root(**r) for r in data.get("roots", [])),
            relevant_synsets=frozenset(data.get("relevant_synsets", [])),
            summary=dict(data),
        )


def relevant(synset_wnid: str, target: Target | Mapping) -> bool:
    """Is a web image with this synset relevant to the target? An image without a synset never is."""
    if not synset_wnid:
        return False
    synsets = target.relevant_synsets if isinstance(target, Target) else frozenset(target.get("relevant_synsets", ()))
    return synset_wnid in synsets


def validate_branch(branch: str) -> str:
    branch = branch.strip().strip("/")
    if not branch or not _BRANCH.match(branch) or any(part in (".", "..") for part in branch.split("/")):
        raise ValueError(f"branch: {branch!r} is not a folder path such as food/fruit")
    if any(part in TARGET_ENTRIES for part in branch.split("/")):
        raise ValueError(f"branch: {branch!r} uses a name reserved for a target's own files ({', '.join(TARGET_ENTRIES)})")
    return branch


def _under(folder: str, branch: str) -> bool:
    return folder == branch or folder.startswith(branch + "/")


class Catalog:
    """The photos of the stamp package, with their synsets, and the branches they form."""

    def __init__(self, photos: Iterable[Photo], mapper: SynsetMapper) -> None:
        self.photos = tuple(sorted(photos, key=lambda p: p.path))
        self.mapper = mapper

    @classmethod
    def from_stamps(cls, stamps: Iterable[Stamp], stamps_root: Path, mapper: SynsetMapper) -> "Catalog":
        photos = []
        for stamp in stamps:
            if stamp.kind != "photo":
                continue
            match = mapper.map_texts([stamp.caption, stamp.name_text], mapper.context_roots(stamp.folder_words))
            photos.append(
                Photo(
                    path=stamp.path,
                    caption=stamp.caption,
                    synset=match.wnid if match else "",
                    concept=match.lemma if match else stamp.name_text,
                    sha256=hashlib.sha256((stamps_root / stamp.path).read_bytes()).hexdigest(),
                )
            )
        return cls(photos, mapper)

    def branches(self) -> dict[str, int]:
        """Every folder at or above a photo's folder -> photos at or below it, sorted by path."""
        counts: Counter[str] = Counter()
        for photo in self.photos:
            parts = PurePosixPath(photo.folder).parts
            for depth in range(1, len(parts) + 1):
                counts["/".join(parts[:depth])] += 1
        return dict(sorted(counts.items()))

    def photos_under(self, branch: str) -> list[Photo]:
        branch = validate_branch(branch)
        found = [p for p in self.photos if _under(p.folder, branch)]
        if not found:
            raise UnknownBranch(branch)
        return found

    def roots(self, branch: str) -> list[Root]:
        """The WordNet roots of `branch` by the rule of the module docstring."""
        photos = self.photos_under(branch)
        folders = sorted({"/".join(PurePosixPath(p.folder).parts[:d]) for p in photos for d in range(1, len(PurePosixPath(p.folder).parts) + 1)})
        folders = [f for f in folders if _under(f, branch)]
        found: list[Root] = []
        for folder in folders:
            mapped = [offset_of(p.synset) for p in photos if p.synset and _under(p.folder, folder)]
            if not mapped or (folder != branch and len(mapped) < MIN_FOLDER_PHOTOS):
                continue
            root = self._folder_name_root(folder, mapped) or self._majority_root(folder, mapped)
            if root is not None:
                found.append(root)
        return _outermost(found, self.mapper)

    def _folder_name_root(self, folder: str, mapped: Sequence[int]) -> Root | None:
        name = re.sub(r"^\d+_", "", PurePosixPath(folder).name).replace("_", " ")
        taxonomy = self.mapper.taxonomy
        best: tuple[int, int] | None = None  # (covered, sense)
        for lemma in self.mapper.index.base_forms(" ".join(tokens_of(name))):
            for sense in self.mapper.index.senses[lemma]:
                if not taxonomy.is_under(sense, PHYSICAL_ENTITY):
                    continue
                covered = sum(1 for m in mapped if taxonomy.is_under(m, sense))
                if best is None or covered > best[0]:
                    best = (covered, sense)
        if best is None or best[0] * 2 <= len(mapped):
            return None
        return Root(wnid(best[1]), taxonomy.lemma(best[1]), "folder-name", folder, best[0])

    def _majority_root(self, folder: str, mapped: Sequence[int]) -> Root | None:
        taxonomy = self.mapper.taxonomy
        votes: Counter[int] = Counter()
        for offset in mapped:
            for ancestor in {offset, *taxonomy.ancestors(offset)}:
                votes[ancestor] += 1
        majority = [a for a, n in votes.items() if n * 2 > len(mapped)]
        if not majority:
            return None
        # Deepest first; ties: more photos, then the lower offset (deterministic).
        best = max(majority, key=lambda a: (taxonomy.depth(a), votes[a], -a))
        if taxonomy.depth(best) < MIN_ROOT_DEPTH:
            return None
        return Root(wnid(best), taxonomy.lemma(best), "majority", folder, votes[best])

    def relevant_synsets(self, roots: Iterable[Root]) -> frozenset[str]:
        out: set[int] = set()
        for root in roots:
            out |= self.mapper.taxonomy.subtree(offset_of(root.wnid))
        return frozenset(wnid(o) for o in out)


def _outermost(roots: list[Root], mapper: SynsetMapper) -> list[Root]:
    """Drops roots that sit inside another root's subtree (and repeats), keeping folder order."""
    kept: list[Root] = []
    for root in roots:
        offset = offset_of(root.wnid)
        if any(offset_of(other.wnid) != offset and mapper.taxonomy.is_under(offset, offset_of(other.wnid)) for other in roots):
            continue
        if any(k.wnid == root.wnid for k in kept):
            continue
        kept.append(root)
    return kept


def label_mode(photos: Sequence[Photo], branch: str, requested: str) -> str:
    """'auto' is 'folder': a folder of photos is a category a person chose; the photos' concepts
    are nearly all singletons (26 photos of food/fruit, 26 concepts)."""
    if requested not in LABEL_MODES:
        raise ValueError(f"label_by: {requested!r} is not one of {', '.join(LABEL_MODES)}")
    return "folder" if requested == "auto" else requested


def assign_labels(photos: Sequence[Photo], held_out: set[str], branch: str, mode: str, min_photos: int = MIN_CLASS_PHOTOS) -> dict[str, str]:
    """Label of every photo path ("" for unlabelled) such that each label has at least
    `min_photos` photos in each split: folder labels are merged upwards until they do (see the
    module docstring); concept labels that fall short are dropped."""
    if mode == "concept":
        labels = {p.path: label_of(p, branch, "concept") for p in photos}
        return {path: (label if _split_counts(labels, held_out, label, min_photos) else "") for path, label in labels.items()}
    relative = {p.path: tuple(PurePosixPath(p.folder[len(branch) :].strip("/")).parts) for p in photos}
    while True:
        short = [g for g in set(relative.values()) if g and not _split_counts(relative, held_out, g, min_photos)]
        if not short:
            break
        deepest = max(short, key=lambda g: (len(g), g))
        for path, group in relative.items():
            if group == deepest:
                relative[path] = group[:-1]
    root_ok = _split_counts(relative, held_out, (), min_photos)
    out = {}
    for path, group in relative.items():
        if not group and not root_ok:
            out[path] = ""
            continue
        text = "-".join(group) or PurePosixPath(branch).name
        out[path] = _LABEL_UNSAFE.sub("_", text.lower()).strip("_") or "unlabelled"
    return out


def _split_counts(labels: Mapping[str, object], held_out: set[str], label: object, min_photos: int) -> bool:
    members = [path for path, value in labels.items() if value == label]
    test = sum(1 for path in members if path in held_out)
    return test >= min_photos and len(members) - test >= min_photos


def label_of(photo: Photo, branch: str, mode: str) -> str:
    if mode == "folder":
        relative = photo.folder[len(branch) :].strip("/") or PurePosixPath(branch).name
        text = relative.replace("/", "-")
    else:
        text = photo.concept.replace(" ", "_")
    return _LABEL_UNSAFE.sub("_", text.lower()).strip("_") or "unlabelled"


def split_key(content_sha256: str, seed: str) -> float:
    """A number in [0, 1) from a photo's content digest and the seed: its rank within its folder."""
    digest = hashlib.sha256(f"{seed}\x00{content_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(photos: Sequence[Photo], eval_fraction: float, seed: str) -> tuple[list[Photo], list[Photo]]:
    """(train, eval): in each stamp folder, the photos ranked by a hash of (seed, content), the first
    round(eval_fraction * n) held out (none from a folder of one photo). A file present twice in the
    branch is kept once."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: {eval_fraction} must be in [0, 1)")
    by_folder: dict[str, list[Photo]] = {}
    seen: set[str] = set()
    for photo in sorted(photos, key=lambda p: p.path):
        if photo.sha256 in seen:
            continue
        seen.add(photo.sha256)
        by_folder.setdefault(photo.folder, []).append(photo)
    held_out_paths: set[str] = set()
    for folder_photos in by_folder.values():
        ranked = sorted(folder_photos, key=lambda p: (split_key(p.sha256, seed), p.path))
        count = len(ranked)
        n_eval = min(count - 1, math.floor(eval_fraction * count + 0.5)) if count > 1 else 0
        held_out_paths.update(p.path for p in ranked[:n_eval])
    kept = [p for group in by_folder.values() for p in group]
    kept.sort(key=lambda p: p.path)
    return [p for p in kept if p.path not in held_out_paths], [p for p in kept if p.path in held_out_paths]


def write_target(
    catalog: Catalog,
    branch: str,
    out_dir: Path,
    image_bytes: Callable[[Photo], bytes],
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    seed: str = DEFAULT_SPLIT_SEED,
    label_by: str = "auto",
    provenance: Mapping | None = None,
) -> dict:
    """Writes <out_dir>/train/*.png, eval/<label>/*.png and target.json; returns target.json's content.

    Image files are named by their content hash: train names carry no label.
    """
    branch = validate_branch(branch)
    photos = catalog.photos_under(branch)
    roots = catalog.roots(branch)
    relevant_synsets = catalog.relevant_synsets(roots)
    mode = label_mode(photos, branch, label_by)
    train, held_out = split(photos, eval_fraction, seed)
    held_out_paths = {p.path for p in held_out}
    labels_of = assign_labels(train + held_out, held_out_paths, branch, mode)
    # A held-out photo that no class can test is worth more to training than to nobody.
    train = sorted(train + [p for p in held_out if not labels_of[p.path]], key=lambda p: p.path)
    held_out = [p for p in held_out if labels_of[p.path]]
    # Targets nest like their branches (targets/animals/ holds targets/animals/birds/), so only this
    # target's own train/, eval/ and target.json are replaced, never the folder.
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "train").mkdir(parents=True)
    records = []
    for split_name, chosen in (("train", train), ("eval", held_out)):
        for photo in chosen:
            data = image_bytes(photo)
            digest = hashlib.sha256(data).hexdigest()
            label = labels_of[photo.path]
            file = f"train/{digest[:16]}.png" if split_name == "train" else f"eval/{label}/{digest[:16]}.png"
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            (staging / file).write_bytes(data)
            records.append(
                {
                    "file": file,
                    "split": split_name,
                    "label": label,
                    "source": photo.path,
                    "caption": photo.caption,
                    "synset": photo.synset,
                    "concept": photo.concept,
                    "sha256": digest,
                    "relevant": relevant(photo.synset, Target(branch, (), relevant_synsets)),
                }
            )
    labels = Counter(r["label"] for r in records if r["split"] == "eval")
    train_labels = {r["file"]: r["label"] for r in records if r["split"] == "train" and r["label"]}
    (staging / TRAIN_LABELS_FILE).write_text(
        json.dumps({"format": 1, "branch": branch, "label_by": mode, "labels": dict(sorted(train_labels.items()))}, indent=1, sort_keys=True) + "\n"
    )
    summary = {
        "format": 1,
        "branch": branch,
        "roots": [asdict(r) for r in roots],
        "root_rule": "folder-name or majority per folder; see services/offlineweb/targets.py",
        "subtree_size": len(relevant_synsets),
        "relevant_synsets": sorted(relevant_synsets),
        "photos": len(records),
        "train": sum(1 for r in records if r["split"] == "train"),
        "eval": sum(1 for r in records if r["split"] == "eval"),
        "labels": dict(sorted(labels.items())),
        "train_labels": dict(sorted(Counter(train_labels.values()).items())),
        "min_class_photos": MIN_CLASS_PHOTOS,
        "label_by": mode,
        "split": {"eval_fraction": eval_fraction, "seed": seed, "rule": "per stamp folder: rank by sha256(seed, photo sha256), first round(fraction * n) held out"},
        "unmapped": sorted(r["source"] for r in records if not r["synset"]),
        "uncovered": sorted(r["source"] for r in records if r["synset"] and not r["relevant"]),
        "images": records,
        "provenance": dict(provenance or {}),
    }
    (staging / TARGET_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TARGET_ENTRIES:
        old = out_dir / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (staging / name).exists():
            (staging / name).rename(old)
    shutil.rmtree(staging, ignore_errors=True)
    return summary


def target_dir(data_dir: Path, branch: str) -> Path:
    return data_dir / TARGETS_DIR / validate_branch(branch)


def photo_image(stamps_root: Path, max_side: int = render.MAX_SIDE) -> Callable[[Photo], bytes]:
    """Normalised PNG bytes of a photo, each computed once (nested branches share photos)."""
    cache: dict[str, bytes] = {}

    def load(photo: Photo) -> bytes:
        if photo.sha256 not in cache:
            cache[photo.sha256] = render.raster(stamps_root / photo.path, max_side)
        return cache[photo.sha256]

    return load
