"""A tiny, deterministic offline web of concept images ("red circle", "blue star", ...) and targets.

Every image is rendered from its own random stream, seeded by (seed, purpose, concept, index), so
the same arguments always give byte-identical files, a concept renders the same whatever other
concepts are requested, and targets (other purposes) never repeat a corpus image while sharing its
visual distribution: colour jitter, noisy tinted background, position, size and rotation.

    python -m services.search.synthetic corpus OUT_DIR --per-concept 8
    python -m services.search.synthetic target OUT_DIR --concepts "red circle,orange circle"
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from services.search.corpus import CorpusRecord, write_corpus

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (40, 165, 55),
    "blue": (35, 80, 215),
    "purple": (135, 50, 185),
}
SHAPES = ("circle", "square", "triangle", "star")
CONCEPTS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
CAPTION_TEMPLATES = (
    "a photo of a {c}",
    "{c} drawing",
    "a {c} on a plain background",
    "clip art of a {c}",
    "a small {c} icon",
    "an image of a {c}",
)
LICENSE = "CC0-1.0"
# The train split's labels (services.offlineweb.targets.TRAIN_LABELS_FILE: not imported, the search
# service does not depend on the offline-web tooling).
TRAIN_LABELS_FILE = "train_labels.json"

# Random streams: one per purpose, so corpus and target images never coincide.
_CORPUS, _TARGET_TRAIN, _TARGET_EVAL = 0, 1, 2
_SUPERSAMPLE = 3  # draw large and downsample: anti-aliased edges like real clip art


def parse_concept(concept: str) -> tuple[str, str]:
    """'red circle' -> ('red', 'circle'); raises ValueError for anything the renderer cannot draw."""
    parts = concept.strip().lower().split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise ValueError(f"unknown concept {concept!r}: expected '<colour> <shape>' with colour in {sorted(COLOURS)} and shape in {list(SHAPES)}")
    return parts[0], parts[1]


def slug(concept: str) -> str:
    return "-".join(concept.strip().lower().split())


def label_of(concept: str) -> str:
    """Evaluation folder name of a concept ('red circle' -> 'red_circle')."""
    return "_".join(concept.strip().lower().split())


def _rng(seed: int, purpose: int, concept: str, index: int) -> np.random.Generator:
    # crc32 of the name, not its position in a list: a concept's images do not depend on the others requested.
    return np.random.default_rng([seed, purpose, zlib.crc32(concept.encode()), index])


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4) + k * math.pi / 2 for k in range(4)]
        radii = [r] * 4
    elif shape == "triangle":
        corners = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r] * 3
    elif shape == "star":
        corners = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    else:
        raise ValueError(f"not a polygon: {shape}")
    return [(cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle)) for a, rad in zip(corners, radii)]


def render(concept: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image of the concept, every free parameter drawn from rng."""
    colour, shape = parse_concept(concept)
    big = size * _SUPERSAMPLE
    grey = rng.uniform(35, 225)
    tint = rng.uniform(-18, 18, size=3)
    background = np.clip(grey + tint, 0, 255)
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = background
    # A gentle gradient so backgrounds are not flat.
    gradient = np.linspace(-1.0, 1.0, big, dtype=np.float32)[:, None, None] * rng.uniform(-20, 20)
    canvas += gradient
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")

    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.uniform(-20, 20, size=3), 0, 255))
    r = rng.uniform(0.2, 0.38) * big
    cx = rng.uniform(r, big - r)
    cy = rng.uniform(r, big - r)
    angle = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=fill)
    image = image.resize((size, size), Image.LANCZOS)

    # Sensor-like noise after downsampling, so it survives at the final resolution.
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 10), size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def make_corpus(out_dir: str | Path, per_concept: int = 8, concepts: Sequence[str] = CONCEPTS, seed: int = 0, size: int = 64) -> list[CorpusRecord]:
    """Writes images/<id>.png and corpus.jsonl under out_dir; returns the records."""
    if per_concept < 1:
        raise ValueError("per_concept must be >= 1")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for concept in concepts:
        parse_concept(concept)
        for index in range(per_concept):
            rng = _rng(seed, _CORPUS, concept, index)
            data = png_bytes(render(concept, rng, size))
            image_id = f"{slug(concept)}-{index:04d}"
            file = f"images/{image_id}.png"
            (out / file).write_bytes(data)
            caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(c=concept)
            records.append(
                CorpusRecord(id=image_id, file=file, caption=caption, concept=concept, license=LICENSE, sha256=hashlib.sha256(data).hexdigest())
            )
    write_corpus(out, records)
    return records


