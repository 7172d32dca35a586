"""Image bytes -> uint8 [S, S, 3] encoder input."""

import io

import numpy as np
import pytest
from PIL import Image

from services.scorer.preprocess import ImageDecodeError, decode_batch, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "WEBP"), ("CMYK", "JPEG")])
def test_decodes_any_mode_to_square_rgb_uint8(mode, fmt):
    data = encode(Image.new(mode, (64, 40)), fmt)
    pixels = decode_image(data, 32)
    assert pixels.shape == (32, 32, 3)
    assert pixels.dtype == np.uint8
    assert pixels.flags["C_CONTIGUOUS"]


def test_shorter_side_resize_then_center_crop():
    # Left third red, middle third green, right third blue: a centre crop of the shorter side
    # keeps only green.
    image = Image.new("RGB", (300, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (i * 100, 0, (i + 1) * 100, 100))
    pixels = decode_image(encode(image), 50)
    assert pixels.shape == (50, 50, 3)
    assert np.all(pixels[:, 5:45] == (0, 255, 0))


def test_small_images_are_upscaled():
    assert decode_image(encode(Image.new("RGB", (7, 5), (10, 20, 30))), 24).shape == (24, 24, 3)


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    pixels = decode_image(encode(image), 10)
    assert np.all(pixels == 255)
    half = Image.new("RGBA", (20, 20), (0, 0, 0, 128))
    value = decode_image(encode(half), 10)[5, 5]
    assert np.all(np.abs(value.astype(int) - 127) <= 2)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed: white ends on top
    pixels = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), 20)
    assert pixels.shape == (20, 20, 3)
    # After the shorter-side resize the displayed image is 20x40: the centre crop straddles
    # both halves, white on top.
    assert pixels[1].mean() > 200 and pixels[-2].mean() < 50


@pytest.mark.parametrize("data", [b"", b"not an image", encode(Image.new("RGB", (30, 30)), "PNG")[:40]])
def test_undecodable_bytes_raise(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, 16)


def test_decompression_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(data, 16, max_pixels=1_000_000)


def test_batch_names_the_failing_index():
    good = encode(Image.new("RGB", (16, 16), (1, 2, 3)))
    batch = decode_batch([good, good], 8)
    assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.uint8
    with pytest.raises(ImageDecodeError) as info:
        decode_batch([good, b"junk", good], 8)
    assert info.value.index == 1


def test_sixteen_bit_greyscale_keeps_its_range():
    wide = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 160).astype(np.uint16)  # 0..63840
    pixels = decode_image(encode(Image.fromarray(wide)), 20)
    assert pixels.min() < 5 and pixels.max() > 240  # not clipped to white
