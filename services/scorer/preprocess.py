"""Image bytes -> the encoder's input: uint8 [S, S, 3] RGB pixels.

The encoder graph in Triton does the float scaling and normalisation itself (see
services.common.modelrepo), so the client only has to produce square RGB pixels of the model's
size: the centre square of the picture resized to S x S (the usual evaluation framing), decoded by
the shared decoder of untrusted images (services.common.images: allow-listed formats, bomb guard).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from services.common.images import ImageRejected, square_pixels

# Default ceiling on decoded pixels: far above any real photo, far below what exhausts memory
# (Pillow's own guard only warns below 2x its limit; we refuse outright).
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; `index` is its position in a batch, when known."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def decode_image(data: bytes, image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes `data` and returns uint8 [image_size, image_size, 3] (RGB, C-contiguous).

    Raises ImageDecodeError for anything that is not a decodable image in an allowed format, or
    one whose declared size exceeds `max_pixels` (checked from the header, before any pixel is
    decoded). The decoding is the shared one (services.common.images.square_pixels): the centre
    square is cropped before it is resized, so an extreme aspect ratio costs what its pixels cost.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    try:
        return square_pixels(data, image_size, max_pixels=max_pixels)
    except ImageRejected as exc:
        # "<reason>: <detail>", the reason one of empty, too_many_pixels, undecodable.
        raise ImageDecodeError(str(exc)) from exc


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
