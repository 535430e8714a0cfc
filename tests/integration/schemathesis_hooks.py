"""Schemathesis hooks for ``test_schemathesis.py`` (loaded by the `st` CLI through ``SCHEMATHESIS_HOOKS``).

Authentication is a throw-away admin key made for the run in the API's database
(``GPUJOBS_DATABASE_URL``). The run may revoke it (``DELETE /v1/keys/{id}`` with an id it read);
the next 401 makes schemathesis ask for a key again, and gets a new one, so a revocation cannot
end the run.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis


@schemathesis.auth(refresh_interval=None)
class ThrowAwayAdminKey:
    def __init__(self) -> None:
        self.secret: str | None = None

    def _active(self) -> bool:
        from db.keys import find_active_key
        from db.session import session_scope

        with session_scope(os.environ["GPUJOBS_DATABASE_URL"]) as session:
            return self.secret is not None and find_active_key(session, self.secret) is not None

    def get(self, case: Any, context: Any) -> str:
        if not self._active():
            from db.keys import create_key
            from db.models import Role
            from db.session import session_scope

            with session_scope(os.environ["GPUJOBS_DATABASE_URL"]) as session:
                _, self.secret = create_key(session, "schemathesis (throw-away)", Role.ADMIN)
        assert self.secret is not None
        return self.secret

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
