"""S3-compatible object storage (AWS S3, MinIO, R2, SeaweedFS) through boto3.

Lives in ``db/`` because, like the database, it holds state that both the API
(uploaded inputs, presigned downloads) and the workers (job outputs) use.
Keys: ``inputs/<file id>``, ``jobs/<job id>/<attempt>/<name>`` (each attempt of a job writes under its
own number, so a stale attempt cannot overwrite the winner's outputs), ``jobs/<job id>/checkpoints/<attempt>/...``
and ``models/<model id>/...``.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from db.settings import Settings, get_settings


class StorageError(Exception):
    """An object could not be stored, read or deleted (after the client's bounded retries)."""


class StorageUnavailable(StorageError):
    """The storage service did not answer in time, refused the connection or answered 5xx: a transient
    outage (the API answers 503; a job keeps its outputs and tries again)."""


# Error codes S3 answers when it is overloaded or briefly unwell: an outage, not a bad request.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException"}
)


def _storage_error(what: str, exc: Exception) -> StorageError:
    """The StorageError for a botocore failure: ``StorageUnavailable`` when the service is down or hung."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status >= 500 or error.get("Code") in _TRANSIENT_CODES:
            return StorageUnavailable(f"{what}: storage answered {status} {error.get('Code')}")
        return StorageError(f"{what}: {exc}")
    return StorageUnavailable(f"{what}: {exc}")  # connection refused or reset, a timeout, a bad endpoint


DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects call takes


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str
    content_type: str


class Storage:
    """One bucket. Every call is bounded: ``s3_connect_timeout_seconds`` to connect,
    ``s3_read_timeout_seconds`` per socket read, and at most ``s3_max_attempts`` tries in botocore's
    standard retry mode, the only retry layer here (longer waits, such as a job riding out an outage,
    belong to the caller). Every failure is raised as ``StorageError`` (``StorageUnavailable`` for an
    outage), never as a botocore exception."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        self._clients: dict[tuple[str | None, int, float | None], Any] = {}
        self._clients_lock = threading.Lock()
        self._session: boto3.session.Session | None = None

    def _client(self, endpoint: str | None, attempts: int, timeout: float | None = None):  # type: ignore[no-untyped-def]
        """A new client; call it holding ``_clients_lock`` (a boto3 session is not thread-safe).

        The first one reads and parses botocore's S3 model: about 0.1 s of CPU, which under gevent
        holds every other request of the process (``/healthz`` too). The others reuse the session's
        parsed model and cost a few milliseconds, hence one session per ``Storage``."""
        s = self.settings
        connect = min(s.s3_connect_timeout_seconds, timeout) if timeout else s.s3_connect_timeout_seconds
        if self._session is None:
            self._session = boto3.session.Session()
        return self._session.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=s.s3_access_key,
            aws_secret_access_key=s.s3_secret_key,
            region_name=s.s3_region,
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"total_max_attempts": attempts, "mode": "standard"},
                connect_timeout=connect,
                read_timeout=timeout or s.s3_read_timeout_seconds,
                max_pool_connections=32,
            ),
        )

    def client_for(self, attempts: int | None = None, timeout: float | None = None):  # type: ignore[no-untyped-def]
        """The boto3 client making at most ``attempts`` tries per call (default ``s3_max_attempts``), each
        bounded by ``timeout`` seconds to connect and per read if given (else the settings' timeouts)."""
        attempts = attempts or self.settings.s3_max_attempts
        endpoint = self.settings.s3_endpoint_url
        with self._clients_lock:
            if (endpoint, attempts, timeout) not in self._clients:
                self._clients[(endpoint, attempts, timeout)] = self._client(endpoint, attempts, timeout)
            return self._clients[(endpoint, attempts, timeout)]

    @property
    def client(self):  # type: ignore[no-untyped-def]
        return self.client_for()

    @cached_property
    def presign_client(self):  # type: ignore[no-untyped-def]
        public = self.settings.s3_public_url
        if not public or public == self.settings.s3_endpoint_url:
            return self.client
        with self._clients_lock:
            return self._client(public, 1)

    def ensure_bucket(self) -> None:
        try:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500:
                    raise
                self.client.create_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error(f"could not find or create the bucket {self.bucket}", exc) from exc

    def ping(self, timeout: float | None = None) -> None:
        """One try, no retry, within ``timeout`` seconds to connect and to answer (default: the settings'
        timeouts): for readiness probes, which must answer quickly whatever the storage does."""
        try:
            self.client_for(attempts=1, timeout=timeout).head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error(f"the bucket {self.bucket} does not answer", exc) from exc

    def put(self, key: str, data: bytes, content_type: str, attempts: int | None = None) -> StoredObject:
        """Store ``data`` (at most ``attempts`` tries, default ``s3_max_attempts``); the server checks its
        Content-MD5, so success means these exact bytes are stored."""
        digest = hashlib.sha256(data).hexdigest()
        content_md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            # The server refuses a body that does not match its Content-MD5 (no HEAD round trip needed).
            self.client_for(attempts).put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ContentMD5=content_md5,
                Metadata={"sha256": digest},
            )
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error(f"could not store {key}", exc) from exc
        return StoredObject(key=key, size=len(data), sha256=digest, content_type=content_type)

    def get(self, key: str) -> bytes:
        try:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return data
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error(f"could not read {key}", exc) from exc

    def delete(self, key: str) -> None:
        """Remove an object (S3 answers success for a key that is already gone)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error(f"could not delete {key}", exc) from exc

    def delete_many(self, keys: list[str]) -> int:
        """Remove these objects with ``DeleteObjects``, 1000 keys per call (S3's limit); how many were asked.

        Raises if any key could not be deleted (a key already gone is not an error), so the caller knows that
        every object it named is gone once this returns."""
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), DELETE_BATCH):
            chunk = unique[start : start + DELETE_BATCH]
            try:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True}
                )
            except (BotoCoreError, ClientError) as exc:
                raise _storage_error(f"could not delete {len(chunk)} objects", exc) from exc
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} of {len(chunk)} objects: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(unique)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix``; how many there were."""
        removed = 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    removed += len(keys)
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error(f"could not delete {prefix}*", exc) from exc
        return removed

    def presigned_url(self, key: str, filename: str | None = None) -> str:
        """A download URL, signed locally (no request to the storage service)."""
        params = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        try:
            url: str = self.presign_client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=self.settings.presign_expiry_seconds
            )
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error(f"could not sign a URL for {key}", exc) from exc
        return url


_lock = threading.Lock()
_storages: dict[tuple[str | None, str], Storage] = {}


def get_storage(settings: Settings | None = None) -> Storage:
    settings = settings or get_settings()
    cache_key = (settings.s3_endpoint_url, settings.s3_bucket)
    with _lock:
        if cache_key not in _storages:
            _storages[cache_key] = Storage(settings)
        return _storages[cache_key]


def reset_storages() -> None:
    with _lock:
        _storages.clear()
