"""Image bytes -> the encoder's input: uint8 [S, S, 3] RGB pixels.

The encoder graph in Triton does the float scaling and normalisation itself (see
services.common.modelrepo), so the client only has to produce square RGB pixels of the model's
size: shorter side resized to S, then the centre S x S crop (the usual evaluation transform).
"""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Default ceiling on decoded pixels: far above any real photo, far below what exhausts memory
# (Pillow's own guard only warns below 2x its limit; we refuse outright).
DEFAULT_MAX_PIXELS = 64_000_000
_WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; `index` is its position in a batch, when known."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (web images and Tux Paint stamps are
    cut-outs; black behind them would make every cut-out look alike to the encoder)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (some PNGs): Pillow's convert() would clip at 255 and turn it white.
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(wide / 257.0, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def decode_image(data: bytes, image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes `data` and returns uint8 [image_size, image_size, 3] (RGB, C-contiguous).

    Raises ImageDecodeError for anything that is not a decodable image, or one whose declared
    size exceeds `max_pixels` (checked from the header, before any pixel is decoded).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not data:
        raise ImageDecodeError("empty image")
    try:
        with warnings.catch_warnings():
            # Pillow signals a probable decompression bomb with a warning; treat it as fatal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise ImageDecodeError(f"image has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")
                # JPEG can decode at 1/2, 1/4, 1/8 scale directly: much cheaper for big photos.
                # draft() never goes below the requested size, so quality at S is unaffected.
                scale = image_size / min(width, height)
                if scale < 1.0:
                    image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
                image.load()
                # In place: the opened image is ours, and a copy per image would cost a full frame.
                ImageOps.exif_transpose(image, in_place=True)
                rgb = _to_rgb(image)
                square = _resize_center_crop(rgb, image_size)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"not a decodable image: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # Truncated or corrupt files surface as any of these from Pillow's decoders.
        raise ImageDecodeError(f"corrupt image: {type(exc).__name__}: {exc}") from exc
    pixels = np.asarray(square, dtype=np.uint8)
    if pixels.shape != (image_size, image_size, 3):
        raise ImageDecodeError(f"decoded to unexpected shape {pixels.shape}")
    return np.ascontiguousarray(pixels)


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    # round() can land one pixel short of `size` on the shorter side; never below it.
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        # reducing_gap: a cheap box pre-shrink before the bicubic pass, visually identical.
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_batch(images: Sequence[bytes], image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes several images into uint8 [N, S, S, 3]; the first failure raises ImageDecodeError
    carrying its index (so an API can name `images[i]`)."""
    batch = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for index, data in enumerate(images):
        try:
            batch[index] = decode_image(data, image_size, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise ImageDecodeError(str(exc), index=index) from exc
    return batch


__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_batch", "decode_image"]
