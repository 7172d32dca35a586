"""Every image of the offline web, whatever its source format, becomes the same thing: an RGB PNG, no
side longer than MAX_SIDE, transparency composited on white.

Why white and RGB: the stamps and emoji are cut-outs on transparent backgrounds, and what sits under
transparent pixels is arbitrary (often black), so every consumer would have to composite anyway; the
trainer and scorer composite on white (services/trainer/data.py), which is also how the pretrained
encoder classifies Tux Paint photos correctly. Doing it once here keeps the corpus, the targets and
the dedup hashes consistent. Images are never upscaled (64 px emoji stay 64 px).

Determinism: the same source bytes give the same PNG bytes for a given Pillow, zlib, cairo and
cairosvg (their versions are recorded in the manifest): no timestamps or text chunks are written.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 256
BACKGROUND = (255, 255, 255)
NOTO_FONT_SIZE = 109  # NotoColorEmoji is a bitmap font: its only strike is 109 px (136x128 glyphs)
PNG_COMPRESS_LEVEL = 6
MAX_SVG_BYTES = 8 * 1024 * 1024
MAX_SOURCE_PIXELS = 64 * 1024 * 1024

_DOCTYPE = re.compile(rb"<!DOCTYPE[^\[>]*(\[(.*?)\])?\s*>", re.S)
_ENTITY = re.compile(rb'<!ENTITY\s+([A-Za-z_][\w.-]*)\s+"([^"&<%]*)"\s*>')


class RenderError(ValueError):
    """The source image cannot be turned into a corpus image. `code` is a short, bounded reason
    (counted in the manifest); the message says more."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


