"""Synthetic photo-like images with known near-duplicates, for the dedup benchmark and tests.

Nothing here is downloaded: every image is drawn from its own random stream, so the same seed always
gives the same set. Images come in *families* that share a palette and a background (the "same
concept"): members of a family look alike but are distinct pictures and must NOT be called
duplicates. Some originals get one variant each, of one of the kinds a web crawl returns:

    q60         re-encoded as JPEG quality 60
    half        resized to 0.5x
    crop5       5% of the width and of the height cut away (split at random between the two sides)
    recolour    brightness, contrast and saturation changed
    watermark   a semi-transparent text banner and logo painted over a corner

Images are written as files under `<dir>/images/` (mostly JPEG, some PNG, as on the web) with
`<dir>/manifest.json` naming each file's family, its original and its variant kind.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

# Bumped whenever drawing changes, so a cached set is regenerated.
GENERATOR_VERSION = 3

VARIANT_KINDS = ("q60", "half", "crop5", "recolour", "watermark")

_WORDS = ("SALE", "photo", "garden", "2019", "holiday", "menu", "street", "Nº 7", "open", "market", "cafe", "river")
_ASPECTS = ((4, 3), (3, 2), (1, 1), (3, 4), (16, 9))


@dataclass(frozen=True)
class Item:
    name: str
    family: int
    # Name of the original this file is a variant of; "" for originals.
    original: str = ""
    # One of VARIANT_KINDS for variants; "" for originals.
    kind: str = ""


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """n colours around a random hue, as real scenes have: a dominant tone and a few accents."""
    base = rng.uniform(0, 1)
    hues = (base + rng.normal(0, 0.12, n) + (rng.uniform(0, 1, n) < 0.3) * rng.uniform(0.3, 0.7, n)) % 1.0
    sats = rng.uniform(0.25, 0.9, n)
    vals = rng.uniform(0.3, 0.95, n)
    hsv = np.stack([hues * 255, sats * 255, vals * 255], axis=-1).astype(np.uint8).reshape(1, n, 3)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB")).reshape(n, 3).astype(np.float64)


def _smooth_field(rng: np.random.Generator, width: int, height: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency variation (light, shading): a coarse random grid upsampled bicubically."""
    grid = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    field = Image.fromarray(grid, "F").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float64) * amplitude


@dataclass(frozen=True)
class Family:
    palette: np.ndarray
    angle: float
    seed: int


def new_family(seed: int) -> Family:
    rng = np.random.default_rng([seed, 0xFA])
    return Family(palette=_palette(rng, 5), angle=float(rng.uniform(0, 2 * math.pi)), seed=seed)


def draw_scene(family: Family, member: int) -> Image.Image:
    """One picture of a family: its palette and lighting, its own composition."""
    rng = np.random.default_rng([family.seed, member, 0x5C])
    aw, ah = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    long_side = int(rng.integers(320, 641))
    width, height = (long_side, max(64, long_side * ah // aw)) if aw >= ah else (max(64, long_side * aw // ah), long_side)

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = family.angle + rng.normal(0, 0.35)
    t = (x * math.cos(angle) + y * math.sin(angle)) / max(width, height)
    t = (t - t.min()) / max(1e-6, t.max() - t.min())
    a, b = family.palette[0], family.palette[1]
    background = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    background += _smooth_field(rng, width, height, 5, 28)[..., None]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")

    overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(4, 11))):
        colour = family.palette[int(rng.integers(2, 5))] + rng.normal(0, 18, 3)
        fill = (*np.clip(colour, 0, 255).astype(int).tolist(), int(rng.integers(150, 256)))
        cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        r = rng.uniform(0.06, 0.35) * min(width, height)
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5)], fill=fill)
        elif shape == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.3, 1.2), cx + r * rng.uniform(0.5, 1.5), cy + r], fill=fill)
        elif shape == 2:
            n = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = r * rng.uniform(0.5, 1.2, n)
            draw.polygon([(cx + rr * math.cos(q), cy + rr * math.sin(q)) for q, rr in zip(angles, radii)], fill=fill)
        else:
            draw.line([(cx, cy), (cx + rng.normal(0, r * 2), cy + rng.normal(0, r * 2))], fill=fill, width=int(rng.integers(3, 14)))
    if rng.uniform() < 0.35:
        font = ImageFont.load_default(size=int(rng.integers(16, 44)))
        text = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 3))))
        ink = tuple(int(v) for v in np.clip(family.palette[int(rng.integers(5))] * 0.4, 0, 255)) + (230,)
        draw.text((rng.uniform(0, 0.7) * width, rng.uniform(0, 0.85) * height), text, fill=ink, font=font)
    image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")

    # Shading over the composition, lens softness, then sensor grain.
    pixels = np.asarray(image, dtype=np.float64) + _smooth_field(rng, width, height, 3, 14)[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    grain = rng.normal(0, rng.uniform(2, 7), (height, width, 1))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8), "RGB")


