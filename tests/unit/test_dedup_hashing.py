"""Pixel identity, perceptual hashes, the decoder's guards and the stored encoding of dedup."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from services.dedup import encoding, hashing


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def photo(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth, photo-like RGB image (gradients and blobs) that survives JPEG well."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = []
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
        blob = 255 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        ramp = rng.uniform(0, 1) * 255 * (x / w) + rng.uniform(0, 1) * 120 * (y / h)
        channels.append(np.clip(0.6 * blob + 0.4 * ramp, 0, 255))
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGB")


def test_lossless_reencodings_share_the_pixel_sha():
    image = photo(1)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved by someone else")
    variants = [png_bytes(image, compress_level=0), png_bytes(image, compress_level=9), png_bytes(image, pnginfo=info)]
    assert len({hashing.raw_sha256(v) for v in variants}) == 3
    assert len({hashing.pixel_sha256(v) for v in variants}) == 1


def test_one_changed_pixel_changes_the_pixel_sha():
    image = photo(2)
    changed = image.copy()
    changed.putpixel((3, 3), (0, 0, 0) if image.getpixel((3, 3)) != (0, 0, 0) else (1, 1, 1))
    assert hashing.pixel_sha256(png_bytes(image)) != hashing.pixel_sha256(png_bytes(changed))


def test_alpha_is_composited_on_white():
    size = (20, 20)
    white = Image.new("RGB", size, (255, 255, 255))
    clear_red = Image.new("RGBA", size, (255, 0, 0, 0))
    clear_blue = Image.new("RGBA", size, (0, 0, 255, 0))
    shas = {hashing.pixel_sha256(png_bytes(i)) for i in (white, clear_red, clear_blue)}
    assert len(shas) == 1
    half = Image.new("RGBA", size, (0, 0, 0, 128))
    decoded = hashing.decode_image(png_bytes(half))
    assert decoded.had_alpha
    assert decoded.rgb.getpixel((0, 0)) == (127, 127, 127)


def test_16_bit_greyscale_is_scaled_not_clipped():
    wide = Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16))  # 128 * 257
    decoded = hashing.decode_image(png_bytes(wide))
    assert decoded.rgb.getpixel((0, 0)) == (128, 128, 128)


def test_the_size_is_part_of_the_pixel_sha():
    wide = Image.new("RGB", (8, 2), (10, 20, 30))
    square = Image.new("RGB", (4, 4), (10, 20, 30))
    assert wide.tobytes() == square.tobytes()
    assert hashing.pixel_sha256(png_bytes(wide)) != hashing.pixel_sha256(png_bytes(square))


def test_exif_orientation_is_applied():
    image = photo(3, size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = hashing.decode_image(jpeg_bytes(image, exif=exif.tobytes(), quality=95))
    assert decoded.transposed
    assert (decoded.width, decoded.height) == (20, 40)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "undecodable"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "undecodable"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(hashing.ImageRejected) as caught:
        hashing.decode_image(data)
    assert caught.value.reason == reason


def test_truncated_image_is_undecodable():
    data = png_bytes(photo(4))
    with pytest.raises(hashing.ImageRejected) as caught:
        hashing.decode_image(data[: len(data) // 2])
    assert caught.value.reason == "undecodable"


def test_decompression_bomb_is_refused_before_decoding():
    # 4000x4000 of one colour compresses to a few KB: the header alone must decide.
    bomb = png_bytes(Image.new("1", (4000, 4000)))
    assert len(bomb) < 50_000
    with pytest.raises(hashing.ImageRejected) as caught:
        hashing.decode_image(bomb, max_pixels=1_000_000)
    assert caught.value.reason == "too_many_pixels"


def test_tiny_images_are_too_small():
    with pytest.raises(hashing.ImageRejected) as caught:
        hashing.decode_image(png_bytes(Image.new("RGB", (1, 1))), min_side=16)
    assert caught.value.reason == "too_small"


def test_perceptual_hashes_survive_jpeg_and_tell_images_apart():
    original = photo(5, size=(128, 128))
    recompressed = Image.open(io.BytesIO(jpeg_bytes(original, quality=80))).convert("RGB")
    other = photo(6, size=(128, 128))
    a, b, c = (hashing.perceptual_hashes(png_bytes(i)) for i in (original, recompressed, other))
    assert hashing.hamming(a.dhash, b.dhash) <= 6
    assert hashing.hamming(a.phash, b.phash) <= 6
    assert hashing.hamming(a.dhash, c.dhash) + hashing.hamming(a.phash, c.phash) > 30


def test_hamming_many_agrees_with_hamming():
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, size=20, dtype=np.int64)] + [2**64 - 1, 0]
    probe = 0xF0F0_1234_5678_9ABC
    expected = [hashing.hamming(probe, v) for v in values]
    assert hashing.hamming_many(probe, np.array(values, dtype=np.uint64)).tolist() == expected
    assert hashing.parse_hash_hex(hashing.hash_hex(2**64 - 1)) == 2**64 - 1


def test_jpeg_is_stored_as_its_original_bytes_without_exif():
    image = photo(7)
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0112] = 1
    data = jpeg_bytes(image, exif=exif.tobytes(), quality=90)
    decoded = hashing.decode_image(data)
    sha = hashing.pixel_sha256_of(decoded.rgb)
    stored = encoding.encode_for_storage(data, decoded, sha, hashing.DEFAULT_MAX_PIXELS)
    assert stored.label == "jpeg-original"
    assert stored.content_type == "image/jpeg"
    assert b"Exif" not in stored.data and b"CameraMaker" not in stored.data
    assert len(stored.data) < len(data)
    assert hashing.pixel_sha256(stored.data) == sha


def test_alpha_png_is_stored_as_normalised_png():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    image.paste((0, 128, 0, 255), (8, 8, 24, 24))
    data = png_bytes(image)
    decoded = hashing.decode_image(data)
    sha = hashing.pixel_sha256_of(decoded.rgb)
    stored = encoding.encode_for_storage(data, decoded, sha, hashing.DEFAULT_MAX_PIXELS)
    assert stored.label == "png-normalised"
    assert Image.open(io.BytesIO(stored.data)).mode == "RGB"
    assert hashing.pixel_sha256(stored.data) == sha


def test_plain_png_is_stored_as_its_original_bytes_without_text_chunks():
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "someone@example.org")
    info.add_text("Comment", "GPS 48.85 2.35", zip=True)
    buffer = io.BytesIO()
    photo(3).save(buffer, format="PNG", pnginfo=info, compress_level=1)
    data = buffer.getvalue()
    decoded = hashing.decode_image(data)
    sha = hashing.pixel_sha256_of(decoded.rgb)
    stored = encoding.encode_for_storage(data, decoded, sha, hashing.DEFAULT_MAX_PIXELS)
    assert stored.label == "png-original" and stored.content_type == "image/png"
    assert b"someone@example.org" not in stored.data and b"zTXt" not in stored.data and b"tEXt" not in stored.data
    # The compressed pixel data is the original's, byte for byte (no re-encoding).
    assert stored.data == data.replace(data[data.index(b"tEXt") - 4 : data.index(b"IDAT") - 4], b"")
    assert hashing.pixel_sha256(stored.data) == sha


def test_palette_png_is_normalised_and_malformed_png_is_not_stripped():
    image = photo(4).convert("P")
    data = png_bytes(image)
    decoded = hashing.decode_image(data)
    sha = hashing.pixel_sha256_of(decoded.rgb)
    stored = encoding.encode_for_storage(data, decoded, sha, hashing.DEFAULT_MAX_PIXELS)
    assert stored.label == "png-normalised" and hashing.pixel_sha256(stored.data) == sha
    assert encoding.strip_png_metadata(b"not a png") is None
    truncated = png_bytes(photo(5))[:-20]
    assert encoding.strip_png_metadata(truncated) is None


def test_malformed_jpeg_structure_is_not_stripped():
    assert encoding.strip_jpeg_metadata(b"not a jpeg") is None
    assert encoding.strip_jpeg_metadata(b"\xff\xd8\xff\xe1\x00\xff") is None


def test_animated_gif_is_its_first_frame_stored_as_png():
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = hashing.decode_image(buffer.getvalue())
    assert decoded.frames == 2
    assert decoded.rgb.getpixel((5, 5)) == (255, 0, 0)
    sha = hashing.pixel_sha256_of(decoded.rgb)
    stored = encoding.encode_for_storage(buffer.getvalue(), decoded, sha, hashing.DEFAULT_MAX_PIXELS)
    assert stored.label == "png-normalised" and hashing.pixel_sha256(stored.data) == sha
