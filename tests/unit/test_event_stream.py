"""The pure parts of job event streams (api/events.py): the SSE framing, event names and `Last-Event-ID` parsing."""

from __future__ import annotations

import json

import pytest
from flask import Flask

from api import events
from api.errors import ApiError


def test_a_frame_is_one_sse_event_with_its_id_name_and_json_on_one_line() -> None:
    text = events.frame("stored", {"message": "two\nlines", "n": 1}, 42)
    assert text.endswith("\n\n") and text.count("\n") == 4
    lines = text.splitlines()
    assert lines[:2] == ["id: 42", "event: stored"]
    assert json.loads(lines[2].removeprefix("data: ")) == {"message": "two\nlines", "n": 1}


def test_a_frame_without_an_id_keeps_the_clients_last_event_id() -> None:
    assert events.frame("progress", {"step": 1}) == 'event: progress\ndata: {"step":1}\n\n'


def test_progress_rows_are_milestones_and_other_kinds_keep_their_name() -> None:
    assert events.event_name("progress") == "milestone"
    assert events.event_name("claimed") == "claimed"


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [({}, "", None), ({"Last-Event-ID": ""}, "", None), ({"Last-Event-ID": "17"}, "", 17), ({}, "?last_event_id=5", 5)],
)
def test_last_event_id_from_the_header_or_the_query(headers: dict[str, str], query: str, expected: int | None) -> None:
    with Flask(__name__).test_request_context(f"/x{query}", headers=headers):
        assert events.last_event_id() == expected


@pytest.mark.parametrize("value", ["x", "-1", "1.0", " 1", "١", str(2**63), "9" * 25])
def test_a_bad_last_event_id_is_a_422_naming_the_header(value: str) -> None:
    with (
        Flask(__name__).test_request_context("/x", headers={"Last-Event-ID": value}),
        pytest.raises(ApiError) as raised,
    ):
        events.last_event_id()
    assert raised.value.status == 422 and "Last-Event-ID" in str(raised.value.errors)
