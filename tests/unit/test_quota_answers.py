"""The 429 of a limit (api/quotas.py) and the quota overrides' validation (api/tenants.py), without services."""

from __future__ import annotations

import pytest

from api.errors import ApiError
from api.quotas import too_many, window_left
from api.tenants import parse_update


def test_a_refusal_names_its_quota_and_carries_the_draft_headers() -> None:
    windowed = too_many("over", quota="submits_per_minute", limit=30, used=31, retry_after=12, window=60)
    assert windowed.status == 429 and windowed.title == "Quota exceeded"
    assert windowed.extra == {"quota": "submits_per_minute", "limit": 30, "used": 31}
    assert windowed.headers == {
        "Retry-After": "12",
        "RateLimit-Limit": "30",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "12",
        "RateLimit-Policy": '30;w=60;comment="submits_per_minute"',
    }
    counted = too_many("over", quota="max_queued_jobs", limit=100, used=100, retry_after=5)
    assert counted.headers["RateLimit-Policy"] == '100;comment="max_queued_jobs"'  # no window: a count


def test_window_left_is_whole_seconds_to_the_minutes_end_and_never_zero() -> None:
    assert window_left(6000.0) == 60
    assert window_left(6000.5) == 59
    assert window_left(6059.9) == 1


def test_overrides_keep_only_the_fields_sent_and_null_clears() -> None:
    assert parse_update({}) == {}
    assert parse_update({"weight": 2, "max_queued_jobs": None}) == {"weight": 2.0, "max_queued_jobs": None}


@pytest.mark.parametrize(
    "body",
    [
        {"max_queued_jobs": -1},
        {"max_queued_jobs": 1.0},
        {"max_queued_jobs": "1"},
        {"max_queued_jobs": True},
        {"max_queued_jobs": 10**30},
        {"weight": 0},
        {"weight": float("inf")},
        {"artifact_ttl_seconds": 10**12},
        {"other": 1},
    ],
)
def test_bad_overrides_are_a_422_at_their_field(body: dict) -> None:
    with pytest.raises(ApiError) as caught:
        parse_update(body)
    assert caught.value.status == 422
    assert caught.value.errors and caught.value.errors[0]["loc"] == ["body", next(iter(body))]
