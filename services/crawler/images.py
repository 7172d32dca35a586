"""Checks and normalises downloaded image bytes: magic bytes, decompression-bomb guard, size policy, resize.

Pure functions on bytes, so the downloader runs them in a thread pool and a benchmark can call them
directly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from services.crawler import status

JPEG, PNG, WEBP, GIF = "JPEG", "PNG", "WEBP", "GIF"
CONTENT_TYPES = {JPEG: "image/jpeg", PNG: "image/png", WEBP: "image/webp", GIF: "image/gif"}

# Content types a server may honestly send for an image; anything else (text/html for an error page
# named .jpg, application/json, ...) is refused before the body is read.
_NEUTRAL_CONTENT_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}

_EXIF_ORIENTATION = 0x0112

# Longest magic prefix we look at (WebP: "RIFF" + size + "WEBP").
MAGIC_BYTES_NEEDED = 12


def sniff_format(head: bytes) -> str | None:
    """The image format announced by the first bytes, or None when they are not an image we accept."""
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    return None


def media_type(content_type_header: str | None) -> str:
    """'image/JPEG; charset=x' -> 'image/jpeg'."""
    return (content_type_header or "").split(";", 1)[0].strip().lower()


def content_type_acceptable(content_type_header: str | None) -> bool:
    kind = media_type(content_type_header)
    return kind.startswith("image/") or kind in _NEUTRAL_CONTENT_TYPES


@dataclass(frozen=True)
class ImagePolicy:
    # Refuse images whose header announces more pixels than this, before decoding a single one.
    max_pixels: int = 40_000_000
    min_side: int = 32
    max_aspect: float = 4.0
    # Longest side of the staged image; larger images are downscaled (never upscaled).
    max_side: int = 256
    jpeg_quality: int = 90


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    content_type: str
    width: int
    height: int
    # Size of the image as published, before any resize.
    source_width: int
    source_height: int
    reencoded: bool


class ImageRefused(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size an image is staged at: longest side max_side, ratio kept, never enlarged."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def process_image(raw: bytes, policy: ImagePolicy) -> ProcessedImage:
    """Validates and normalises one image; raises ImageRefused with a bounded reason."""
    kind = sniff_format(raw[:MAGIC_BYTES_NEEDED])
    if kind is None:
        raise ImageRefused(status.NOT_IMAGE, "magic bytes")
    try:
        # Restricting the decoder to the sniffed format stops a file from being parsed as something else.
        image = Image.open(io.BytesIO(raw), formats=[kind])
    except Image.DecompressionBombError as exc:
        raise ImageRefused(status.TOO_LARGE, str(exc)[:120]) from None
    except Exception as exc:  # noqa: BLE001 - malformed files make Pillow raise almost anything
        raise ImageRefused(status.DECODE_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}") from None
    with image:
        width, height = image.size
        # Only the header has been read so far: bombs and misfits are refused before any pixel is decoded.
        if width * height > policy.max_pixels:
            raise ImageRefused(status.TOO_LARGE, f"{width}x{height} pixels")
        if min(width, height) < policy.min_side:
            raise ImageRefused(status.TOO_SMALL, f"{width}x{height}")
        if max(width, height) / max(1, min(width, height)) > policy.max_aspect:
            raise ImageRefused(status.BAD_ASPECT, f"{width}x{height}")
        keep_original = kind in (JPEG, PNG) and max(width, height) <= policy.max_side
        try:
            if kind == JPEG and not keep_original:
                # DCT-domain downscaling: decodes a 4000 px JPEG at 1/8 the cost when we only keep 256 px.
                # Asked for the final size (not a max_side square, which the short side would never
                # reach), so every JPEG larger than twice the target decodes reduced.
                image.draft("RGB", target_size(width, height, policy.max_side))
            image.load()
            if keep_original:
                # Already small and in a format we stage as is: the fetched bytes are the staged bytes.
                return ProcessedImage(raw, CONTENT_TYPES[kind], width, height, width, height, reencoded=False)
            return _reencode(image, kind, policy, width, height)
        except ImageRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever Pillow calls it
            raise ImageRefused(status.DECODE_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}") from None


def _reencode(image: Image.Image, kind: str, policy: ImagePolicy, source_width: int, source_height: int) -> ProcessedImage:
    alpha = _has_alpha(image)
    # PNG stays PNG and JPEG stays JPEG; GIF (graphics, palettes) becomes PNG; WebP becomes PNG only
    # when it carries transparency.
    out_format = PNG if kind in (PNG, GIF) or alpha else JPEG
    if kind in (JPEG, WEBP) and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    wanted_mode = "RGBA" if alpha and out_format == PNG else "RGB"
    if image.mode != wanted_mode:
        image = image.convert(wanted_mode)
    # Area averaging (BOX), like img2dataset's default INTER_AREA: the cheapest filter that does not
    # alias when shrinking, and resizing is most of the crawler's CPU time.
    size = target_size(image.width, image.height, policy.max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BOX)
    buffer = io.BytesIO()
    if out_format == JPEG:
        image.save(buffer, format=JPEG, quality=policy.jpeg_quality)
    else:
        image.save(buffer, format=PNG, compress_level=6)
    return ProcessedImage(
        buffer.getvalue(), CONTENT_TYPES[out_format], image.width, image.height, source_width, source_height, reencoded=True
    )
