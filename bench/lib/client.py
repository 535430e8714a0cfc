"""The benchmarks' HTTP clients of gpujobs and of the hand-written baseline, over ``requests`` or a leaner
``http.client`` session."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import requests

REQUEST_TIMEOUT = 60.0
UNFINISHED = ("queued", "running")


class LeanResponse:
    def __init__(self, status: int, data: bytes) -> None:
        self.status_code, self.content = status, data

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.text[:300]}")


class LeanSession:
    """One keep-alive ``http.client`` connection, a few times cheaper than requests, so that client threads
    steal less CPU from the servers they measure.

    Only what the benchmarks use of ``requests.Session``: ``headers``, ``get`` and ``post`` with JSON.
    """

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, url: str, body: Any, headers: dict[str, str] | None, params: Any) -> LeanResponse:
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        all_headers = {**self.headers, **(headers or {})}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        for attempt in (1, 2):  # a keep-alive connection the server closed is opened again once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT)
            try:
                self._conn.request(method, path, body=data, headers=all_headers)
                response = self._conn.getresponse()
                return LeanResponse(response.status, response.read())
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def post(
        self,
        url: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
        timeout: Any = None,
    ) -> LeanResponse:
        return self._request("POST", url, json, headers, params)

    def get(self, url: str, headers: dict[str, str] | None = None, timeout: Any = None) -> LeanResponse:
        return self._request("GET", url, None, headers, None)


# The sessions a benchmark can run its clients on (``--http``).
SESSIONS: dict[str, Callable[[], Any]] = {"requests": requests.Session, "http.client": LeanSession}


class JobsClient:
    """The gpujobs API as a user calls it, with an API key over one keep-alive session."""

    def __init__(self, base: str, key: str, session: Any = None) -> None:
        self.base = base
        self.session = session if session is not None else requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def submit(self, job: dict[str, Any], wait: int = 0) -> dict[str, Any]:
        """``POST /v1/jobs``, held up to ``wait`` s until the job ends (``Prefer: wait``); the job as answered."""
        headers = {"Prefer": f"wait={wait}"} if wait else None
        r = self.session.post(f"{self.base}/v1/jobs", json=job, headers=headers, timeout=REQUEST_TIMEOUT + wait)
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
        return r.json()  # type: ignore[no-any-return]

    def get(self, job_id: str, wait: int = 0) -> dict[str, Any]:
        headers = {"Prefer": f"wait={wait}"} if wait else None
        r = self.session.get(f"{self.base}/v1/jobs/{job_id}", headers=headers, timeout=REQUEST_TIMEOUT + wait)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def finish(self, job: dict[str, Any], timeout: float, wait: int = 60) -> dict[str, Any]:
        """The job once it no longer is queued or running (each GET held up to ``wait`` s), or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while job["status"] in UNFINISHED and time.monotonic() < deadline:
            job = self.get(job["id"], wait)
        return job

    def cancel(self, job_id: str) -> None:
        self.session.post(f"{self.base}/v1/jobs/{job_id}/cancel", timeout=REQUEST_TIMEOUT)

    def upload(self, data: bytes, name: str) -> str:
        """``POST /v1/files`` (requests sessions only); the file's id."""
        r = self.session.post(f"{self.base}/v1/files", files={"file": (name, data)}, timeout=REQUEST_TIMEOUT)
        r.raise_for_status()
        return r.json()["id"]  # type: ignore[no-any-return]


class HandClient:
    """The hand-written baseline service (``bench/baseline_app.py``), called as :class:`JobsClient` calls gpujobs."""

    def __init__(self, base: str, session: Any) -> None:
        self.base, self.session = base, session

    def submit(self, job: dict[str, Any], wait: int = 0) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        r = self.session.post(f"{self.base}/jobs", params=params, json=job, timeout=REQUEST_TIMEOUT + wait)
        if r.status_code != 202:
            raise RuntimeError(f"POST /jobs answered {r.status_code}: {r.text[:300]}")
        return r.json()  # type: ignore[no-any-return]

    def get(self, job_id: str) -> dict[str, Any]:
        r = self.session.get(f"{self.base}/jobs/{job_id}", timeout=REQUEST_TIMEOUT)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]
