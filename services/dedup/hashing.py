"""Image identities: raw and pixel sha256, 64-bit perceptual hashes, and a guarded decoder.

The pixel identity of an image is what a viewer sees, independent of how the file is encoded:

    pixel_sha256 = sha256(b"%dx%d\\n" % (width, height) + RGB8 pixel bytes, row-major)

computed after EXIF orientation is applied and alpha is composited on white. A PNG re-encoded at
another compression level, a PNG with metadata stripped, or an RGBA image whose fully transparent
pixels carry different colours all get the same pixel sha. The size prefix keeps a 2x8 and a 4x4
image with the same bytes apart.

The perceptual hashes, pHash and dHash, are 64-bit integers (shown as 16 hex digits) of a small
greyscale thumbnail of the same picture, compared by Hamming distance for near-duplicate and
decontamination checks. Their *distance* is the sum of the two Hamming distances (0-128): two
independent hashes that must agree together separate re-encodings, resizes, small crops, recolours
and watermarks from distinct pictures better than either alone (bench/dedup measures it).

The thumbnail is taken from a reduced decode where the format allows it: a JPEG is decoded straight
to greyscale at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled IDCT, Pillow's `draft`),
which is several times cheaper than a full decode and gives the area average a thumbnail needs
anyway. Other formats reuse the full decode. EXIF orientation and alpha are treated as for the
pixel identity, so the thumbnail is of what a viewer sees.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.common import images
from services.common.images import ImageRejected

# Bumped whenever any hash below changes meaning; stored beside every hash so old caches are recomputed.
HASH_VERSION = "2"

DEFAULT_MAX_PIXELS = 40_000_000


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

    The shared decoder (services.common.images): allow-listed formats only, and the pixel count
    checked from the header before any pixel is decoded, so a small file that claims to be
    100k x 100k costs nothing (the decompression-bomb guard).
    """
    with images.open_image(data, max_pixels, min_side=min_side) as image, images.refusals():
        source_format = (image.format or "UNKNOWN").upper()
        # is_animated looks at most one frame ahead; n_frames would walk every frame of a GIF.
        frames = 2 if getattr(image, "is_animated", False) else 1
        image.seek(0)
        image.load()
        source_mode = image.mode
        oriented, transposed = images.apply_orientation(image)
        rgb, had_alpha = images.to_rgb(oriented)
    return DecodedImage(rgb=rgb, source_format=source_format, source_mode=source_mode, had_alpha=had_alpha, transposed=transposed, frames=frames)


def pixel_sha256_of(rgb: Image.Image) -> str:
    if rgb.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {rgb.mode}")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def pixel_sha256(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """sha256 of the normalised pixels of encoded image bytes (see the module docstring)."""
    return pixel_sha256_of(decode_image(data, max_pixels).rgb)


# Side of the square greyscale thumbnail pHash is computed from; dHash uses 9x8.
THUMBNAIL_SIDE = 32
# A picture none of whose low frequencies reaches this amplitude (in grey levels) is flat: its hash
# bits are rounding noise, so it is compared by exact identity only.
MIN_LOW_FREQUENCY_AMPLITUDE = 1.0


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


# Only the 8 lowest frequencies are ever used: an 8x32 basis keeps the 2-D DCT two small products.
_DCT_LOW = _dct_matrix(THUMBNAIL_SIDE)[:8]


@dataclass(frozen=True)
class PerceptualHashes:
    phash: int
    dhash: int
    # False for flat pictures (see MIN_LOW_FREQUENCY_AMPLITUDE): never matched by distance.
    informative: bool = True


def _reduced_jpeg_grey(data: bytes, max_pixels: int) -> Image.Image | None:
    """The JPEG decoded to greyscale at the smallest DCT scale keeping both sides >= THUMBNAIL_SIDE."""
    with images.open_image(data, max_pixels) as image:
        if image.format != "JPEG":
            return None
        # Only YCbCr/greyscale JPEGs become "L" here; CMYK keeps its mode and is converted below.
        image.draft("L", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        image.load()
        oriented, _ = images.apply_orientation(image)
    if oriented.mode != "L":
        oriented = images.to_rgb(oriented)[0].convert("L")
    return oriented


def grey_thumbnail_source(data: bytes | None, decoded: DecodedImage | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A greyscale image of the picture to take thumbnails from: a reduced JPEG decode, else the full one.

    `decoded` (when the caller already decoded `data`) saves a second full decode of non-JPEG formats.
    """
    if data is not None and (decoded is None or decoded.source_format == "JPEG"):
        try:
            reduced = _reduced_jpeg_grey(data, max_pixels)
        except ImageRejected as exc:
            if exc.reason == "too_many_pixels":
                raise
            reduced = None  # a JPEG the reduced decoder cannot read: the full decode decides
        except Exception:  # noqa: BLE001 - a JPEG the reduced decoder cannot read: fall back to the full decode
            reduced = None
        if reduced is not None:
            return reduced
    if decoded is None:
        if data is None:
            raise ValueError("need the encoded bytes or the decoded image")
        decoded = decode_image(data, max_pixels)
    return decoded.rgb.convert("L")


