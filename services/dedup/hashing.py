"""Image identities: raw and pixel sha256, 64-bit perceptual hashes, and a guarded decoder.

The pixel identity of an image is what a viewer sees, independent of how the file is encoded:

    pixel_sha256 = sha256(b"%dx%d\\n" % (width, height) + RGB8 pixel bytes, row-major)

computed after EXIF orientation is applied and alpha is composited on white. A PNG re-encoded at
another compression level, a PNG with metadata stripped, or an RGBA image whose fully transparent
pixels carry different colours all get the same pixel sha. The size prefix keeps a 2x8 and a 4x4
image with the same bytes apart.

dHash and pHash are 64-bit integers (shown as 16 hex digits) of the same normalised pixels, for
near-duplicate and decontamination checks by Hamming distance.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Bumped whenever any hash below changes meaning; stored beside every hash so old caches are recomputed.
HASH_VERSION = "1"

DEFAULT_MAX_PIXELS = 40_000_000

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageRejected(ValueError):
    """The bytes are not an image this system accepts; `reason` is a short, bounded token."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image normalised to RGB, with what the normalisation had to change."""

    rgb: Image.Image
    source_format: str
    source_mode: str
    # Alpha was composited on white (or a transparent colour key replaced).
    had_alpha: bool
    # EXIF orientation was applied.
    transposed: bool
    # 1 for a still image, 2 for "more than one" (the first frame is the image).
    frames: int

    @property
    def width(self) -> int:
        return self.rgb.width

    @property
    def height(self) -> int:
        return self.rgb.height


def raw_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> DecodedImage:
    """Decodes the first frame and normalises it; raises ImageRejected with a bounded reason.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    claims to be 100k x 100k costs nothing (the decompression-bomb guard).
    """
    if not data:
        raise ImageRejected("empty")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels}")
            if min(width, height) < min_side:
                raise ImageRejected("too_small", f"{width}x{height} < {min_side}")
            source_format = (image.format or "UNKNOWN").upper()
            # is_animated looks at most one frame ahead; n_frames would walk every frame of a GIF.
            frames = 2 if getattr(image, "is_animated", False) else 1
            image.seek(0)
            image.load()
            source_mode = image.mode
            image, transposed = _apply_orientation(image)
            rgb, had_alpha = _to_rgb(image)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)[:200]) from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure (truncated, corrupt, unknown format) is one outcome
        raise ImageRejected("undecodable", f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    return DecodedImage(rgb=rgb, source_format=source_format, source_mode=source_mode, had_alpha=had_alpha, transposed=transposed, frames=frames)


def _apply_orientation(image: Image.Image) -> tuple[Image.Image, bool]:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: show the pixels as stored
        return image, False
    if orientation in (None, 1):
        return image, False
    try:
        return ImageOps.exif_transpose(image), True
    except Exception:  # noqa: BLE001 - an orientation Pillow cannot apply: show the pixels as stored
        return image, False


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (some PNGs): Pillow's convert() would clip at 255 and turn it white.
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(wide / 257.0, 0, 255).astype(np.uint8), mode="L").convert("RGB"), False
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB"), True
    if image.mode == "RGB":
        return image, False
    return image.convert("RGB"), False


def pixel_sha256_of(rgb: Image.Image) -> str:
    if rgb.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {rgb.mode}")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def pixel_sha256(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """sha256 of the normalised pixels of encoded image bytes (see the module docstring)."""
    return pixel_sha256_of(decode_image(data, max_pixels).rgb)


def _grey(rgb: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(rgb.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def _pack_bits(bits: np.ndarray) -> int:
    value = 0
    for bit in bits.reshape(-1):
        value = (value << 1) | int(bool(bit))
    return value


def dhash64(rgb: Image.Image) -> int:
    """Difference hash: is each pixel of a 9x8 greyscale thumbnail darker than its right neighbour."""
    grey = _grey(rgb, (9, 8))
    return _pack_bits(grey[:, 1:] > grey[:, :-1])


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def phash64(rgb: Image.Image) -> int:
    """Perceptual hash: low 8x8 DCT coefficients of a 32x32 greyscale thumbnail above their median."""
    grey = _grey(rgb, (32, 32))
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    return _pack_bits(low > np.median(low))


def hash_hex(value: int) -> str:
    return f"{value:016x}"


def parse_hash_hex(text: str) -> int:
    value = int(text, 16)
    if not 0 <= value < (1 << 64):
        raise ValueError(f"not a 64-bit hash: {text!r}")
    return value


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_many(value: int, others: np.ndarray) -> np.ndarray:
    """Hamming distances from one 64-bit hash to an array of them (dtype uint64)."""
    xored = np.bitwise_xor(others.astype(np.uint64), np.uint64(value))
    return _POPCOUNT8[xored.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int32)


@dataclass(frozen=True)
class ImageHashes:
    pixel_sha256: str
    dhash: int
    phash: int


def image_hashes(rgb: Image.Image) -> ImageHashes:
    return ImageHashes(pixel_sha256=pixel_sha256_of(rgb), dhash=dhash64(rgb), phash=phash64(rgb))
