"""The offline web: text-to-image search over a local captioned image corpus.

corpus.py (the on-disk format), ingest.py (corpora from a folder, a parquet of url,caption or
WebDataset shards), synthetic.py (a generated corpus and targets for tests and demos), index.py
(caption embeddings and exact or HNSW search), index_store.py (the index persisted locally and in
S3), query_encoder.py (query embedding on onnxruntime), engine.py (queries, validation, metrics),
web.py (HTTP: images and clip-retrieval's /knn-service), service.py (gRPC + lifecycle), hostile.py
(a hostile web for crawler tests).
"""