def _pack_bits(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.reshape(-1)).tobytes(), "big")


def _pixels(grey: Image.Image) -> np.ndarray:
    # Straight from the bytes: numpy's array-interface route costs more than the hashing itself.
    return np.frombuffer(grey.tobytes(), dtype=np.uint8).reshape(grey.height, grey.width)


def perceptual_hashes_of_grey(grey: Image.Image) -> PerceptualHashes:
    """pHash and dHash of a greyscale image (any size)."""
    if grey.mode != "L":
        raise ValueError(f"expected a greyscale image, got mode {grey.mode}")
    # BOX is the area average: every source pixel counts once, whatever the scale.
    thumb = _pixels(grey.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)).astype(np.float64)
    low = (_DCT_LOW @ thumb @ _DCT_LOW.T).reshape(-1)
    ac = low[1:]
    # pHash: the 8x8 lowest frequencies against the median of the 63 that vary (the 32nd smallest).
    phash = _pack_bits(low > np.partition(ac, 31)[31])
    # dHash: is each pixel of a 9x8 thumbnail darker than its right neighbour.
    small = _pixels(grey.resize((9, 8), Image.Resampling.BOX)).astype(np.int16)
    dhash = _pack_bits(small[:, 1:] > small[:, :-1])
    # A cosine of amplitude a grey levels gives a coefficient of about a * side^2 / 4 in this basis.
    informative = float(np.abs(ac).max()) >= MIN_LOW_FREQUENCY_AMPLITUDE * THUMBNAIL_SIDE * THUMBNAIL_SIDE / 4
    return PerceptualHashes(phash=phash, dhash=dhash, informative=informative)


def perceptual_hashes(data: bytes | None, decoded: DecodedImage | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> PerceptualHashes:
    """pHash and dHash of encoded image bytes (and/or their full decode); ImageRejected for bad bytes."""
    return perceptual_hashes_of_grey(grey_thumbnail_source(data, decoded, max_pixels))


def phash64(image: Image.Image) -> int:
    """pHash of a decoded image (the full-decode path: no reduced JPEG decode)."""
    return perceptual_hashes_of_grey(image.convert("L")).phash


def dhash64(image: Image.Image) -> int:
    """dHash of a decoded image (the full-decode path: no reduced JPEG decode)."""
    return perceptual_hashes_of_grey(image.convert("L")).dhash


def hash_hex(value: int) -> str:
    return f"{value:016x}"


def parse_hash_hex(text: str) -> int:
    value = int(text, 16)
    if not 0 <= value < (1 << 64):
        raise ValueError(f"not a 64-bit hash: {text!r}")
    return value


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# Bits set in every 16-bit value: four lookups count a 64-bit word.
_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)


def popcount64(values: np.ndarray) -> np.ndarray:
    """Bits set in each element of a uint64 array."""
    words = np.ascontiguousarray(values, dtype=np.uint64)
    counts = _POPCOUNT16[words.view(np.uint16)]
    # Strided adds: numpy's sum over a length-4 axis is several times slower.
    return counts[0::4].astype(np.int32) + counts[1::4] + counts[2::4] + counts[3::4]


def hamming_many(value: int, others: np.ndarray) -> np.ndarray:
    """Hamming distances from one 64-bit hash to an array of them (dtype uint64)."""
    return popcount64(np.bitwise_xor(np.asarray(others, dtype=np.uint64), np.uint64(value)))


@dataclass(frozen=True)
class ImageHashes:
    pixel_sha256: str
    dhash: int
    phash: int
    # False for flat pictures: compared by exact identity only.
    informative: bool = True

    def distance_to(self, dhash: int, phash: int) -> int:
        """pHash + dHash Hamming distance (0-128)."""
        return hamming(self.phash, phash) + hamming(self.dhash, dhash)


def image_hashes(data: bytes, decoded: DecodedImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHashes:
    """Every identity of one fetched image: pixel sha of its full decode, perceptual hashes of its thumbnail."""
    perceptual = perceptual_hashes(data, decoded, max_pixels)
    return ImageHashes(
        pixel_sha256=pixel_sha256_of(decoded.rgb),
        dhash=perceptual.dhash,
        phash=perceptual.phash,
        informative=perceptual.informative,
    )
