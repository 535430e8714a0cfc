"""One HTTP POST to a webhook, connected to an address the guard checked.

``pinned.request`` connects to the checked IP, with the URL's host name for the ``Host`` header,
TLS SNI and certificate verification, so DNS is asked once (by the guard) and cannot be
rebound in between. Redirects are never followed, environment proxies never used, and the whole
attempt is bounded by one timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import urllib3
from urllib3.exceptions import HTTPError, ReadTimeoutError, SSLError

from db.models import utcnow
from worker.webhooks import pinned
from worker.webhooks.guard import Target

EXCERPT_CHARS = 500
USER_AGENT = "gpujobs-webhooks/1"


class SendError(Exception):
    """No answer: the connection failed, TLS failed, or the receiver took longer than the timeout."""


@dataclass(frozen=True)
class Answer:
    status: int
    excerpt: str
    location: str | None
    retry_after: float | None  # seconds, from a ``Retry-After`` header


def post(target: Target, addresses: list[str], body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    deadline = time.monotonic() + timeout
    request_headers = {
        **headers,
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    if target.authorization:
        request_headers["Authorization"] = target.authorization

    def answer(response: urllib3.BaseHTTPResponse) -> Answer:
        return Answer(
            status=response.status,
            excerpt=_excerpt(response, deadline),
            location=response.headers.get("Location"),
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )

    try:
        return pinned.request(
            "POST", target, addresses, headers=request_headers, deadline=deadline, read=answer, body=body
        )
    except pinned.Unreachable as exc:
        failures = [
            pinned.reason(error) if address == target.host else f"{address}: {pinned.reason(error)}"
            for address, error in exc.failures
        ]
    except ReadTimeoutError:
        raise SendError(f"no answer within {timeout:g} s") from None
    except SSLError as exc:
        raise SendError(f"TLS failed: {pinned.reason(exc)}") from None
    except HTTPError as exc:
        raise SendError(f"the request failed: {pinned.reason(exc)}") from None
    if not failures:
        raise SendError(f"no answer within {timeout:g} s")
    raise SendError(f"could not connect to {target.host} port {target.port}: {'; '.join(failures)}")


def _excerpt(response: urllib3.BaseHTTPResponse, deadline: float) -> str:
    """The start of the answer's body, read only while the attempt's time lasts."""
    chunks: list[bytes] = []
    size = 0
    while size < EXCERPT_CHARS * 4 and time.monotonic() < deadline:
        chunk = response.read(1024, decode_content=True)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")[:EXCERPT_CHARS]


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - utcnow()).total_seconds(), 0.0)
