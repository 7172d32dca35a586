"""The offline web: text-to-image search over a local captioned image corpus.

corpus.py (the on-disk format), synthetic.py (a generated corpus and targets for tests and demos),
index.py (MiniLM caption embeddings and exact cosine search), engine.py (queries, validation,
metrics), web.py (HTTP: images and clip-retrieval's /knn-service), service.py (gRPC + lifecycle).
"""