def flatten(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """RGB on white, longer side at most `max_side` (Lanczos), aspect ratio kept."""
    if image.width < 1 or image.height < 1:
        raise RenderError("empty", f"{image.width}x{image.height}")
    if image.width * image.height > MAX_SOURCE_PIXELS:
        raise RenderError("too-large", f"{image.width}x{image.height}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return rgb


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def is_blank(image: Image.Image) -> bool:
    """Nothing drawn: a single colour everywhere (a missing glyph, an SVG whose shapes all failed)."""
    lo_hi = image.convert("RGB").getextrema()
    return all(lo == hi for lo, hi in lo_hi)


def raster(path: Path, max_side: int = MAX_SIDE) -> bytes:
    """PNG, WebP, ... file -> corpus PNG bytes."""
    try:
        with Image.open(path) as image:
            image.load()
            flat = flatten(image, max_side)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise RenderError("undecodable", str(exc)[:200]) from exc
    if is_blank(flat):
        raise RenderError("blank")
    return png_bytes(flat)


def expand_internal_entities(svg: bytes) -> bytes:
    """Inline the plain string entities of an internal DTD subset and drop the DOCTYPE.

    Adobe Illustrator SVGs declare their namespaces as entities (&ns_svg;), which the safe XML parser
    of cairosvg refuses. Only literal values without markup or references are expanded, once, so no
    entity can grow into another (no billion laughs) and nothing external is ever resolved.
    """
    doctype = _DOCTYPE.search(svg[:65536])
    if not doctype:
        return svg
    entities = dict(_ENTITY.findall(doctype.group(2) or b""))
    body = svg[: doctype.start()] + svg[doctype.end() :]
    for name, value in entities.items():
        body = body.replace(b"&" + name + b";", value)
    return body


def svg(path: Path, max_side: int = MAX_SIDE) -> bytes:
    """SVG file -> corpus PNG bytes, the longer side at `max_side`. External resources are never
    fetched (cairosvg's safe mode allows data: URLs only)."""
    import cairosvg  # heavy import, only where vectors are rendered

    data = path.read_bytes()
    if len(data) > MAX_SVG_BYTES:
        raise RenderError("too-large", f"svg larger than {MAX_SVG_BYTES} bytes")
    data = expand_internal_entities(data)
    has_text = b"<text" in data or b":text" in data
    if has_text:
        _reset_font_caches()
    # Drawings with text keep the two-pass path: the glyph metrics of a height-bounded drawing depend
    # on the width-bounded one drawn before it (cairo's shared FreeType faces), so drawing it once
    # would change the bytes of 18 corpus images. They are 206 of the 5,923 SVGs.
    probed = None if has_text else _probe(data, max_side)
    try:
        if probed is not None:
            # One parse, one drawing, bounded by the longer side.
            tree, height = probed
            bound = {"output_height": max_side} if height > max_side else {"output_width": max_side}
            with Image.open(io.BytesIO(_draw(tree, bound))) as image:
                image.load()
                flat = flatten(image, max_side)
        else:
            first = cairosvg.svg2png(bytestring=data, output_width=max_side, unsafe=False)
            with Image.open(io.BytesIO(first)) as image:
                image.load()
                if image.height > max_side:  # taller than wide: bound the height instead
                    second = cairosvg.svg2png(bytestring=data, output_height=max_side, unsafe=False)
                    with Image.open(io.BytesIO(second)) as tall:
                        tall.load()
                        flat = flatten(tall, max_side)
                else:
                    flat = flatten(image, max_side)
    except RenderError:
        raise
    except Exception as exc:  # noqa: BLE001 - cairosvg raises anything from XML, CSS and cairo errors
        raise RenderError("svg-error", f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if is_blank(flat):
        raise RenderError("blank")
    return png_bytes(flat)


def _probe(data: bytes, width: int):
    """(parsed tree, the pixel height of the drawing `width` wide), found without drawing; None when
    anything fails (the caller then renders through cairosvg.svg2png, which reports the error).

    cairosvg's own PNG surface runs its size computation (node_format, aspect ratio, rounding) on a
    1x1 cairo surface and skips `draw`; `_draw` then draws the same tree exactly as svg2png does
    (parse, PNGSurface(tree, output, dpi 96), finish). Before, a drawing taller than wide was drawn
    twice (width-bounded to find its height, then height-bounded) and every SVG was parsed once per
    drawing: half the openclipart drawings are tall, and this cut their render CPU by ~35%
    (docs/offline-web.md), same bytes."""
    try:
        import cairocffi
        from cairosvg.parser import Tree
        from cairosvg.surface import PNGSurface

        class SizeProbe(PNGSurface):
            def _create_surface(self, width, height):
                return cairocffi.ImageSurface(cairocffi.FORMAT_ARGB32, 1, 1), int(round(width)), int(round(height))

            def draw(self, node):
                pass

        tree = Tree(bytestring=data, unsafe=False)
        return tree, int(SizeProbe(tree, None, 96, output_width=width).height)
    except Exception:  # noqa: BLE001 - only an optimisation: the svg2png path decides and reports
        return None


def _draw(tree, bound: dict) -> bytes:
    """What cairosvg.svg2png(bytestring=..., unsafe=False, **bound) returns, from an already parsed tree."""
    from cairosvg.surface import PNGSurface

    out = io.BytesIO()
    PNGSurface(tree, out, 96, **bound).finish()
    return out.getvalue()


def _reset_font_caches() -> None:
    """Forget cairo's font caches before drawing text. Glyph metrics of cairo's FreeType backend
    depend on which sizes of a face were used before (a shared FT_Face), so the same SVG came out
    differently after other renders in the same process; starting each text render from empty caches
    makes its bytes independent of what the worker drew earlier."""
    import cairocffi

    cairocffi.cairo.cairo_debug_reset_static_data()


@lru_cache(maxsize=2)
def _noto_font(path: str) -> ImageFont.FreeTypeFont:
    # RAQM shapes ZWJ sequences, flags and keycaps into their single ligature glyphs.
    return ImageFont.truetype(path, NOTO_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def emoji_glyph(font_path: Path, text: str, max_side: int = MAX_SIDE) -> bytes:
    """One emoji drawn with a colour bitmap font at its native strike -> corpus PNG bytes."""
    font = _noto_font(str(font_path))
    left, top, right, bottom = font.getbbox(text)
    if right <= left or bottom <= top:
        raise RenderError("no-glyph")
    canvas = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), text, font=font, embedded_color=True)
    if canvas.getextrema()[3][1] == 0:
        raise RenderError("no-glyph")
    flat = flatten(canvas, max_side)
    if is_blank(flat):
        raise RenderError("blank")
    return png_bytes(flat)
