"""Object store over the minio SDK: content-addressed keys, buckets created on start, retries with backoff."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from services.common.errors import DependencyUnavailable, PermanentError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "the object is not there", never retried.
_ABSENT = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
# Errors that mean "this request can never succeed" (a malformed key, a bad argument). Reported as
# an outage, a key taken from a hostile event would make its consumer retry the record forever.
_INVALID = {"InvalidRequest", "InvalidArgument", "InvalidObjectName", "XMinioInvalidObjectName", "KeyTooLongError", "InvalidURI", "InvalidBucketName"}


PROBE_TIMEOUT_S = 2.0
# S3's DeleteObjects takes at most this many keys per request.
DELETE_MANY_MAX = 1000


class InvalidObjectRequest(PermanentError, ValueError):
    """S3 (or the client library, before sending) refused the request itself: no retry can succeed.

    A PermanentError, so a Kafka handler's record is dead-lettered with reason invalid_s3_request;
    a ValueError, so callers validating their input keep working.
    """

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_s3_request", detail)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(prefix: str, sha256: str, suffix: str = "") -> str:
    """prefix/ab/cd/abcdef...: two fan-out levels keep listings and S3 partitions balanced."""
    return f"{prefix.rstrip('/')}/{sha256[:2]}/{sha256[2:4]}/{sha256}{suffix}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without leading or trailing slash)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, prefix.strip("/")


class ObjectStore:
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str = "us-east-1",
        attempts: int = 5,
        base_delay_s: float = 0.2,
    ) -> None:
        # Short timeouts and no urllib3 retries: our own loop retries with backoff and reports outages.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=30.0),
            retries=False,
            maxsize=16,
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http)
        # Readiness probes get their own short timeouts: with the 30 s read timeout above, a hung S3
        # (accepting connections, answering nothing) kept a service SERVING for the whole outage
        # and stalled its health loop (found by the chaos suite's S3 freeze).
        probe_http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=PROBE_TIMEOUT_S), retries=False, maxsize=2)
        self._probe = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=probe_http)
        self.endpoint = endpoint
        self.attempts = attempts
        self.base_delay_s = base_delay_s

    @classmethod
    def from_settings(cls, settings) -> "ObjectStore":
        return cls(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, settings.s3_secure, settings.s3_region)

    def _retry(self, what: str, operation: Callable[[], T]) -> T:
        delay = self.base_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except S3Error as exc:
                if exc.code in _ABSENT or exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise
                if exc.code in _INVALID:
                    raise InvalidObjectRequest(f"{what[:200]}: {exc.code}") from exc
                error: Exception = exc
            except (ValueError, TypeError) as exc:
                # The minio client checks bucket and object names before sending ('..' segments, empty names).
                raise InvalidObjectRequest(f"{what[:200]}: {exc or type(exc).__name__}") from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = exc
            if attempt == self.attempts:
                raise DependencyUnavailable(f"s3 {what} failed after {attempt} attempts: {error}") from error
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def ensure_bucket(self, bucket: str) -> None:
        def create() -> None:
            if not self.client.bucket_exists(bucket):
                try:
                    self.client.make_bucket(bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self._retry(f"ensure bucket {bucket}", create)

    def ping(self) -> bool:
        try:
            self._probe.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - health probe: any failure means not ready
            return False

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream", metadata: Mapping[str, str] | None = None) -> None:
        self._retry(
            f"put {key}",
            lambda: self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata=dict(metadata or {})),
        )

    def get_bytes(self, bucket: str, key: str) -> bytes:
        def get() -> bytes:
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry(f"get {key}", get)

    def get_or_none(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.get_bytes(bucket, key)
        except S3Error as exc:
            if exc.code in _ABSENT:
                return None
            raise

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._retry(f"stat {key}", lambda: self.client.stat_object(bucket, key))
            return True
        except S3Error as exc:
            if exc.code in _ABSENT:
                return False
            raise

    def stat_metadata(self, bucket: str, key: str) -> dict[str, str] | None:
        try:
            stat = self._retry(f"stat {key}", lambda: self.client.stat_object(bucket, key))
        except S3Error as exc:
            if exc.code in _ABSENT:
                return None
            raise
        return {k.lower().removeprefix("x-amz-meta-"): v for k, v in (stat.metadata or {}).items() if k.lower().startswith("x-amz-meta-")}

    def copy(self, bucket: str, source_key: str, dest_key: str) -> None:
        self._retry(f"copy {source_key}", lambda: self.client.copy_object(bucket, dest_key, CopySource(bucket, source_key)))

    def delete(self, bucket: str, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.client.remove_object(bucket, key))

    def delete_many(self, bucket: str, keys: Sequence[str]) -> None:
        """Deletes up to 1,000 keys in one request (S3 DeleteObjects); absent keys are fine."""
        if not keys:
            return
        if len(keys) > DELETE_MANY_MAX:
            raise ValueError(f"delete_many takes at most {DELETE_MANY_MAX} keys, got {len(keys)}")

        def delete() -> None:
            # The client sends the request when its error iterator is consumed.
            errors = [e for e in self.client.remove_objects(bucket, [DeleteObject(key) for key in keys]) if e.code not in _ABSENT]
            if errors:
                raise DependencyUnavailable(f"s3 delete of {len(errors)} of {len(keys)} keys failed: {errors[0].code} {errors[0].name}")

        self._retry(f"delete {len(keys)} keys", delete)

    def list_keys(self, bucket: str, prefix: str, recursive: bool = True) -> Iterator[str]:
        objects = self._retry(f"list {prefix}", lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=recursive)))
        for obj in objects:
            if not obj.is_dir:
                yield obj.object_name

    def put_json(self, bucket: str, key: str, value: Any) -> None:
        self.put_bytes(bucket, key, json.dumps(value, sort_keys=True).encode(), content_type="application/json")

    def get_json(self, bucket: str, key: str) -> Any | None:
        data = self.get_or_none(bucket, key)
        return None if data is None else json.loads(data)