def make_variant(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """The picture as another site would serve it; JPEG quality is applied when the file is written."""
    width, height = image.size
    if kind == "q60":
        return image
    if kind == "half":
        return image.resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.LANCZOS)
    if kind == "crop5":
        cut_w, cut_h = round(width * 0.05), round(height * 0.05)
        left, top = int(rng.integers(0, cut_w + 1)), int(rng.integers(0, cut_h + 1))
        return image.crop((left, top, left + width - cut_w, top + height - cut_h))
    if kind == "recolour":
        image = ImageEnhance.Brightness(image).enhance(float(rng.choice([rng.uniform(0.75, 0.88), rng.uniform(1.12, 1.3)])))
        image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.85, 1.15)))
        return ImageEnhance.Color(image).enhance(float(rng.uniform(0.6, 1.4)))
    if kind == "watermark":
        marked = image.convert("RGBA")
        layer = Image.new("RGBA", marked.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        font = ImageFont.load_default(size=max(12, width // 14))
        text = "© stockphotos" if rng.uniform() < 0.5 else "www.example-pics.com"
        box = draw.textbbox((0, 0), text, font=font)
        tw, th = box[2] - box[0], box[3] - box[1]
        corner = int(rng.integers(4))
        x = 8 if corner in (0, 2) else max(0, width - tw - 8)
        y = 8 if corner in (0, 1) else max(0, height - th - 12)
        draw.rectangle([x - 4, y - 2, x + tw + 4, y + th + 8], fill=(0, 0, 0, 90))
        draw.text((x, y), text, fill=(255, 255, 255, 170), font=font)
        logo = max(10, width // 12)
        draw.ellipse([width - logo - 10, 10, width - 10, 10 + logo], outline=(255, 255, 255, 160), width=3)
        return Image.alpha_composite(marked, layer).convert("RGB")
    raise ValueError(f"unknown variant kind {kind!r}")


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate(
    out_dir: Path,
    originals: int,
    variants: int,
    family_size: int = 4,
    seed: int = 2023,
    png_share: float = 0.1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Item]:
    """Writes `originals` pictures and `variants` variants (of distinct originals, kinds in turn) to out_dir."""
    if variants > originals:
        raise ValueError("each variant needs its own original")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0xBE])
    with_variant = set(rng.choice(originals, size=variants, replace=False).tolist())
    items: list[Item] = []
    kind_turn = 0
    total = originals + variants
    for index in range(originals):
        family_index = index // family_size
        family = new_family(seed * 1_000_003 + family_index)
        image = draw_scene(family, index % family_size)
        item_rng = np.random.default_rng([seed, index, 0x17])
        fmt = "PNG" if item_rng.uniform() < png_share else "JPEG"
        name = f"o{index:06d}.{'png' if fmt == 'PNG' else 'jpg'}"
        (out_dir / name).write_bytes(encode(image, fmt, quality=int(item_rng.integers(85, 96))))
        items.append(Item(name, family_index))
        if index in with_variant:
            kind = VARIANT_KINDS[kind_turn % len(VARIANT_KINDS)]
            kind_turn += 1
            variant = make_variant(image, kind, item_rng)
            vname = f"v{index:06d}-{kind}.jpg"
            (out_dir / vname).write_bytes(encode(variant, "JPEG", quality=60 if kind == "q60" else int(item_rng.integers(80, 93))))
            items.append(Item(vname, family_index, original=name, kind=kind))
        if progress is not None:
            progress(len(items), total)
    return items


def manifest_path(root: Path) -> Path:
    return root / "manifest.json"


def images_dir(root: Path) -> Path:
    return root / "images"


def load_or_generate(root: Path, originals: int, variants: int, seed: int, progress: Callable[[int, int], None] | None = None) -> list[Item]:
    """The cached set under root when it was made with the same parameters, else a fresh one."""
    wanted = {"generator_version": GENERATOR_VERSION, "originals": originals, "variants": variants, "seed": seed}
    path = manifest_path(root)
    out_dir = images_dir(root)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("parameters") == wanted and all((out_dir / i["name"]).exists() for i in saved["items"]):
            return [Item(**i) for i in saved["items"]]
        path.unlink()
    if out_dir.exists():
        for old in out_dir.iterdir():
            if old.suffix in (".jpg", ".png"):
                old.unlink()
    items = generate(out_dir, originals, variants, seed=seed, progress=progress)
    path.write_text(json.dumps({"parameters": wanted, "items": [asdict(i) for i in items]}))
    return items


def duplicate_pairs(items: list[Item]) -> Iterator[tuple[str, str, str]]:
    """(original, variant, kind) for every known duplicate pair."""
    for item in items:
        if item.original:
            yield item.original, item.name, item.kind
