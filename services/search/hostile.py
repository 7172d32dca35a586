"""A hostile web for tests and demos: every way a URL from a search result can go wrong, on one server.

    python -m services.search.hostile --port 18099        # then point a crawler's clip-retrieval backend at it

Each case is a path with the status a crawler must end it with (services/crawler/status.py). The
server also answers clip-retrieval's POST /knn-service with every case as a hit, whatever the text,
so the real crawler service can be run against it end to end, and GET /cases lists the cases
with their expected statuses.

The expected statuses assume the crawler's defaults for sizes (8 MiB body limit, 40 Mpx pixel
limit, 32 px minimum side, aspect at most 4) with loopback allowed, robots.txt honoured and a
total timeout shorter than HANG_SECONDS.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from aiohttp import web
from PIL import Image

# Long enough that any sane crawler timeout fires first; short enough that a stopped server's
# handlers do not linger.
HANG_SECONDS = 60.0
HUGE_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class HostileCase:
    name: str
    path: str
    expected: str
    what: str


CASES: tuple[HostileCase, ...] = (
    HostileCase("ok_jpeg", "/img/ok.jpg", "ok", "a plain photo"),
    HostileCase("ok_png", "/img/ok.png", "ok", "a plain PNG"),
    HostileCase("duplicate_a", "/dup/a.jpg", "ok", "the same bytes as ok.jpg under another URL"),
    HostileCase("duplicate_b", "/img/ok.jpg?copy=2", "ok", "the same bytes again, a query string apart"),
    HostileCase("jpeg_named_png", "/img/really-a-jpeg.png", "ok", "a JPEG served as image/png: the bytes decide"),
    HostileCase("octet_stream", "/img/octet.jpg", "ok", "a JPEG served as application/octet-stream"),
    HostileCase("flaky_then_ok", "/flaky/ok.jpg", "ok", "503 (Retry-After: 0) on the server's first request for it, then the image"),
    HostileCase("redirect_ok", "/redirect/ok", "ok", "one redirect to a good image"),
    HostileCase("not_found", "/missing.jpg", "http_error", "404"),
    HostileCase("server_error", "/error.jpg", "http_error", "500 every time"),
    HostileCase("hang", "/hang.jpg", "timeout", "accepts and never answers"),
    HostileCase("slow_drip", "/drip.jpg", "timeout", "headers, then a byte every few seconds"),
    HostileCase("redirect_loop", "/loop/a", "redirect_loop", "a -> b -> a"),
    HostileCase("redirect_to_metadata", "/redirect/metadata", "blocked_address", "a redirect to 169.254.169.254"),
    HostileCase("redirect_to_private", "/redirect/private", "blocked_address", "a redirect to 10.0.0.1"),
    HostileCase("html_named_jpg", "/page.jpg", "not_image", "an HTML page named .jpg, served as text/html"),
    HostileCase("html_as_jpeg", "/lying.jpg", "not_image", "HTML served as image/jpeg"),
    HostileCase("svg_named_jpg", "/vector.jpg", "not_image", "an SVG named .jpg (image/svg+xml)"),
    HostileCase("png_as_text", "/img/text.png", "not_image", "a real PNG served as text/plain"),
    HostileCase("truncated_jpeg", "/truncated.jpg", "decode_error", "a JPEG cut in half"),
    HostileCase("decompression_bomb", "/bomb.png", "too_large", "a 30000x30000 PNG of a few hundred bytes"),
    HostileCase("huge_declared", "/huge.jpg", "too_large", "50 MB with Content-Length"),
    HostileCase("huge_streamed", "/huge-stream.jpg", "too_large", "50 MB chunked, no Content-Length"),
    HostileCase("tiny", "/tiny.png", "too_small", "an 8x8 icon"),
    HostileCase("banner", "/banner.png", "bad_aspect", "a 600x40 banner"),
    HostileCase("robots_disallowed", "/private/secret.jpg", "robots", "disallowed by robots.txt"),
    HostileCase("noai", "/noai.jpg", "noai", "X-Robots-Tag: noai"),
)


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    image = Image.merge("RGB", [Image.effect_noise(size, 30 + 7 * ((seed + i) % 5)) for i in range(3)])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    image = Image.merge("RGB", [Image.effect_noise(size, 40 + 10 * i) for i in range(3)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header announcing width x height 1-bit pixels, with a tiny (and short) image stream."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 64, 9)  # only the first rows: enough to look real
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"


class HostileWeb:
    """The server on its own thread and event loop; `url(case)` gives a case's URL."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, hang_s: float = HANG_SECONDS) -> None:
        self.host = host
        self.hang_s = hang_s
        self.jpeg = _jpeg((320, 240), 1)
        self.png = _png((96, 64))
        self.requests: dict[str, int] = {}
        self._flaky_seen = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-web", daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(30)

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, case: HostileCase | str) -> str:
        path = case.path if isinstance(case, HostileCase) else case
        return self.base_url + path

    def expected(self) -> dict[str, str]:
        """URL -> the status a crawler must end it with."""
        return {self.url(case): case.expected for case in CASES}

    # ---- server ------------------------------------------------------------------------------
    async def _start(self, port: int) -> web.AppRunner:
        app = web.Application(middlewares=[self._count])
        def answer(body: bytes, content_type: str, code: int = 200, headers: dict[str, str] | None = None):
            async def handler(request: web.Request) -> web.Response:
                return web.Response(body=body, status=code, headers={"Content-Type": content_type, **(headers or {})})

            return handler

        def redirect(location: str):
            async def handler(request: web.Request) -> web.Response:
                return web.Response(status=302, headers={"Location": location})

            return handler

        routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "/robots.txt": answer(ROBOTS_TXT.encode(), "text/plain"),
            "/img/ok.jpg": answer(self.jpeg, "image/jpeg"),
            "/img/ok.png": answer(self.png, "image/png"),
            "/dup/a.jpg": answer(self.jpeg, "image/jpeg"),
            "/img/really-a-jpeg.png": answer(_jpeg((200, 150), 2), "image/png"),
            "/img/octet.jpg": answer(_jpeg((180, 120), 3), "application/octet-stream"),
            "/flaky/ok.jpg": self._flaky,
            "/redirect/ok": redirect("/img/ok.png"),
            "/error.jpg": answer(b"internal error", "text/plain", 500),
            "/hang.jpg": self._hang,
            "/drip.jpg": self._drip,
            "/loop/a": redirect("/loop/b"),
            "/loop/b": redirect("/loop/a"),
            "/redirect/metadata": redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
            "/redirect/private": redirect("http://10.0.0.1/admin.png"),
            "/page.jpg": answer(b"<!doctype html><title>Not found</title><p>gone</p>", "text/html"),
            "/lying.jpg": answer(b"<!doctype html>" + b"<p>not an image</p>" * 40, "image/jpeg"),
            "/vector.jpg": answer(b'<svg xmlns="http://www.w3.org/2000/svg" width="9999" height="9999"><script>alert(1)</script></svg>', "image/svg+xml"),
            "/img/text.png": answer(self.png, "text/plain"),
            "/truncated.jpg": answer(self.jpeg[: len(self.jpeg) // 2], "image/jpeg"),
            "/bomb.png": answer(bomb_png(), "image/png"),
            "/huge.jpg": self._huge,
            "/huge-stream.jpg": self._huge_stream,
            "/tiny.png": answer(_png((8, 8)), "image/png"),
            "/banner.png": answer(_png((600, 40)), "image/png"),
            "/private/secret.jpg": answer(self.jpeg, "image/jpeg"),
            "/noai.jpg": answer(self.jpeg, "image/jpeg", headers={"X-Robots-Tag": "noai, noimageai"}),
            "/cases": self._cases,
        }
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        app.router.add_post("/knn-service", self._knn)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, self.host, port).start()
        return runner

    @web.middleware
    async def _count(self, request: web.Request, handler):
        self.requests[request.path] = self.requests.get(request.path, 0) + 1
        return await handler(request)

    async def _flaky(self, request: web.Request) -> web.Response:
        # The first request fails: a client that retries transient errors gets the image on its second try.
        self._flaky_seen += 1
        if self._flaky_seen == 1:
            return web.Response(status=503, text="try again", headers={"Retry-After": "0"})
        return web.Response(body=self.jpeg, content_type="image/jpeg")

    async def _hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.hang_s)
        return web.Response(body=self.jpeg, content_type="image/jpeg")

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(self.jpeg))})
        await response.prepare(request)
        try:
            for offset in range(len(self.jpeg)):
                await response.write(self.jpeg[offset : offset + 1])
                await asyncio.sleep(min(3.0, self.hang_s))
        except (ConnectionError, RuntimeError):
            pass
        return response

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(HUGE_BYTES)})
        await response.prepare(request)
        await self._write_zeros(response, HUGE_BYTES - 3, prefix=b"\xff\xd8\xff")
        return response

    async def _huge_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await self._write_zeros(response, HUGE_BYTES - 3, prefix=b"\xff\xd8\xff")
        return response

    @staticmethod
    async def _write_zeros(response: web.StreamResponse, total: int, prefix: bytes) -> None:
        block = b"\0" * (256 * 1024)
        try:
            await response.write(prefix)
            sent = 0
            while sent < total:
                piece = block[: min(len(block), total - sent)]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up once it had seen enough, as it should

    async def _cases(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": c.name, "url": self.url(c), "expected": c.expected, "what": c.what} for c in CASES])

    async def _knn(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            wanted = int(body.get("num_images") or len(CASES))
        except (ValueError, TypeError):
            return web.json_response({"error": "body: not a clip-retrieval request"}, status=400)
        hits = [{"id": i, "url": self.url(case), "caption": case.what, "similarity": round(1.0 - i / 100, 2)} for i, case in enumerate(CASES)]
        return web.json_response(hits[:wanted])

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def __enter__(self) -> "HostileWeb":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.search.hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free one)")
    parser.add_argument("--hang-seconds", type=float, default=HANG_SECONDS, help="how long the hanging cases hang")
    args = parser.parse_args(argv)
    web_ = HostileWeb(args.host, args.port, args.hang_seconds)
    print(json.dumps({"url": web_.base_url, "knn_service": f"{web_.base_url}/knn-service", "cases": len(CASES)}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        web_.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