def make_target(
    out_dir: str | Path, concepts: Sequence[str], n_train: int = 16, n_eval: int = 8, seed: int = 1, size: int = 64
) -> dict:
    """Writes a target set: train/*.png (unlabelled), eval/<label>/*.png (the test split), n_train
    and n_eval per concept, and train_labels.json, the train split's labels, which only the
    trainer's evaluation reads (the paper's protocol: classifiers fitted on train, scored on eval),
    in the format of services.offlineweb.targets.

    Images come from random streams the corpus never uses, so no target image equals a corpus image.
    Returns the summary also written to target.json.
    """
    if not concepts:
        raise ValueError("a target needs at least one concept")
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be >= 0")
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    summary: dict = {"concepts": list(concepts), "seed": seed, "size": size, "train": 0, "eval": {}, "train_labels": {}}
    train_labels: dict[str, str] = {}
    for concept in concepts:
        parse_concept(concept)
        label = label_of(concept)
        for index in range(n_train):
            image = render(concept, _rng(seed, _TARGET_TRAIN, concept, index), size)
            (out / "train" / f"{label}-{index:04d}.png").write_bytes(png_bytes(image))
            train_labels[f"train/{label}-{index:04d}.png"] = label
        summary["train"] += n_train
        summary["train_labels"][label] = n_train
        if n_eval:
            (out / "eval" / label).mkdir(parents=True, exist_ok=True)
        for index in range(n_eval):
            image = render(concept, _rng(seed, _TARGET_EVAL, concept, index), size)
            (out / "eval" / label / f"{index:04d}.png").write_bytes(png_bytes(image))
        summary["eval"][label] = n_eval
    (out / "target.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    labels_doc = {"format": 1, "branch": "synthetic", "label_by": "concept", "labels": dict(sorted(train_labels.items()))}
    (out / TRAIN_LABELS_FILE).write_text(json.dumps(labels_doc, indent=1, sort_keys=True) + "\n")
    return summary


def _concept_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.search.synthetic", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    corpus = commands.add_parser("corpus", help="write a searchable corpus (corpus.jsonl + images/)")
    corpus.add_argument("out_dir")
    corpus.add_argument("--per-concept", type=int, default=8)
    corpus.add_argument("--concepts", default=",".join(CONCEPTS), help="comma-separated '<colour> <shape>' concepts (default: all 24)")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--size", type=int, default=64)
    target = commands.add_parser("target", help="write a target set (train/ + eval/<label>/ + train_labels.json)")
    target.add_argument("out_dir")
    target.add_argument("--concepts", required=True, help="comma-separated concepts, e.g. 'red circle,orange circle'")
    target.add_argument("--train-per-concept", type=int, default=16)
    target.add_argument("--eval-per-concept", type=int, default=8)
    target.add_argument("--seed", type=int, default=1)
    target.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        if args.command == "corpus":
            records = make_corpus(args.out_dir, args.per_concept, _concept_list(args.concepts), args.seed, args.size)
            print(json.dumps({"corpus": str(args.out_dir), "images": len(records)}))
        else:
            summary = make_target(args.out_dir, _concept_list(args.concepts), args.train_per_concept, args.eval_per_concept, args.seed, args.size)
            print(json.dumps({"target": str(args.out_dir), **summary}))
    except ValueError as exc:
        print(f"synthetic: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
