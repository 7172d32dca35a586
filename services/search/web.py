"""The search service's HTTP face: image files and clip-retrieval's JSON API.

  GET  /images/<id>    the image bytes with their Content-Type; 404 for unknown ids
  POST /knn-service    clip-retrieval request -> [{"id", "url", "caption", "similarity"}, ...]
  GET  /indices-list   ["<index name>", ...]

Errors are JSON objects {"error": "<field>: <problem>", "field": "<field>"} with 400 (bad
request), 404 (unknown index or image), 405, 411, 413. Image ids are dictionary keys, never joined
to a path, so no request can read outside the corpus.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from services.search.engine import InvalidQuery, SearchEngine, UnknownIndex

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
# clip-retrieval inputs we cannot serve: the offline web searches captions with text only.
_UNSUPPORTED_INPUTS = ("image", "image_url", "embedding_input")
# What clip-retrieval clients send when they do not set them (ClipClient defaults).
DEFAULT_NUM_IMAGES = 40


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.status = status
        self.field = field


def parse_knn_request(body: bytes) -> dict[str, Any]:
    """Validates the clip-retrieval fields we act on; other known fields are accepted and ignored."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _RequestError(HTTPStatus.BAD_REQUEST, "body", "not valid JSON") from None
    if not isinstance(request, dict):
        raise _RequestError(HTTPStatus.BAD_REQUEST, "body", "must be a JSON object")
    for name in _UNSUPPORTED_INPUTS:
        if request.get(name) not in (None, ""):
            raise _RequestError(HTTPStatus.BAD_REQUEST, name, "only text queries are supported")
    modality = request.get("modality", "image")
    if modality != "image":
        raise _RequestError(HTTPStatus.BAD_REQUEST, "modality", "only 'image' is supported (results are images found by caption)")
    indice_name = request.get("indice_name") or ""
    if not isinstance(indice_name, str):
        raise _RequestError(HTTPStatus.BAD_REQUEST, "indice_name", "must be a string")
    deduplicate = request.get("deduplicate", True)
    if not isinstance(deduplicate, bool):
        raise _RequestError(HTTPStatus.BAD_REQUEST, "deduplicate", "must be true or false")
    return {
        "text": request.get("text"),
        "num_images": request.get("num_images", DEFAULT_NUM_IMAGES),
        "indice_name": indice_name,
        "deduplicate": deduplicate,
    }


def _route_of(path: str) -> str:
    """A bounded metric label for any path."""
    if path.startswith("/images/"):
        return "images"
    if path in ("/knn-service", "/indices-list"):
        return path[1:]
    return "other"


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive: crawlers fetch many images from one host.
    protocol_version = "HTTP/1.1"
    server_version = "iex-search"
    # Headers and body are two writes; with Nagle on, a kept-alive client waits ~40 ms for a delayed ACK per response.
    disable_nagle_algorithm = True
    # Seconds a connection may sit idle or dribble a request before its thread is freed.
    timeout = 30
    engine: SearchEngine  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("http " + format, *args)

    # ---- responses ---------------------------------------------------------------------------
    def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.engine.metrics.http_responses.labels(route=_route_of(urlsplit(self.path).path), code=str(int(status))).inc()

    def _json(self, status: HTTPStatus, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: HTTPStatus, field: str, message: str) -> None:
        self._json(status, {"error": message, "field": field})

    # ---- routes ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/images/"):
            self._image(unquote(path[len("/images/") :]), head)
        elif path == "/indices-list":
            self._json(HTTPStatus.OK, self.engine.index_names())
        elif path == "/knn-service":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method", "use POST")
        else:
            self._error(HTTPStatus.NOT_FOUND, "path", f"no route {path[:100]!r}")

    def _image(self, image_id: str, head: bool) -> None:
        found = self.engine.image(image_id)
        if found is None:
            self._error(HTTPStatus.NOT_FOUND, "id", "no such image")
            return
        record, file = found
        try:
            data = file.read_bytes()
        except OSError as exc:
            log.warning("image file unreadable", extra={"id": record.id, "error": str(exc)[:200]})
            self._error(HTTPStatus.NOT_FOUND, "id", "image file missing")
            return
        headers = {"Cache-Control": "public, max-age=86400"}
        if record.sha256:
            headers["ETag"] = f'"{record.sha256}"'
        self._send(HTTPStatus.OK, data, record.content_type, headers, head=head)
        if not head:
            self.engine.metrics.images_served.inc()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path != "/knn-service":
            self.close_connection = True
            self._error(HTTPStatus.NOT_FOUND if _route_of(path) == "other" else HTTPStatus.METHOD_NOT_ALLOWED, "path", f"no POST route {path[:100]!r}")
            return
        try:
            body = self._read_body()
            request = parse_knn_request(body)
            hits = self.engine.search(interface="http", **request)
        except _RequestError as exc:
            self._error(exc.status, exc.field, str(exc))
        except InvalidQuery as exc:
            self._error(HTTPStatus.BAD_REQUEST, exc.field, str(exc))
        except UnknownIndex as exc:
            self._error(HTTPStatus.NOT_FOUND, "indice_name", str(exc))
        except Exception:  # noqa: BLE001 - a bug must answer 500, not drop the connection
            log.exception("knn-service failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "server", "internal error")
        else:
            self._json(HTTPStatus.OK, [hit.to_json() for hit in hits])

    def _read_body(self) -> bytes:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            # Without a length we cannot find the end of the body on a kept-alive connection.
            self.close_connection = True
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length", "required")
        try:
            length = int(length_header)
        except ValueError:
            self.close_connection = True
            raise _RequestError(HTTPStatus.BAD_REQUEST, "Content-Length", "not an integer") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body", f"must be at most {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class SearchHttpServer:
    """Binds on construction (port 0 picks a free one); serves on a background thread after start()."""

    def __init__(self, engine: SearchEngine, host: str, port: int) -> None:
        handler = type("SearchHandler", (_Handler,), {"engine": engine})
        self._server = _Server((host, port), handler)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="search-http", daemon=True)
        self._thread.start()
        log.info("http serving", extra={"address": self.url})

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops accepting, waits for the serving loop, closes the socket. Safe to call twice."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout_s)
            self._thread = None
        self._server.server_close()
