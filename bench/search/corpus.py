"""A 20k-image search corpus with distinct, varied captions, generated once and cached.

Captions combine adjectives, objects and scenes ("a fluffy orange cat on a wooden table, close-up
photo"), so that no two images share one and MiniLM sees realistic caption lengths (6-16 words).
Records point at remote URLs (like a parquet of url,caption): search latency does not depend on
where the bytes live, and no 20k files need writing. Queries are "descriptor concept" pairs, the
shape the planner sends ("baby duck").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from services.search.corpus import CorpusRecord, load_corpus, write_corpus

ADJECTIVES = (
    "red orange yellow green blue purple pink brown black white grey golden silver striped spotted fluffy "
    "shiny rusty wooden metal plastic glass ceramic tiny small large huge old new vintage modern broken wet "
    "dry frozen hot cold bright dark colourful pale wild domestic young baby adult sleeping running flying"
).split()
OBJECTS = (
    "cat dog duck goose swan owl eagle parrot penguin horse cow sheep goat pig rabbit fox wolf bear lion tiger "
    "elephant giraffe zebra monkey frog turtle snake lizard fish shark whale dolphin octopus crab butterfly bee "
    "ant spider apple banana orange lemon strawberry cherry grape pear peach pineapple watermelon tomato carrot "
    "potato onion mushroom broccoli pumpkin corn bread cake pizza burger sandwich cookie donut cheese egg "
    "coffee cup teapot bottle glass plate bowl spoon fork knife chair table sofa bed lamp clock mirror door "
    "window car truck bus bicycle motorcycle train airplane boat ship tractor rocket umbrella hat shoe boot "
    "glove scarf jacket dress shirt bag backpack guitar piano violin drum trumpet book pencil camera phone "
    "laptop television radio robot teddy-bear ball kite balloon flower rose tulip sunflower tree palm cactus "
    "leaf mountain river lake beach island volcano bridge castle church tower house barn lighthouse windmill"
).split()
SCENES = (
    "on a wooden table|in the grass|on the beach|in the snow|in a kitchen|on a white background|in a forest|"
    "on a city street|in the rain|at sunset|under water|in a garden|on a shelf|in a field|on a plate|"
    "in the sky|next to a window|in a museum|on a farm|in the desert|at night|in a classroom|on a boat|"
    "in a market|on a mountain"
).split("|")
STYLES = ("photo", "close-up photo", "drawing", "cartoon", "emoji", "clip art", "painting", "3d render", "sketch", "icon")
TEMPLATES = (
    "a {adj} {obj} {scene}, {style}",
    "{style} of a {adj} {obj} {scene}",
    "two {adj} {obj}s {scene}",
    "a {adj} {adj2} {obj} {scene}",
    "{obj} {scene} ({style}, {adj})",
)
FORMAT_VERSION = "v1"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iex" / "bench-search" / FORMAT_VERSION


def captions(count: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        adj, adj2 = (ADJECTIVES[int(i)] for i in rng.choice(len(ADJECTIVES), 2, replace=False))
        text = template.format(
            adj=adj,
            adj2=adj2,
            obj=OBJECTS[int(rng.integers(len(OBJECTS)))].replace("-", " "),
            scene=SCENES[int(rng.integers(len(SCENES)))],
            style=STYLES[int(rng.integers(len(STYLES)))],
        )
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def queries(count: int, seed: int = 11) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]} {OBJECTS[int(rng.integers(len(OBJECTS)))].replace('-', ' ')}" for _ in range(count)]


def ensure_corpus(images: int) -> Path:
    folder = cache_root() / f"corpus-{images}"
    if not (folder / "corpus.jsonl").is_file():
        records = (
            CorpusRecord(id=f"img-{i:07d}", file="", url=f"https://images.example/{i:07d}.jpg", caption=caption)
            for i, caption in enumerate(captions(images))
        )
        write_corpus(folder, records)
    load_corpus(folder)  # validates
    return folder
