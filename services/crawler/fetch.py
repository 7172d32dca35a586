"""Concurrent, defensive image downloads over aiohttp.

`ImageDownloader` is a plain asyncio class (no service or metrics dependencies) so that benchmarks
and tools can use it directly; `BackgroundDownloader` runs one on a persistent event-loop thread for
synchronous callers such as the Kafka handler and gRPC methods.

Safety, in the order it applies to a URL:
- syntax: http/https, a host, no credentials, at most 2048 characters;
- addresses: IP literals are checked before anything is sent, host names are checked inside the
  connector's resolver, so the address that was checked is the address connected to (no DNS
  rebinding between check and connect); redirects are followed by hand and every hop is re-checked;
- bytes: content type and Content-Length are checked before the body is read, the body is read in
  chunks and abandoned past the byte limit, magic bytes are checked on the first chunk;
- pixels: header dimensions are checked before decoding (decompression bombs), then size and aspect
  policy, then a full decode (truncated files) and a downscale to the staging size.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from services.crawler import status
from services.crawler.addresses import AddressPolicy, literal_address
from services.crawler.images import (
    MAGIC_BYTES_NEEDED,
    ImagePolicy,
    ImageRefused,
    ProcessedImage,
    content_type_acceptable,
    media_type,
    process_image,
    sniff_format,
)

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
DEFAULT_USER_AGENT = "iex-crawler/0.1 (Internet Explorer research crawler)"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024


def url_problem(url: str, max_length: int = MAX_URL_LENGTH) -> str | None:
    """What is wrong with a URL as a crawl target, or None. The text completes '<field>: ...'."""
    if not url or not url.strip():
        return "must not be empty"
    if len(url) > max_length:
        return f"longer than {max_length} characters"
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        return f"cannot be parsed ({str(exc)[:80]})"
    if parsed.scheme not in ("http", "https"):
        return "scheme must be http or https"
    try:
        host = parsed.host
        parsed.port  # noqa: B018 - raises on an out-of-range port
    except ValueError:
        return "has an invalid port"
    if not host:
        return "has no host"
    if parsed.user is not None or parsed.password is not None:
        return "must not carry credentials"
    return None


@dataclass(frozen=True)
class FetchPolicy:
    concurrency: int = 64
    per_host: int = 8
    connect_timeout_s: float = 5.0
    # Budget of the network part of one URL (every redirect hop and the whole body).
    total_timeout_s: float = 15.0
    max_bytes: int = 8 * 1024 * 1024
    max_redirects: int = 5
    allow_networks: tuple[str, ...] = ()
    user_agent: str = DEFAULT_USER_AGENT
    decode_workers: int = 2
    image: ImagePolicy = field(default_factory=ImagePolicy)


@dataclass(frozen=True)
class FetchResult:
    url: str
    status: str
    detail: str = ""
    final_url: str = ""
    http_status: int = 0
    redirects: int = 0
    # Of the staged bytes (after any re-encode): what ImageFetched describes.
    content_type: str = ""
    data: bytes | None = field(default=None, repr=False)
    sha256: str = ""
    width: int = 0
    height: int = 0
    # Bytes read from the network, whatever the outcome.
    downloaded_bytes: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == status.OK

    @property
    def size_bytes(self) -> int:
        return len(self.data) if self.data is not None else 0


class FetchRefused(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AddressBlocked(OSError):
    """Raised by the resolver when a host resolves only to refused addresses (an OSError so aiohttp wraps it)."""


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` and keeps only addresses the policy permits.

    Because aiohttp connects to exactly what the resolver returns, the check cannot be bypassed by a
    name that resolves differently a moment later. Mixed answers (a public and a private address)
    keep only the permitted ones: the refused address is never contacted.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):  # type: ignore[override]
        if self._inner is None:
            self._inner = ThreadedResolver()
        answers = await self._inner.resolve(host, port, family)
        permitted = [answer for answer in answers if self.policy.permits(answer["host"])]
        if not permitted:
            raise AddressBlocked(f"{host} resolves only to refused addresses")
        return permitted

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


@dataclass
class _Progress:
    downloaded_bytes: int = 0
    http_status: int = 0
    redirects: int = 0
    final_url: str = ""


class ImageDownloader:
    """Downloads and validates images with bounded concurrency; use inside one event loop.

        async with ImageDownloader(FetchPolicy(...)) as downloader:
            results = await downloader.fetch_many(urls)
    """

    def __init__(self, policy: FetchPolicy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.addresses = AddressPolicy.from_cidrs(policy.allow_networks)
        self._resolver = GuardedResolver(self.addresses, resolver)
        self._session: aiohttp.ClientSession | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._host_slots: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self.in_flight = 0

    async def start(self) -> None:
        policy = self.policy
        connector = aiohttp.TCPConnector(
            limit=policy.concurrency,
            limit_per_host=policy.per_host,
            resolver=self._resolver,
            ttl_dns_cache=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout_s, sock_read=policy.total_timeout_s),
            headers={"User-Agent": policy.user_agent, "Accept": "image/*"},
            # No cookies carried from one site to another, and no proxy from the environment: a proxy
            # would connect on our behalf and bypass the address checks.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._decode_pool = ThreadPoolExecutor(max_workers=policy.decode_workers, thread_name_prefix="crawler-decode")
        self._slots = asyncio.Semaphore(policy.concurrency)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._decode_pool = None

    async def __aenter__(self) -> "ImageDownloader":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # ---- public -----------------------------------------------------------------------------------
    async def fetch_many(self, urls: Sequence[str], deadline_s: float | None = None) -> list[FetchResult]:
        """Fetches every URL concurrently; results in input order. URLs unfinished at the deadline time out."""
        if not urls:
            return []
        tasks = [asyncio.ensure_future(self.fetch(url)) for url in urls]
        _done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        results = []
        for url, task in zip(urls, tasks):
            if task.cancelled() or not task.done():
                results.append(FetchResult(url, status.TIMEOUT, "query deadline", elapsed_s=deadline_s or 0.0))
            else:
                results.append(task.result())
        return results

    async def fetch(self, url: str) -> FetchResult:
        """One URL through every check; never raises for anything a remote server can cause."""
        assert self._slots is not None, "ImageDownloader.start() was not awaited"
        started = time.perf_counter()
        progress = _Progress(final_url=url)

        def refused(reason: str, detail: str = "") -> FetchResult:
            return FetchResult(
                url,
                reason,
                detail,
                final_url=progress.final_url,
                http_status=progress.http_status,
                redirects=progress.redirects,
                downloaded_bytes=progress.downloaded_bytes,
                elapsed_s=time.perf_counter() - started,
            )

        problem = url_problem(url)
        if problem is not None:
            return refused(status.BAD_URL, problem)
        host = (URL(url).host or "").lower()
        try:
            async with self._slots, self._host_slot(host):
                self.in_flight += 1
                try:
                    body, _header_type = await asyncio.wait_for(self._download(url, progress), self.policy.total_timeout_s)
                    processed, digest = await asyncio.get_running_loop().run_in_executor(self._decode_pool, _process, body, self.policy.image)
                finally:
                    self.in_flight -= 1
        except FetchRefused as exc:
            return refused(exc.reason, exc.detail)
        except ImageRefused as exc:
            return refused(exc.reason, exc.detail)
        except asyncio.TimeoutError:
            return refused(status.TIMEOUT, f"over {self.policy.total_timeout_s:g}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one odd URL must not fail its whole query
            log.exception("unexpected fetch failure", extra={"url": url[:300]})
            return refused(status.CONNECTION_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}")
        return FetchResult(
            url,
            status.OK,
            final_url=progress.final_url,
            http_status=progress.http_status,
            redirects=progress.redirects,
            content_type=processed.content_type,
            data=processed.data,
            sha256=digest,
            width=processed.width,
            height=processed.height,
            downloaded_bytes=progress.downloaded_bytes,
            elapsed_s=time.perf_counter() - started,
        )

    # ---- internals --------------------------------------------------------------------------------
    def _host_slot(self, host: str) -> "_HostSlot":
        return _HostSlot(self, host)

    def _check_literal(self, url: URL) -> None:
        address = literal_address(url.raw_host or "")
        if address is not None and not self.addresses.permits(address):
            raise FetchRefused(status.BLOCKED_ADDRESS, str(address))

    async def _download(self, url: str, progress: _Progress) -> tuple[bytes, str]:
        assert self._session is not None
        current = URL(url)
        seen = {str(current)}
        for hop in range(self.policy.max_redirects + 1):
            progress.redirects = hop
            progress.final_url = str(current)
            # IP literals never reach the resolver, so they are checked here, before any packet is sent.
            self._check_literal(current)
            try:
                async with self._session.get(current, allow_redirects=False) as response:
                    progress.http_status = response.status
                    if response.status in _REDIRECT_STATUSES:
                        current = self._next_hop(current, response, seen)
                        continue
                    if response.status != 200:
                        raise FetchRefused(status.HTTP_ERROR, f"HTTP {response.status}")
                    header_type = response.headers.get("Content-Type", "")
                    if not content_type_acceptable(header_type):
                        raise FetchRefused(status.NOT_IMAGE, f"content type {media_type(header_type)[:60]}")
                    length = response.content_length
                    if length is not None and length > self.policy.max_bytes:
                        raise FetchRefused(status.TOO_LARGE, f"Content-Length {length}")
                    body = await self._read_bounded(response, progress)
                    return body, header_type
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, AddressBlocked) or isinstance(exc.__cause__, AddressBlocked):
                    raise FetchRefused(status.BLOCKED_ADDRESS, str(current.host)) from None
                raise FetchRefused(status.CONNECTION_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}") from None
            except aiohttp.InvalidURL as exc:
                raise FetchRefused(status.BAD_URL, str(exc)[:120]) from None
            except aiohttp.ClientResponseError as exc:
                raise FetchRefused(status.HTTP_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}") from None
            except asyncio.TimeoutError:
                raise
            except (aiohttp.ClientError, OSError) as exc:
                raise FetchRefused(status.CONNECTION_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        raise FetchRefused(status.REDIRECT_LOOP, f"more than {self.policy.max_redirects} redirects")

    def _next_hop(self, current: URL, response: aiohttp.ClientResponse, seen: set[str]) -> URL:
        location = response.headers.get("Location", "")
        if not location:
            raise FetchRefused(status.HTTP_ERROR, f"HTTP {response.status} without Location")
        try:
            target = current.join(URL(location))
        except (ValueError, TypeError) as exc:
            raise FetchRefused(status.BAD_URL, f"redirect target: {str(exc)[:80]}") from None
        problem = url_problem(str(target))
        if problem is not None:
            raise FetchRefused(status.BAD_URL, f"redirect target {problem}")
        if str(target) in seen:
            raise FetchRefused(status.REDIRECT_LOOP, f"revisits {str(target)[:120]}")
        seen.add(str(target))
        return target

    async def _read_bounded(self, response: aiohttp.ClientResponse, progress: _Progress) -> bytes:
        limit = self.policy.max_bytes
        chunks: list[bytes] = []
        total = 0
        sniffed = False
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            total += len(chunk)
            progress.downloaded_bytes = total
            if total > limit:
                # Closing drops the connection: the rest of the body is never read.
                response.close()
                raise FetchRefused(status.TOO_LARGE, f"body over {limit} bytes")
            chunks.append(chunk)
            if not sniffed and total >= MAGIC_BYTES_NEEDED:
                sniffed = True
                head = b"".join(chunks)[:MAGIC_BYTES_NEEDED]
                if sniff_format(head) is None:
                    response.close()
                    raise FetchRefused(status.NOT_IMAGE, "magic bytes")
        return b"".join(chunks)


class _HostSlot:
    """Per-host concurrency limit; semaphores are dropped when their host has nothing in flight."""

    def __init__(self, downloader: ImageDownloader, host: str) -> None:
        self.downloader = downloader
        self.host = host
        self.semaphore: asyncio.Semaphore | None = None

    async def __aenter__(self) -> None:
        slots = self.downloader._host_slots
        semaphore, users = slots.get(self.host, (None, 0))
        if semaphore is None:
            semaphore = asyncio.Semaphore(self.downloader.policy.per_host)
        slots[self.host] = (semaphore, users + 1)
        self.semaphore = semaphore
        try:
            await semaphore.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info) -> None:
        assert self.semaphore is not None
        self.semaphore.release()
        self._leave()

    def _leave(self) -> None:
        slots = self.downloader._host_slots
        semaphore, users = slots[self.host]
        if users <= 1:
            del slots[self.host]
        else:
            slots[self.host] = (semaphore, users - 1)


def _process(body: bytes, policy: ImagePolicy) -> tuple[ProcessedImage, str]:
    processed = process_image(body, policy)
    return processed, hashlib.sha256(processed.data).hexdigest()


class BackgroundDownloader:
    """An ImageDownloader on a persistent event-loop thread, callable from any thread.

    Persistent rather than asyncio.run per query: the connection pool and DNS cache survive between
    queries (the offline web serves every image from one host, so keep-alive saves a TCP handshake per
    image), and gRPC threads (ProbeUrl) share the same limits as the Kafka handler.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._downloader: ImageDownloader | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="crawler-fetch-loop", daemon=True)
            thread.start()
            downloader = ImageDownloader(self.policy)
            asyncio.run_coroutine_threadsafe(downloader.start(), loop).result(timeout=30)
            self._loop, self._thread, self._downloader = loop, thread, downloader

    @property
    def in_flight(self) -> int:
        return self._downloader.in_flight if self._downloader is not None else 0

    def fetch_all(self, urls: Sequence[str], deadline_s: float | None = None) -> list[FetchResult]:
        self.start()
        assert self._loop is not None and self._downloader is not None
        future = asyncio.run_coroutine_threadsafe(self._downloader.fetch_many(list(urls), deadline_s), self._loop)
        # fetch_many enforces the deadline itself; the margin only covers scheduling.
        return future.result(timeout=None if deadline_s is None else deadline_s + 30)

    def fetch(self, url: str) -> FetchResult:
        return self.fetch_all([url], deadline_s=self.policy.total_timeout_s + 5)[0]

    def close(self) -> None:
        with self._lock:
            loop, thread, downloader = self._loop, self._thread, self._downloader
            self._loop = self._thread = self._downloader = None
        if loop is None:
            return
        try:
            if downloader is not None:
                asyncio.run_coroutine_threadsafe(downloader.close(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            loop.close()
