"""bench/gpu/learning_pack.py: the weights' int8 round trip, the images' framing, and the web archive round trip."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.gpu import learning_pack
from services.common.images import square_pixels


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = rng.integers(0, 256, 3)  # two flat halves: lossy coding keeps them
    pixels[:, width // 2 :] = rng.integers(0, 256, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_quantize_round_trip_keeps_names_shapes_and_is_close():
    torch.manual_seed(0)
    state = {
        "encoder.layer.0.attention.self.query.weight": torch.randn(8, 128),
        "embeddings.position_embeddings.weight": torch.randn(4, 64),  # small table: float16, not int8
        "embeddings.LayerNorm.bias": torch.randn(128),
        "embeddings.position_ids": torch.arange(16).unsqueeze(0),
    }
    packed = learning_pack.quantize(state)
    assert packed["encoder.layer.0.attention.self.query.weight.q8"].dtype == torch.int8
    assert packed["encoder.layer.0.attention.self.query.weight.scale"].shape == (8, 128 // learning_pack.GROUP)
    assert packed["embeddings.position_embeddings.weight"].dtype == torch.float16
    restored = learning_pack.dequantize(packed)
    assert set(restored) == set(state)
    for name, tensor in state.items():
        assert restored[name].shape == tensor.shape
        if tensor.is_floating_point():
            assert restored[name].dtype == torch.float32
            # int8 with a scale per group: at most half a step (max |w| / 127 / 2) off, plus float16 rounding.
            assert float((restored[name] - tensor).abs().max()) <= float(tensor.abs().max()) / 127 * 0.5 * 1.01 + 1e-3
        else:
            assert torch.equal(restored[name], tensor)


def test_square_webp_is_the_benchmarks_centre_square_made_small():
    original = png(300, 200, 1)
    small = learning_pack.square_webp(original, 64, 80)
    with Image.open(io.BytesIO(small)) as image:
        assert image.format == "WEBP" and image.size == (64, 64)
    # The bench decodes it to the same picture as the original (flat halves: the framing decides).
    a = square_pixels(original, 32, max_pixels=10**7).astype(int)
    b = square_pixels(small, 32, max_pixels=10**7).astype(int)
    assert np.abs(a - b).mean() < 6
    # Smaller than the bound: kept at its own size.
    with Image.open(io.BytesIO(learning_pack.square_webp(png(40, 50, 2), 64, 80))) as image:
        assert image.size == (40, 40)


@pytest.fixture
def tiny_web(tmp_path):
    root = tmp_path / "web"
    (root / "images" / "emoji").mkdir(parents=True)
    records = []
    for i in range(3):
        file = f"images/emoji/e{i}.png"
        (root / file).write_bytes(png(90 + 10 * i, 80, i))
        records.append({"id": f"e{i}", "file": file, "caption": f"thing {i}", "synset": "n00000001"})
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    target = root / "targets" / "animals"
    (target / "train").mkdir(parents=True)
    (target / "eval" / "birds").mkdir(parents=True)
    (target / "train" / "t0.png").write_bytes(png(120, 100, 10))
    (target / "eval" / "birds" / "b0.png").write_bytes(png(100, 120, 11))
    (target / "target.json").write_text('{"branch": "animals"}\n')
    (target / "train_labels.json").write_text('{"labels": {"train/t0.png": "birds"}}\n')
    (target / "birds").mkdir()  # a nested branch's folder: not part of this target's files
    (target / "birds" / "x.png").write_bytes(png(10, 10, 12))
    return root


def test_web_archive_round_trip_keeps_names_and_the_corpus_file(tiny_web, tmp_path):
    archive = tmp_path / "web.zip"
    stats = learning_pack.pack_web(tiny_web, ["animals"], 32, 70, 90, archive)
    assert stats["images"] == 3 and stats["targets"]["animals"]["photos"] == 2
    out = tmp_path / "out"
    assert learning_pack.extract_web(archive, out) == 3
    assert (out / "corpus.jsonl").read_bytes() == (tiny_web / "corpus.jsonl").read_bytes()
    for name in ("target.json", "train_labels.json"):
        assert (out / "targets/animals" / name).read_bytes() == (tiny_web / "targets/animals" / name).read_bytes()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["images/emoji/e0.png", "images/emoji/e1.png", "images/emoji/e2.png", "targets/animals/eval/birds/b0.png", "targets/animals/train/t0.png"]
    with Image.open(out / "images/emoji/e2.png") as image:
        assert image.format == "WEBP" and image.size == (32, 32)
    with Image.open(out / "targets/animals/eval/birds/b0.png") as image:
        assert image.size == (100, 100)  # target photos: full size
