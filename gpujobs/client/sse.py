"""A small server-sent events reader (the WHATWG parsing rules) over a streamed urllib3 response.

Written here rather than taken from a package so the SDK stays on its base dependencies. It reads whatever
bytes have arrived (``read1``), so an event is handed over as soon as its blank line is in, not when a
buffer fills; comments (the server's ``: keep-alive``) are surfaced as ``None`` so a reader can check its
own deadline while a job is idle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class Readable(Protocol):
    def read1(self, amt: int = ..., /) -> bytes: ...


@dataclass
class RawEvent:
    event: str
    data: str
    id: str | None
    retry_ms: int | None


def lines(stream: Readable, chunk: int = 65536) -> Iterator[str]:
    """The stream's lines (CR, LF or CRLF ended), decoded as UTF-8, until the stream ends."""
    pending = b""
    while True:
        data = stream.read1(chunk)
        if not data:
            if pending:
                yield pending.decode("utf-8", "replace")
            return
        pending += data
        while True:
            cr, lf = pending.find(b"\r"), pending.find(b"\n")
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            end = min(ends)
            if pending[end : end + 1] == b"\r" and end + 1 == len(pending):
                break  # a CR at the end of what came: its LF may be next
            line, skip = pending[:end], 2 if pending[end : end + 2] == b"\r\n" else 1
            pending = pending[end + skip :]
            yield line.decode("utf-8", "replace")


def events(stream: Readable) -> Iterator[RawEvent | None]:
    """Dispatched events, and ``None`` for each comment line (a keep-alive), until the stream ends.

    An event's ``id`` is its own ``id:`` line or None (the service's ``progress`` and ``job`` events have none);
    the caller keeps the last one seen, which is what a reconnect sends as ``Last-Event-ID``."""
    data: list[str] = []
    name, event_id, retry = "", None, None
    for line in lines(stream):
        if not line:
            if data or name:
                yield RawEvent(name or "message", "\n".join(data), event_id, retry)
            data, name, event_id = [], "", None
            continue
        if line.startswith(":"):
            yield None
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        elif field == "id" and "\0" not in value:
            event_id = value
        elif field == "retry" and value.isdigit():
            retry = int(value)


def decode(raw: RawEvent) -> dict[str, object]:
    """An event's JSON data (the service's are objects); anything else is kept under ``"text"``."""
    try:
        parsed = json.loads(raw.data)
    except ValueError:
        return {"text": raw.data}
    return parsed if isinstance(parsed, dict) else {"value": parsed}
