"""Every image decoder of the system against hostile bytes.

Decoders: the crawler's check-and-normalise step, dedup's decoder and storage encoding, the
scorer's preprocessing and the trainer's decoding. Inputs: random bytes, valid images of every
format and mode with flipped bytes, cuts and insertions, and headers that lie about their size.

Each decoder must either return what it documents or raise its one documented refusal, within the
per-example deadline, and the stages must agree: bytes dedup accepts and stores decode again to the
same pixel hash, and the scorer and the trainer can use them (an accepted image nobody can score
would stall its query forever).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fuzz_strategies import hostile_images as hostile
from fuzz_strategies import lying_png, mutated_images
from hypothesis import given
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image

from services.crawler.images import ImagePolicy, ImageRefused, process_image
from services.dedup.encoding import encode_for_storage, strip_jpeg_metadata
from services.dedup.hashing import ImageRejected, decode_image, image_hashes, pixel_sha256_of
from services.scorer.preprocess import ImageDecodeError
from services.scorer.preprocess import decode_image as scorer_decode
from services.trainer.data import decode_square

pytestmark = pytest.mark.fuzz

SIZE = 32
MAX_PIXELS = 4_000_000
CRAWLER_POLICY = ImagePolicy(max_pixels=MAX_PIXELS, min_side=8, max_aspect=8.0, max_side=64)
# What the trainer's fetch_images treats as "undecodable, skip it"; anything else stops training.
TRAINER_REFUSALS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning)


# ---- each decoder alone -------------------------------------------------------------------------


@given(hostile)
def test_crawler_normalises_or_refuses(data):
    try:
        result = process_image(data, CRAWLER_POLICY)
    except ImageRefused as refused:
        assert refused.reason and len(refused.reason) <= 32
        return
    assert max(result.width, result.height) <= CRAWLER_POLICY.max_side
    assert result.content_type in ("image/jpeg", "image/png", "image/gif", "image/webp")
    # What the crawler stages, dedup can decode.
    decode_image(result.data, MAX_PIXELS)


@given(hostile)
def test_dedup_decodes_or_rejects_and_stores_what_it_decoded(data):
    try:
        decoded = decode_image(data, MAX_PIXELS)
    except ImageRejected as rejected:
        assert rejected.reason in ("empty", "too_many_pixels", "too_small", "undecodable")
        return
    assert decoded.rgb.mode == "RGB" and decoded.width * decoded.height <= MAX_PIXELS
    sha = pixel_sha256_of(decoded.rgb)
    image_hashes(data, decoded, MAX_PIXELS)
    stored = encode_for_storage(data, decoded, sha, MAX_PIXELS)
    # The storage invariant: the stored object decodes to the pixels dedup identified.
    assert pixel_sha256_of(decode_image(stored.data, MAX_PIXELS).rgb) == sha
    # And every later stage can use it.
    assert scorer_decode(stored.data, SIZE, max_pixels=MAX_PIXELS).shape == (SIZE, SIZE, 3)
    assert decode_square(stored.data, SIZE, max_pixels=MAX_PIXELS).shape == (SIZE, SIZE, 3)


@given(hostile)
def test_scorer_preprocess_decodes_or_refuses(data):
    try:
        pixels = scorer_decode(data, SIZE, max_pixels=MAX_PIXELS)
    except ImageDecodeError:
        return
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8 and pixels.flags["C_CONTIGUOUS"]


@given(hostile)
def test_trainer_decodes_or_refuses_with_an_error_it_skips(data):
    try:
        pixels = decode_square(data, SIZE, max_pixels=MAX_PIXELS)
    except TRAINER_REFUSALS:
        return
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8


@given(st.one_of(st.binary(max_size=512), mutated_images()))
def test_jpeg_metadata_stripper_never_raises(data):
    stripped = strip_jpeg_metadata(data)
    assert stripped is None or (stripped.startswith(b"\xff\xd8") and len(stripped) <= len(data) + 2)


# ---- decompression bombs, deterministically --------------------------------------------------------


def test_a_compressed_bomb_is_refused_from_its_header_by_every_decoder():
    # 30000 x 30000 one-bit pixels: 112 MB once decoded, 110 kB on the wire.
    bomb = lying_png(30000, 30000, b"\x00" * (30000 // 8 + 1) * 30000)
    assert len(bomb) < 200_000
    with pytest.raises(ImageRefused):
        process_image(bomb, CRAWLER_POLICY)
    with pytest.raises(ImageRejected) as rejected:
        decode_image(bomb, MAX_PIXELS)
    assert rejected.value.reason == "too_many_pixels"
    with pytest.raises(ImageDecodeError):
        scorer_decode(bomb, SIZE, max_pixels=MAX_PIXELS)
    with pytest.raises(TRAINER_REFUSALS):
        decode_square(bomb, SIZE, max_pixels=MAX_PIXELS)


# ---- sizes that are cheap to send and expensive to process ---------------------------------------


@pytest.mark.parametrize(
    "decoder",
    [
        pytest.param(lambda data: scorer_decode(data, SIZE, max_pixels=MAX_PIXELS), id="scorer"),
        pytest.param(lambda data: decode_square(data, SIZE, max_pixels=MAX_PIXELS), id="trainer"),
        pytest.param(lambda data: decode_image(data, MAX_PIXELS), id="dedup"),
        pytest.param(lambda data: process_image(data, CRAWLER_POLICY), id="crawler"),
    ],
)
def test_an_extreme_aspect_ratio_costs_no_more_than_its_pixels(decoder):
    """A 1 x 500000 PNG is 500k pixels (inside every budget) in a few hundred bytes. Scaling its short
    side up to the model's size first makes a 16M x 32 intermediate image: seconds of CPU and
    hundreds of MB per request (found by the deep fuzz profile). Cropping the centre square first
    (or refusing the aspect) costs what the pixels cost."""
    data = lying_png(1, 500_000, b"\x00\x00" * 500_000)
    assert len(data) < 5_000
    started = time.perf_counter()
    try:
        decoder(data)
    except Exception:  # noqa: BLE001 - refusing is fine; the time is what is measured
        pass
    assert time.perf_counter() - started < 1.0


# ---- formats that hand the bytes to another program ------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nshowpage\n%%EOF\n"


@pytest.fixture()
def ghostscript_tripwire(tmp_path, monkeypatch):
    """Pillow renders EPS by running Ghostscript on the file; a stand-in binary records any such run."""
    calls = tmp_path / "calls"
    fake = tmp_path / "gs"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(fake))
    return calls


@pytest.mark.parametrize(
    "decoder",
    [
        pytest.param(lambda data: process_image(data, CRAWLER_POLICY), id="crawler"),
        pytest.param(lambda data: decode_image(data, MAX_PIXELS), id="dedup"),
        pytest.param(lambda data: scorer_decode(data, SIZE, max_pixels=MAX_PIXELS), id="scorer"),
        pytest.param(lambda data: decode_square(data, SIZE, max_pixels=MAX_PIXELS), id="trainer"),
    ],
)
def test_no_decoder_runs_an_external_interpreter_on_untrusted_bytes(decoder, ghostscript_tripwire):
    """PostScript is a programming language: a crawled or submitted "image" must never reach Ghostscript.

    Opening images with an allow-list of formats (Image.open(..., formats=[...])) closes this; the
    scorer's ScoreImages takes bytes from any caller, and the trainer decodes user-supplied targets.
    """
    try:
        decoder(EPS)
    except Exception:  # noqa: BLE001 - refusing is the expected outcome; which exception is checked elsewhere
        pass
    assert not Path(ghostscript_tripwire).exists(), f"Ghostscript was run on untrusted bytes: {Path(ghostscript_tripwire).read_text()[:200]}"
