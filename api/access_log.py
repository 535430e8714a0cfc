"""gunicorn's logger for ``gpujobs api``: its error and access lines in the format of every other process.

``gpujobs api`` passes ``--logger-class api.access_log.GunicornLogger``: the root logger is set up by
``db.logs`` for the ``api`` role (so the app's own lines match), and gunicorn's two loggers get the
same formatter. An access line carries the request's ``X-Request-ID`` (read from the response, which
every app answer has: ``api.request_ids``), so it joins the lines the request logged; in JSON, the
method, path, status, bytes, duration and client address are fields of their own.
"""

from __future__ import annotations

import traceback
from typing import Any

from gunicorn.glogging import Logger

from api.request_ids import HEADER
from db import logs

_HEADER = HEADER.lower()


class GunicornLogger(Logger):  # type: ignore[misc]  # gunicorn is untyped
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        logs.configure("api", self.loglevel)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(logs.formatter())
                    handler.addFilter(logs.ContextFilter(self.loglevel))

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        try:
            message, extra = access_record(resp, environ, request_time)
            self.access_log.info("%s", message, extra=extra)
        except Exception:
            self.error(traceback.format_exc())


def access_record(resp: Any, environ: dict[str, Any], request_time: Any) -> tuple[str, dict[str, Any]]:
    """The access line's message and its ``extra`` (the request id and, for JSON, the fields)."""
    status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
    headers = resp.headers.items() if hasattr(resp.headers, "items") else resp.headers
    request_id = next((value for name, value in headers if name.lower() == _HEADER), None)
    millis = request_time.seconds * 1000 + request_time.microseconds / 1000
    fields = {
        "remote": environ.get("REMOTE_ADDR", "-"),
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("RAW_URI"),
        "status": int(status) if str(status).isdigit() else status,
        "bytes": getattr(resp, "sent", None),
        "duration_ms": round(millis, 2),
        "user_agent": environ.get("HTTP_USER_AGENT", "-"),
    }
    message = '%s "%s %s %s" %s %s %.1fms "%s"' % (  # noqa: UP031  (the classic access line, then the time)
        fields["remote"],
        fields["method"],
        fields["path"],
        environ.get("SERVER_PROTOCOL"),
        fields["status"],
        fields["bytes"] if fields["bytes"] is not None else "-",
        millis,
        fields["user_agent"],
    )
    return message, {"request_id": request_id, "fields": fields}
