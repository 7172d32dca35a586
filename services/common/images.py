"""The one decoder of untrusted image bytes: allow-listed formats, bomb guard, orientation, RGB, framing.

Every service that decodes bytes it did not produce (dedup, the scorer, the trainer; the crawler
opens only the format it sniffed) goes through this module, so that the rules are the same
everywhere and a picture means the same pixels to every stage:

- **Formats**: only `ALLOWED_FORMATS` are opened (Pillow otherwise tries some 40 formats, and
  renders EPS by running Ghostscript on the bytes). Anything else is `undecodable`.
- **Decompression bombs**: the pixel count declared in the header is checked against `max_pixels`
  before a single pixel is decoded (`too_many_pixels`); Pillow's own warning is not relied on.
- **Orientation**: EXIF orientation is applied; a malformed EXIF block shows the pixels as stored.
- **Colour**: RGB, transparency composited on white (cut-out photos and drawings are transparent
  around the object: black behind them would make every cut-out look alike), 16-bit greyscale
  scaled rather than clipped.
- **Framing for an encoder**: `square_pixels` takes the centre square of the picture and resizes
  that to S x S. The square is cropped *before* resizing: scaling the short side up first would turn
  a 1 x 500000 PNG of a few hundred bytes into a 16M x 32 intermediate image.

Refusals are `ImageRejected` (a ValueError) with a short, bounded `reason`: `empty`,
`too_many_pixels`, `too_small`, `undecodable`.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

# Formats a crawled, submitted or target image may be in. BMP and TIFF are for user-supplied
# targets (scanners, cameras); the crawler itself stages only JPEG, PNG, GIF and WebP.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255, 255)


class ImageRejected(ValueError):
    """The bytes are not an image this system accepts; `reason` is a short, bounded token."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Opened:
    """Context manager of `open_image`: the opened image, with refusals mapped on entry."""

    def __init__(self, data: bytes, max_pixels: int, min_side: int, formats: Sequence[str]) -> None:
        self._data, self._max_pixels, self._min_side, self._formats = data, max_pixels, min_side, formats
        self._image: Image.Image | None = None
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> Image.Image:
        if not self._data:
            raise ImageRejected("empty")
        self._warnings.__enter__()
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; our own limit decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            self._image = Image.open(io.BytesIO(self._data), formats=list(self._formats))
            width, height = self._image.size
            if width < 1 or height < 1:
                raise ImageRejected("undecodable", f"image has no pixels ({width}x{height})")
            if width * height > self._max_pixels:
                raise ImageRejected("too_many_pixels", f"{width}x{height} pixels exceeds the limit of {self._max_pixels}")
            if min(width, height) < self._min_side:
                raise ImageRejected("too_small", f"{width}x{height} < {self._min_side}")
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            refusal = _refusal(exc)
            if refusal is exc:
                raise
            raise refusal from exc
        return self._image

    def __exit__(self, *exc_info) -> None:
        # The image is not closed: it reads from memory (no descriptor to release), and closing
        # it would break what the caller keeps of it (an RGB image may be the opened one itself).
        self._image = None
        self._warnings.__exit__(*exc_info)


def _refusal(exc: BaseException) -> BaseException:
    if isinstance(exc, (ImageRejected, MemoryError, KeyboardInterrupt, SystemExit)):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageRejected("too_many_pixels", str(exc)[:200])
    # Unknown or refused format, truncated or corrupt data: whatever Pillow calls it, one outcome.
    return ImageRejected("undecodable", f"{type(exc).__name__}: {str(exc)[:200]}")


def open_image(data: bytes, max_pixels: int, *, min_side: int = 1, formats: Sequence[str] = ALLOWED_FORMATS) -> _Opened:
    """`with open_image(data, max_pixels) as image:` the lazily opened image (header read, no pixel
    decoded yet), in one of `formats`, its declared size checked. Raises ImageRejected on entry.

    Errors raised by the caller's own decoding inside the block are not mapped: wrap the block in
    `refusals()` for that.
    """
    unknown = set(formats) - set(ALLOWED_FORMATS)
    if unknown:
        raise ValueError(f"formats outside the allow-list: {sorted(unknown)}")
    return _Opened(data, max_pixels, min_side, formats)


@contextmanager
def refusals() -> Iterator[None]:
    """`with refusals():` maps any decoder failure inside the block to ImageRejected."""
    try:
        yield
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever Pillow calls it
        raise _refusal(exc) from exc


def apply_orientation(image: Image.Image) -> tuple[Image.Image, bool]:
    """The image as a viewer sees it (EXIF orientation applied) and whether anything was turned.
    A malformed EXIF block, or an orientation Pillow cannot apply, shows the pixels as stored."""
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


def to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """RGB pixels, and whether transparency was composited on white to get them."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (some PNGs): Pillow's convert() would clip at 255 and turn it white.
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(wide / 257.0, 0, 255).astype(np.uint8), mode="L").convert("RGB"), False
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, _WHITE)
        white.alpha_composite(rgba)
        return white.convert("RGB"), True
    if image.mode == "RGB":
        return image, False
    return image.convert("RGB"), False


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """The centre square of `image` (side = its shorter side), resized to size x size.

    The crop is taken before resizing, as a box of the resize: the work is bounded by the source
    pixels and the output, whatever the aspect ratio."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    if side == size and left == int(left) and top == int(top):
        if (width, height) == (size, size):
            return image
        return image.crop((int(left), int(top), int(left) + size, int(top) + size))
    # reducing_gap: a cheap box pre-shrink before the bicubic pass, visually identical.
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0)


def square_pixels(data: bytes, size: int, *, max_pixels: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3] RGB (C-contiguous): orientation applied, transparency
    on white, the centre square resized to `size` (the usual evaluation framing; the scorer and the
    trainer frame alike, so that training and scoring see images the same way).

    Raises ImageRejected for anything unusable."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    with open_image(data, max_pixels) as image, refusals():
        width, height = image.size
        side = min(width, height)
        if side > size:
            # JPEG decodes at 1/2..1/8 scale in the DCT domain; draft never goes below the request,
            # so the square still has at least `size` pixels a side.
            scale = size / side
            image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        image.load()
        oriented, _ = apply_orientation(image)
        rgb, _ = to_rgb(oriented)
        square = centre_square(rgb, size)
        pixels = np.asarray(square, dtype=np.uint8)
    if pixels.shape != (size, size, 3):
        raise ImageRejected("undecodable", f"decoded to unexpected shape {pixels.shape}")
    return np.ascontiguousarray(pixels)


__all__ = [
    "ALLOWED_FORMATS",
    "ALPHA_MODES",
    "ImageRejected",
    "apply_orientation",
    "centre_square",
    "open_image",
    "refusals",
    "square_pixels",
    "to_rgb",
]
