"""What the deploy tests read from a job's JSON."""

from __future__ import annotations

from typing import Any


def artifacts(value: Any) -> list[dict[str, Any]]:
    """Every artifact (an object with a presigned ``url`` and a ``sha256``) anywhere in a job's output."""
    if isinstance(value, dict):
        if "url" in value and "sha256" in value:
            return [value]
        return [found for item in value.values() for found in artifacts(item)]
    if isinstance(value, list):
        return [found for item in value for found in artifacts(item)]
    return []
