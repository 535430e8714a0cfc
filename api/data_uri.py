"""``data:`` URIs (RFC 2397) as image inputs: parsed with their size bounded before anything is decoded.

A client that has the image in memory can send it inside the job's JSON instead of uploading it
first (Replicate's clients do this for small files). The declared media type is not trusted (clients
often say ``application/octet-stream``): what the bytes are is decided by the same image check as an
upload (``api.files.check_image``), run by the caller. Pure functions, no Flask: unit-tested alone.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

MAX_HEADER_CHARS = 256  # ``data:`` + media type and parameters, up to the comma
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class DataUriError(ValueError):
    """A data URI that cannot be used; the message completes "the field …" for a 422."""


@dataclass(frozen=True)
class DataUri:
    media_type: str  # as declared (lower case), e.g. ``image/png``; ``text/plain`` when none is
    data: bytes


def is_data_uri(value: str) -> bool:
    return value[:5].lower() == "data:"


def encoded_limit(max_bytes: int, base64_encoded: bool) -> int:
    """The longest payload that can decode to at most ``max_bytes``: checked before decoding."""
    return 4 * -(-max_bytes // 3) if base64_encoded else 3 * max_bytes


def parse(uri: str, max_bytes: int) -> DataUri:
    """The bytes of ``data:[<media type>][;param=value]*[;base64],<data>``; raises ``DataUriError``.

    Over ``max_bytes`` is refused from the payload's length before decoding, and again from the decoded
    length (percent-encoding can be shorter than three characters a byte)."""
    if not is_data_uri(uri):
        raise DataUriError("is not a data: URI (data:image/png;base64,…)")
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise DataUriError("is a data: URI without the comma that ends its header (data:image/png;base64,…)")
    if len(header) > MAX_HEADER_CHARS:
        raise DataUriError(f"is a data: URI whose header (before the comma) is over {MAX_HEADER_CHARS} characters")
    params = [part.strip() for part in header.split(";")]
    media_type = params[0].lower() or "text/plain"
    if "/" not in media_type:
        raise DataUriError(f"is a data: URI whose media type {params[0]!r} is not a type/subtype (image/png)")
    base64_encoded = len(params) > 1 and params[-1].lower() == "base64"
    limit = encoded_limit(max_bytes, base64_encoded)
    if len(payload) > limit:
        raise DataUriError(
            f"is a data: URI of {len(payload)} characters, more than the {limit} that an image of at most "
            f"{max_bytes} bytes needs; upload it with POST /v1/files or give its URL"
        )
    if not payload:
        raise DataUriError("is a data: URI with no data after the comma")
    data = _base64(payload) if base64_encoded else unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise DataUriError(f"is a data: URI of {len(data)} bytes once decoded, more than the limit of {max_bytes}")
    return DataUri(media_type=media_type, data=data)


def _base64(payload: str) -> bytes:
    """Standard base64 (padding optional, as browsers and clients often leave it off); strict otherwise."""
    if not _BASE64.fullmatch(payload):
        bad = next((char for char in payload if not re.match(r"[A-Za-z0-9+/=]", char)), None)
        if bad is None:
            raise DataUriError("is a data: URI whose base64 data has '=' padding before its end")
        raise DataUriError(f"is a data: URI whose base64 data has a character base64 does not use: {bad!r}")
    padded = payload.rstrip("=")
    padded += "=" * (-len(padded) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataUriError(f"is a data: URI whose base64 data does not decode: {exc}") from None
