"""One HTTP POST to a webhook, connected to an address the guard checked.

urllib3 is given the checked IP to connect to, and the URL's host name for the ``Host`` header,
TLS SNI and certificate verification, so DNS is asked once (by the guard) and cannot be
rebound in between. Redirects are never followed, environment proxies never used, and the whole
attempt is bounded by one timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError, SSLError

from db.models import utcnow
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
    failures: list[str] = []
    for address in addresses:  # the next address only when this one cannot be reached at all
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pool = _pool(target, address, remaining)
        try:
            response = pool.urlopen(
                "POST",
                target.path,
                body=body,
                headers=request_headers,
                redirect=False,
                retries=False,
                assert_same_host=False,
                preload_content=False,
            )
            try:
                excerpt = _excerpt(response, deadline)
                return Answer(
                    status=response.status,
                    excerpt=excerpt,
                    location=response.headers.get("Location"),
                    retry_after=_retry_after(response.headers.get("Retry-After")),
                )
            finally:
                response.release_conn()
        except (NewConnectionError, ConnectTimeoutError) as exc:
            failures.append(_reason(exc) if address == target.host else f"{address}: {_reason(exc)}")
            continue
        except ReadTimeoutError:
            raise SendError(f"no answer within {timeout:g} s") from None
        except SSLError as exc:
            raise SendError(f"TLS failed: {_reason(exc)}") from None
        except HTTPError as exc:
            raise SendError(f"the request failed: {_reason(exc)}") from None
        finally:
            pool.close()
    if not failures:
        raise SendError(f"no answer within {timeout:g} s")
    raise SendError(f"could not connect to {target.host} port {target.port}: {'; '.join(failures)}")


def _pool(target: Target, address: str, timeout: float) -> urllib3.HTTPConnectionPool:
    limits = urllib3.Timeout(connect=timeout, read=timeout)
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            address,
            target.port,
            timeout=limits,
            retries=False,
            maxsize=1,
            cert_reqs="CERT_REQUIRED",
            server_hostname=target.host,
            assert_hostname=target.host,
        )
    return urllib3.HTTPConnectionPool(address, target.port, timeout=limits, retries=False, maxsize=1)


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


def _reason(exc: BaseException) -> str:
    """The cause in plain words (``connection refused``), without urllib3's connection repr."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[:1].lower() + cause.strerror[1:]
    if isinstance(exc, ConnectTimeoutError):
        return "timed out"
    return str(cause or exc)
