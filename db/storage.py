"""S3-compatible object storage (AWS S3, MinIO, R2, SeaweedFS) through boto3.

Lives in ``db/`` because, like the database, it holds state that both the API
(uploaded inputs, presigned downloads) and the workers (job outputs) use.
Keys: ``inputs/<file id>``, ``jobs/<job id>/<name>``, ``models/<model id>/...``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from db.settings import Settings, get_settings

log = logging.getLogger(__name__)


class StorageError(Exception):
    """An object could not be stored or read after every retry."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str
    content_type: str


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket

    def _client(self, endpoint: str | None):  # type: ignore[no-untyped-def]
        s = self.settings
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=s.s3_access_key,
            aws_secret_access_key=s.s3_secret_key,
            region_name=s.s3_region,
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,
            ),
        )

    @cached_property
    def client(self):  # type: ignore[no-untyped-def]
        return self._client(self.settings.s3_endpoint_url)

    @cached_property
    def presign_client(self):  # type: ignore[no-untyped-def]
        public = self.settings.s3_public_url
        return self.client if not public or public == self.settings.s3_endpoint_url else self._client(public)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str, attempts: int | None = None) -> StoredObject:
        """Store ``data`` and check that what the server holds has its size; retried with backoff."""
        attempts = attempts or self.settings.upload_attempts
        digest = hashlib.sha256(data).hexdigest()
        content_md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        last: Exception | None = None
        for attempt in range(1, attempts + 1):
            try:
                # The server checks Content-MD5 and refuses a body that does not match it, so a
                # successful PUT means these exact bytes are stored (no HEAD round trip needed).
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    ContentMD5=content_md5,
                    Metadata={"sha256": digest},
                )
                return StoredObject(key=key, size=len(data), sha256=digest, content_type=content_type)
            except (BotoCoreError, ClientError) as exc:
                last = exc
                log.warning("upload of %s failed (attempt %d of %d): %s", key, attempt, attempts, exc)
                if attempt < attempts:
                    time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        raise StorageError(f"could not store {key} after {attempts} attempts: {last}")

    def get(self, key: str) -> bytes:
        try:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return data
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not read {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Remove an object (S3 answers success for a key that is already gone)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not delete {key}: {exc}") from exc

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
            raise StorageError(f"could not delete {prefix}*: {exc}") from exc
        return removed

    def presigned_url(self, key: str, filename: str | None = None) -> str:
        params = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self.presign_client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.settings.presign_expiry_seconds
        )
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
