"""What bytes an accepted image is stored as.

Invariant: `hashing.pixel_sha256(stored bytes) == the object's key`, so every reader that decodes
with `hashing.decode_image` sees exactly the pixels dedup identified.

- Plain JPEGs (RGB or greyscale, no EXIF rotation) keep their original bytes, minus the metadata
  segments (EXIF with its GPS position, XMP, IPTC, comments). Re-encoding a JPEG would lose quality
  and a lossless PNG of a photo is 3-5 times larger; removing segments leaves the compressed pixels
  untouched, and the result is re-hashed before it is trusted.
- Plain PNGs (RGB or greyscale, no transparency, one frame, no EXIF rotation) keep their original
  bytes minus the text, EXIF and time chunks: re-encoding them costs more CPU than the rest of the
  decision (bench/pipeline profile) and gives the same pixels. Also re-hashed before it is trusted.
- Everything else (palette PNGs, WebP, GIF, anything with alpha or rotation) is stored as a PNG of
  the normalised RGB pixels: lossless, so the invariant holds by construction, one format for
  readers, no metadata carried over.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from services.dedup.hashing import DecodedImage, ImageRejected, decode_image, pixel_sha256_of

# APP1 (EXIF, XMP), APP13 (Photoshop/IPTC) and COM segments; APP0 (JFIF), APP2 (ICC) and APP14
# (Adobe colour transform) change how pixels decode and are kept.
_DROPPED_JPEG_MARKERS = frozenset({0xE1, 0xED, 0xFE})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS, _EOI = 0xDA, 0xD9

PNG_COMPRESS_LEVEL = 6


@dataclass(frozen=True)
class StoredEncoding:
    data: bytes
    content_type: str
    # Bounded label recorded in metadata: "jpeg-original" or "png-normalised".
    label: str


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """The JPEG without metadata segments; None when its structure is not what we expect."""
    if data[:2] != b"\xff\xd8":
        return None
    out = [b"\xff\xd8"]
    i = 2
    n = len(data)
    while i < n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == _SOS:
            # Entropy-coded data (and any later scans) are copied untouched.
            out.append(b"\xff\xda" + data[i:])
            return b"".join(out)
        if marker == _EOI:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if marker in _STANDALONE_MARKERS:
            out.append(bytes((0xFF, marker)))
            continue
        if i + 2 > n:
            return None
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2 or i + length > n:
            return None
        if marker not in _DROPPED_JPEG_MARKERS:
            out.append(bytes((0xFF, marker)) + data[i : i + length])
        i += length
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary chunks that carry text, EXIF (position, orientation) or a timestamp; none changes pixels.
_DROPPED_PNG_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"})


def strip_png_metadata(data: bytes) -> bytes | None:
    """The PNG without text, EXIF and time chunks; None when its chunk structure is not what we expect."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out = [_PNG_SIGNATURE]
    i, n = len(_PNG_SIGNATURE), len(data)
    while i + 12 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > n or not kind.isalpha():
            return None
        if kind not in _DROPPED_PNG_CHUNKS:
            out.append(data[i:end])
        i = end
        if kind == b"IEND":
            return b"".join(out)
    return None


def encode_png(decoded: DecodedImage) -> bytes:
    buffer = io.BytesIO()
    decoded.rgb.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# Format -> (metadata stripper, content type, label) of the originals that are kept.
_ORIGINALS = {
    "JPEG": (strip_jpeg_metadata, "image/jpeg", "jpeg-original"),
    "PNG": (strip_png_metadata, "image/png", "png-original"),
}


def _keeps_original(decoded: DecodedImage) -> bool:
    return (
        decoded.source_format in _ORIGINALS
        and decoded.source_mode in ("RGB", "L")
        and not decoded.had_alpha
        and not decoded.transposed
        and decoded.frames == 1
    )


def encode_for_storage(original: bytes, decoded: DecodedImage, pixel_sha256: str, max_pixels: int) -> StoredEncoding:
    if _keeps_original(decoded):
        strip, content_type, label = _ORIGINALS[decoded.source_format]
        stripped = strip(original)
        if stripped is not None:
            # Nothing stripped: the very bytes the key was computed from, no second decode needed.
            same = stripped == original
            if not same:
                try:
                    same = pixel_sha256_of(decode_image(stripped, max_pixels).rgb) == pixel_sha256
                except ImageRejected:
                    same = False
            if same:
                return StoredEncoding(stripped, content_type, label)
    return StoredEncoding(encode_png(decoded), "image/png", "png-normalised")
