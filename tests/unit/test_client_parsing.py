"""Pure parsing in the client: the CLI's key=value inputs, the SSE reader, problem+json → exceptions, artifacts."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gpujobs.client import errors
from gpujobs.client.models import Job, find_artifacts
from gpujobs.client.sse import events, lines
from gpujobs.client_cli import parse_inputs, parse_value


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("0.5", 0.5),
        ("7", 7),
        ("-3", -3),
        ("1e3", 1000.0),
        ("true", True),
        ("null", None),
        ('["person", "car"]', ["person", "car"]),
        ('{"model": "mdl_x", "scale": 0.8}', {"model": "mdl_x", "scale": 0.8}),
        ('"007"', "007"),  # quoted: a string, not a number
        ("a lighthouse at dusk", "a lighthouse at dusk"),
        ("file_abc", "file_abc"),
        ("https://example.com/x.png?a=b=c", "https://example.com/x.png?a=b=c"),
        ("data:image/png;base64,iVBO=", "data:image/png;base64,iVBO="),
        ("@@handle", "@handle"),
        ("", ""),
        ("True", "True"),  # JSON's spelling only
        ("1.2.3", "1.2.3"),
    ],
)
def test_values_are_json_when_they_look_like_it_else_strings(raw, value):
    assert parse_value(raw) == value


def test_at_path_is_a_file_to_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "x.png").write_bytes(b"png")
    monkeypatch.chdir(tmp_path)
    assert parse_inputs(["image=@x.png", "threshold=0.6", "prompt=a=b"]) == {
        "image": Path("x.png"),
        "threshold": 0.6,
        "prompt": "a=b",  # only the first = splits
    }


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["steps"], "give each input as key=value"),
        (["=1"], "is not an input name"),
        (["a-b=1"], "is not an input name"),
        (["a=1", "a=2"], "'a' is given twice"),
        (["image=@"], "image: @ must be followed by a file path"),
        (["image=@/no/such/file.png"], "image: /no/such/file.png: no such file"),
        (["x={not json"], "x: '{not json' looks like JSON but does not parse"),
        (["x=[1,"], "looks like JSON"),
    ],
)
def test_bad_pairs_name_what_is_wrong(pairs, message):
    with pytest.raises(ValueError) as raised:
        parse_inputs(pairs)
    assert message in str(raised.value)


class Chunks(io.RawIOBase):
    """A stream that hands over its data in the given pieces (as a network would)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def read1(self, amt: int = -1, /) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_sse_events_across_chunk_boundaries_and_line_endings():
    stream = Chunks(
        b"retry: 2000\r\n\r\nid: 4",
        b'1\nevent: queued\ndata: {"a":',
        b" 1}\r",
        b'\n\r\n: keep-alive\n\nevent: progress\ndata: {"p": 2}\n\n',
        b"data: line one\ndata: line two\n\nid: 42\nevent: job\ndata: {}",  # the last event has no blank line
    )
    got = list(events(stream))
    assert [(e.event, e.id, e.data) if e else None for e in got] == [
        ("queued", "41", '{"a": 1}'),
        None,  # the keep-alive comment
        ("progress", None, '{"p": 2}'),  # no id: line, so no id (the last one stays with the reader)
        ("message", None, "line one\nline two"),
    ]
    assert got[0] is not None and got[0].retry_ms == 2000


def test_lines_keep_a_trailing_cr_until_its_lf_comes():
    assert list(lines(Chunks(b"a\r", b"\nb\rc"))) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, errors.BadRequest),
        (401, errors.AuthenticationError),
        (403, errors.PermissionDenied),
        (404, errors.NotFound),
        (409, errors.Conflict),
        (413, errors.BadRequest),
        (422, errors.ValidationError),
        (429, errors.RateLimited),
        (500, errors.ServerError),
        (503, errors.ServiceUnavailable),
    ],
)
def test_problems_map_to_their_exception(status, kind):
    body = b'{"type": "urn:x", "title": "T", "status": %d, "detail": "D", "errors": [{"loc": ["body"], "msg": "m"}]}'
    error = errors.from_response(status, body % status, "7")
    assert type(error) is kind and isinstance(error, errors.GpujobsError)
    assert (error.status, error.type, error.title, error.detail, error.retry_after) == (status, "urn:x", "T", "D", 7.0)


def test_a_non_json_error_keeps_its_text():
    error = errors.from_response(502, b"<html>bad gateway</html>", "soon")
    assert isinstance(error, errors.ServerError) and "bad gateway" in error.detail and error.retry_after is None
    assert errors.from_response(422, b"{}").errors == []  # type: ignore[attr-defined]


def test_artifacts_are_found_wherever_the_output_holds_them():
    artifact = {"name": "a.png", "content_type": "image/png", "size": 3, "sha256": "00", "url": "http://s3/a"}
    output = {"images": [artifact, {**artifact, "name": "b.png"}], "model": {"weights": {**artifact, "url": None}}}
    found = list(find_artifacts(output))
    assert [(a.where, a.name, a.url) for a in found] == [
        ("images[0]", "a.png", "http://s3/a"),
        ("images[1]", "b.png", "http://s3/a"),
        ("model.weights", "a.png", None),
    ]
    job = Job.from_json({"id": "job_x", "type": "t", "status": "failed", "error": {"code": "c", "message": "m"}})
    with pytest.raises(errors.JobFailed) as failed:
        job.raise_for_status()
    assert (failed.value.code, failed.value.message) == ("c", "m")
