"""MiniLM bulk embedding before and after issue 18, on the same strings, alternately in one process.

    .venv/bin/python -m bench.textembed [--concepts 5000] [--reps 3] [--corpus ~/.cache/iex/offline-web] [--queries 1000]

- before: what `MiniLMEmbedder.embed` did until then: torch, batches of 64 in the order given, each
  padded by the tokenizer to its longest text. The vocabulary build called it on chunks of 2,048
  texts sorted by character count (kept here); the search index called it on the corpus's captions
  in corpus order.
- after: `MiniLMEmbedder.embed` now: texts sorted by token count, batches of 64 padded to their own
  longest text, onnxruntime on every core (torch when it cannot load), rows back in input order.

Prints seconds, texts/s and the load average for every run, max |difference| of the unit vectors,
and with --corpus the top-1 caption of `--queries` concept names under both (old query path against
the old index, the ONNX query encoder against the new one). Writes bench/results/textembed.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results" / "textembed.json"


def embed_before(embedder, texts, batch_size: int = 64) -> np.ndarray:
    """The torch path as it was: input-order batches padded by the tokenizer."""
    import torch

    from services.common.textembed import _pool

    out = np.empty((len(texts), embedder.dimension), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        encodings = embedder.tokenizer.encode_batch(list(texts[start : start + batch_size]))
        ids, mask, types = (torch.tensor([getattr(e, n) for e in encodings], dtype=torch.long) for n in ("ids", "attention_mask", "type_ids"))
        with torch.inference_mode():
            out[start : start + len(encodings)] = _pool(embedder.encoder(ids, mask, types), mask).numpy()
    return out


def in_chunks(embed, texts, chunk: int = 2048) -> np.ndarray:
    """services.planner.vocabulary's build: chunks of texts sorted by character count, rows back in order."""
    out = np.empty((len(texts), 384), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    for start in range(0, len(texts), chunk):
        rows = order[start : start + chunk]
        out[rows] = embed([texts[i] for i in rows])
    return out


def timed(label: str, run, count: int, log: list) -> np.ndarray:
    load = os.getloadavg()[0]
    began = time.perf_counter()
    vectors = run()
    seconds = time.perf_counter() - began
    log.append({"run": label, "seconds": round(seconds, 2), "per_s": round(count / seconds, 1), "load_1m_before": round(load, 2)})
    print(f"{label:28s} {seconds:7.1f} s {count / seconds:7.0f}/s  load {load:.2f}", flush=True)
    return vectors


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.textembed")
    parser.add_argument("--concepts", type=int, default=5000, help="WordNet concept texts to embed (a fixed random sample)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--corpus", help="an offline-web directory: embed its distinct captions too and compare top-1 search results")
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()

    from services.common.textembed import shared_minilm
    from services.planner.vocabulary import PAPER_CONCEPT_TEXT, wordnet_vocabulary

    embedder = shared_minilm()
    runtime = embedder.prepare()
    print(f"after = {runtime}; cores {os.cpu_count()}", flush=True)
    vocabulary = wordnet_vocabulary(concept_text=PAPER_CONCEPT_TEXT)  # the texts its figures were measured on
    rng = np.random.default_rng(18)
    texts = [vocabulary.texts[i] for i in rng.choice(len(vocabulary.texts), min(args.concepts, len(vocabulary.texts)), replace=False)]
    runs: list[dict] = []
    differences = []
    for rep in range(args.reps):
        before = timed(f"concepts before (rep {rep})", lambda: in_chunks(lambda t: embed_before(embedder, t), texts), len(texts), runs)
        after = timed(f"concepts after (rep {rep})", lambda: in_chunks(embedder.embed, texts), len(texts), runs)
        differences.append(float(np.abs(after - before).max()))
    result: dict = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runtime_after": runtime,
        "concepts": {"texts": len(texts), "max_abs_difference": max(differences)},
        "runs": runs,
    }
    for when in ("before", "after"):
        seconds = [r["seconds"] for r in runs if r["run"].startswith(f"concepts {when}")]
        result["concepts"][f"{when}_s_min"], result["concepts"][f"{when}_s_median"] = min(seconds), float(np.median(seconds))
    print(f"concepts: max |difference| {max(differences):.2e}; speed-up {result['concepts']['before_s_median'] / result['concepts']['after_s_median']:.1f}x (medians)")

    if args.corpus:
        from services.search.corpus import load_corpus
        from services.search.index import ExactCosineIndex
        from services.search.query_encoder import OnnxQueryEncoder

        corpus = load_corpus(Path(args.corpus).expanduser())
        captions = list(dict.fromkeys(r.caption for r in corpus.records))
        after = timed("captions after", lambda: embedder.embed(captions), len(captions), runs)
        before = timed("captions before", lambda: embed_before(embedder, captions), len(captions), runs)
        concepts = sorted({r.concept for r in corpus.records if r.concept})
        queries = [concepts[i] for i in rng.choice(len(concepts), min(args.queries, len(concepts)), replace=False)]
        encoder = OnnxQueryEncoder(embedder, threads=1)
        old_index, new_index = ExactCosineIndex(before), ExactCosineIndex(after)
        old_queries = embed_before(embedder, queries)
        same_top1 = same_top10 = 0
        for text, old_query in zip(queries, old_queries):
            _, old_rows = old_index.search(old_query, 10)
            _, new_rows = new_index.search(encoder.embed([text])[0], 10)
            same_top1 += int(old_rows[0] == new_rows[0])
            same_top10 += len(set(old_rows.tolist()) & set(new_rows.tolist()))
        result["captions"] = {
            "texts": len(captions),
            "max_abs_difference": float(np.abs(after - before).max()),
            "queries": len(queries),
            "query_runtime": encoder.runtime,
            "same_top1": same_top1,
            "top10_overlap": round(same_top10 / (10 * len(queries)), 4),
        }
        print(f"captions: max |difference| {result['captions']['max_abs_difference']:.2e}; top-1 identical {same_top1}/{len(queries)}; top-10 overlap {result['captions']['top10_overlap']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
