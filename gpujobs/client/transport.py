"""HTTP for the SDK on urllib3 (a base dependency already: the SDK adds none), with bounded retries.

Retried, with the same request each time: connection errors (refused, dropped, timed out) and the answers
that say "not now" (429 and 503, after their ``Retry-After``). Nothing else is: a 4xx will not change, and a
500 is a bug to report. A submit is safe to retry because the client sends it with an ``Idempotency-Key``
(``Client.submit``): if the first attempt's answer was lost after the server committed the job, the retry
gets that job back (200) instead of a second one. A ``Retry-After`` longer than ``max_retry_wait`` is not
slept through: the error is raised at once, so a caller never hangs for a quota's minute unawares.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin

import urllib3

from gpujobs.client.errors import ConnectionFailed, GpujobsError, from_response

RETRY_STATUSES = (429, 503)
BACKOFF_SECONDS = 0.5  # the first wait after a connection error (doubled each time, with jitter)


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class Transport:
    """One connection pool to the API; ``request`` returns a 2xx ``Answer`` or raises a ``GpujobsError``."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float,
        max_retries: int,
        max_retry_wait: float,
        user_agent: str,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = url.rstrip("/") + "/"
        self.key, self.timeout = key, timeout
        self.max_retries, self.max_retry_wait = max(0, max_retries), max_retry_wait
        self.sleep = sleep
        self.headers = {"Authorization": f"Bearer {key}", "User-Agent": user_agent}
        self.pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=timeout, read=timeout))

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        pairs = {k: v for k, v in (query or {}).items() if v is not None}
        return urljoin(self.base, path.lstrip("/")) + (f"?{urlencode(pairs)}" if pairs else "")

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        fields: Mapping[str, Any] | None = None,
        query: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        held: float = 0.0,
    ) -> Answer:
        """Send (and resend, within the retry budget) one request; a 2xx or 3xx answer, else the exception.

        ``held``: seconds the server may hold the answer on purpose (``Prefer: wait``), added to the read timeout."""
        sent = {**self.headers, **(headers or {})}
        body: bytes | None = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent["Content-Type"] = "application/json"
        elif fields is not None:
            body, content_type = urllib3.encode_multipart_formdata(dict(fields))
            sent["Content-Type"] = content_type
        url = self.url(path, query)
        attempt = 0
        while True:
            try:
                response = self.pool.request(
                    method,
                    url,
                    body=body,
                    headers=sent,
                    redirect=False,
                    timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout + held),
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt >= self.max_retries:
                    raise ConnectionFailed(f"{method} {url}: no answer after {attempt + 1} tries: {exc}") from exc
                self._wait(self.backoff(attempt))
                attempt += 1
                continue
            if response.status < 400:
                return Answer(response.status, dict(response.headers), response.data)
            error = from_response(response.status, response.data, response.headers.get("Retry-After"))
            if response.status not in RETRY_STATUSES or attempt >= self.max_retries:
                raise error
            self._wait(self.retry_delay(error, attempt))
            attempt += 1

    def _wait(self, seconds: float) -> None:
        """Sleep before a retry, then let go of the idle pooled connections: after a wait of seconds the
        server may have closed them (gunicorn's keep-alive is 2 s), and a request sent on one just as it
        closes is reset, which would spend a retry on nothing. The next request opens a fresh one."""
        self.sleep(seconds)
        self.pool.clear()

    def retry_delay(self, error: GpujobsError, attempt: int) -> float:
        """How long to wait before resending after a 429/503: its ``Retry-After``; raises it when that is too long."""
        delay = error.retry_after if error.retry_after is not None else self.backoff(attempt)
        if delay > self.max_retry_wait:
            raise error
        return delay

    def backoff(self, attempt: int) -> float:
        delay: float = min(BACKOFF_SECONDS * 2**attempt, self.max_retry_wait)
        return delay * random.uniform(0.5, 1.0)

    def open_stream(self, path: str, headers: Mapping[str, str], read_timeout: float) -> urllib3.BaseHTTPResponse:
        """A GET whose body is read as it comes (the event stream): the response, unread, once its status is 2xx."""
        url = self.url(path)
        response = self.pool.request(
            "GET",
            url,
            headers={**self.headers, **headers},
            preload_content=False,
            redirect=False,
            timeout=urllib3.Timeout(connect=self.timeout, read=read_timeout),
        )
        if response.status >= 400:
            data = response.read()
            response.release_conn()
            raise from_response(response.status, data, response.headers.get("Retry-After"))
        return response

    def fetch(self, url: str) -> urllib3.BaseHTTPResponse:
        """GET an artifact (a presigned URL, so no key is sent unless it is the API's own), streamed."""
        absolute = urljoin(self.base, url)
        headers = dict(self.headers) if absolute.startswith(self.base) else {"User-Agent": self.headers["User-Agent"]}
        try:
            response = self.pool.request("GET", absolute, headers=headers, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ConnectionFailed(f"GET {absolute}: {exc}") from exc
        if response.status >= 400:
            data = response.read()
            response.release_conn()
            raise from_response(response.status, data, response.headers.get("Retry-After"))
        return response
