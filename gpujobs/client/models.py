"""What the SDK returns: ``Job``, ``Artifact``, ``Event`` and ``Page``, typed views of the API's JSON.

Each keeps the JSON it was made from (``raw``), so a field the API adds later is readable before the SDK names it.
A job's artifacts are found wherever its ``output`` holds one (``instance_map``, ``images[0]``, ``weights``…):
the job types nest them differently, and the SDK should not need a release for each new type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpujobs.client.errors import JobCanceled, JobFailed

if TYPE_CHECKING:
    from gpujobs.client.api import Client

FINISHED = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class Artifact:
    """A stored output file; ``where`` is its place in the output (``"instance_map"``, ``"images[0]"``)."""

    name: str
    content_type: str
    size: int
    sha256: str
    url: str | None
    where: str
    expired: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Artifact:
        return cls(
            name=str(data["name"]),
            content_type=str(data.get("content_type") or "application/octet-stream"),
            size=int(data.get("size") or 0),
            sha256=str(data["sha256"]),
            url=data.get("url"),
            where=where,
            expired=bool(data.get("expired", False)),
        )


def _is_artifact(value: Any) -> bool:
    return isinstance(value, dict) and {"name", "sha256", "size"} <= value.keys() and "url" in value


def find_artifacts(value: Any, where: str = "") -> Iterator[Artifact]:
    """Every artifact in an output, depth first, in the output's own order."""
    if _is_artifact(value):
        yield Artifact.from_json(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from find_artifacts(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from find_artifacts(item, f"{where}[{index}]")


@dataclass
class Job:
    """A job as ``GET /v1/jobs/{id}`` returns it (docs/api.md, "The Job")."""

    id: str
    type: str
    status: str
    input: dict[str, Any]
    output: Any
    error: dict[str, Any] | None
    progress: dict[str, Any]
    attempts: int
    metadata: dict[str, Any] | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    raw: dict[str, Any] = field(repr=False)
    client: Client | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], client: Client | None = None) -> Job:
        return cls(
            id=str(data["id"]),
            type=str(data["type"]),
            status=str(data["status"]),
            input=data.get("input") or {},
            output=data.get("output"),
            error=data.get("error"),
            progress=data.get("progress") or {},
            attempts=int(data.get("attempts") or 0),
            metadata=data.get("metadata"),
            created_at=data.get("created_at"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            raw=data,
            client=client,
        )

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def artifacts(self) -> list[Artifact]:
        return list(find_artifacts(self.output))

    def raise_for_status(self) -> Job:
        """The job itself when it did not fail; ``JobFailed`` (``JobCanceled``) when it failed (was canceled)."""
        if self.status == "failed":
            raise JobFailed(self)
        if self.status == "canceled":
            raise JobCanceled(self)
        return self

    def download(self, directory: str | Path = ".") -> list[Path]:
        """Fetch every artifact into ``directory`` (made if missing), each checked against its sha256 and size."""
        if self.client is None:
            raise RuntimeError("this Job was not read through a Client: use client.download(job, directory)")
        return self.client.download(self, directory)


@dataclass(frozen=True)
class Event:
    """One server-sent event of a job's stream: ``event`` is its name (``queued``, ``progress``, ``job``…),
    ``id`` the timeline row's id (None for ``progress`` and ``job``), ``data`` its JSON."""

    event: str
    data: dict[str, Any]
    id: int | None = None

    @property
    def progress(self) -> dict[str, Any] | None:
        """The job's progress (``step``, ``total``, ``fraction``, ``message``…) on a ``progress`` event."""
        found = self.data.get("progress") if self.event == "progress" else None
        return found if isinstance(found, dict) else None


@dataclass
class Page:
    """One page of a list: ``items`` newest first, ``next_cursor`` for the next page (None on the last)."""

    items: list[Job]
    next_cursor: str | None
