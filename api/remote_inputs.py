"""Image inputs given as an ``https://`` URL or a ``data:`` URI become files of the tenant, at submit.

``resolve`` is the one entry point: every submit path calls it (``api.jobs.submit``'s sequence) after
the cheap checks, the idempotency look-up and the quota, and before the job is inserted. Why the
API and not the worker: the job's stored ``input`` then names the ``file_…`` that was used (as an
upload's would), a bad URL is a 422 naming the field before any job exists, and the worker keeps
reading inputs one way only (file ids from S3). The cost is the fetch's time inside the submit
request, bounded by ``GPUJOBS_INPUT_URL_TIMEOUT_SECONDS`` for all of a submit's URLs together; under
gevent it blocks no other request (``api.url_fetch``).

Each image is checked as an upload is (``api.files.check_image``: the bytes decide, not a declared
type) and stored as a ``File`` of purpose ``input``; the rows are added to the request's session and
committed with the job, so a failure leaves no file rows and no job (objects already put in S3 by a
submit that then failed are deleted, best effort). Dataset zips stay file ids only.
"""

from __future__ import annotations

import ipaddress
import logging
import mimetypes
import posixpath
import time
from urllib.parse import unquote, urlsplit

from flask import g

from api import config
from api.data_uri import DataUriError, is_data_uri
from api.data_uri import parse as parse_data_uri
from api.errors import ApiError, validation_error
from api.files import check_image, store
from api.url_fetch import FetchError, Policy, fetch
from db.storage import StorageError
from worker.jobs.spec import JobInput, file_fields

log = logging.getLogger(__name__)

Loc = list[str | int]


def is_remote(value: str) -> bool:
    """Whether an image field's value is a URL or a data URI (the input schema allows nothing else but file ids)."""
    return not value.startswith("file_")


def resolve(params: JobInput) -> JobInput:
    """``params`` with every image URL or data URI replaced by the id of a new file of the caller's tenant.

    Raises a 422 naming the field (``["body", "input", field]``, with the index in a list) for an address
    the guard refuses, a body over the size limit, a fetch past the deadline, too many redirects, an
    answer that is not an image, an ``http://`` URL where only https is allowed, a bad data URI; and a
    503 when storage is down. The same value twice in one input is fetched and stored once.
    """
    found = _remote_values(params)
    if not found:
        return params
    settings = config.settings()
    policy = Policy(
        allow_http=settings.input_url_allow_http,
        allow_private=settings.input_url_allow_private,
        allowed_networks=tuple(ipaddress.ip_network(n, strict=False) for n in settings.input_url_allowed_networks),
        max_bytes=settings.input_max_bytes_in_effect,
        max_redirects=settings.input_url_max_redirects,
        timeout=settings.input_url_timeout_seconds,
    )
    # End the request's read transaction: its database connection goes back to the pool while the fetches
    # wait (up to the deadline), instead of idling in a transaction that many slow URLs would exhaust the
    # pool with. Nothing is pending here (the checks before only read); the job's insert starts a new one.
    g.db.commit()
    deadline = time.monotonic() + settings.input_url_timeout_seconds
    files: dict[str, str] = {}  # value → file id
    stored: list[str] = []  # storage keys put so far, deleted if the submit fails
    try:
        for loc, value in found:
            if value not in files:
                data, filename = _read(value, loc, policy, deadline)
                image = check_image(data, loc)
                filename += mimetypes.guess_extension(image.content_type) or ""
                row = store(data, "input", filename, image.content_type, image.width, image.height)
                stored.append(row.storage_key)
                files[value] = row.id
    except ApiError:
        _forget(stored)
        raise
    return params.model_copy(update=_replaced(params, files))


def _remote_values(params: JobInput) -> list[tuple[Loc, str]]:
    """``(loc, value)`` of each URL or data URI in the input's image fields, in field order."""
    found: list[tuple[Loc, str]] = []
    for name, purpose in file_fields(type(params)).items():
        if purpose != "input":
            continue  # dataset zips: file ids only
        value = getattr(params, name)
        if isinstance(value, list):
            found += [(["body", "input", name, i], item) for i, item in enumerate(value) if is_remote(item)]
        elif isinstance(value, str) and is_remote(value):
            found.append((["body", "input", name], value))
    return found


def _read(value: str, loc: Loc, policy: Policy, deadline: float) -> tuple[bytes, str]:
    """The bytes a URL or data URI holds, and a file name (without extension) for them; a 422 at ``loc``."""
    if is_data_uri(value):
        try:
            return parse_data_uri(value, policy.max_bytes).data, "data-uri"
        except DataUriError as exc:
            raise validation_error(loc, str(exc)) from None
    try:
        fetched = fetch(value, policy, deadline)
    except FetchError as exc:
        raise validation_error(loc, str(exc)) from None
    name = posixpath.basename(unquote(urlsplit(fetched.url).path))
    return fetched.data, posixpath.splitext(name)[0] or "url"


def _replaced(params: JobInput, files: dict[str, str]) -> dict[str, object]:
    update: dict[str, object] = {}
    for name, purpose in file_fields(type(params)).items():
        value = getattr(params, name)
        if purpose != "input" or value is None:
            continue
        if isinstance(value, list):
            update[name] = [files.get(item, item) for item in value]
        else:
            update[name] = files.get(value, value)
    return update


def _forget(keys: list[str]) -> None:
    """Delete what a failed submit put in S3 (its ``File`` rows are never committed); best effort."""
    if not keys:
        return
    try:
        config.storage().delete_many(keys)
    except StorageError as exc:
        log.warning("could not delete %d stored inputs of a refused submit: %s", len(keys), exc)
