"""``gpujobs keys list`` and ``gpujobs keys revoke`` as an operator runs them, on a database of their own
(SQLite, migrated by ``gpujobs migrate``), with the revoked key then refused by the API."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from gpujobs.harness.processes import gpujobs_command


def _gpujobs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gpujobs_command(), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _created(env: dict[str, str], *args: str) -> dict[str, str]:
    """``gpujobs keys create ARGS``'s id, tenant, role and key."""
    done = _gpujobs(env, "keys", "create", *args)
    assert done.returncode == 0, done.stderr
    return {name: value.strip() for name, value in (line.split(":", 1) for line in done.stdout.splitlines())}


def test_keys_list_and_revoke_on_the_configured_database(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env |= {"GPUJOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'keys.db'}", "GPUJOBS_VAR_DIR": str(tmp_path / "var")}
    assert _gpujobs(env, "migrate").returncode == 0
    admin = _created(env, "--name", "ops", "--role", "admin")
    user = _created(env, "--name", "ci bot")

    listed = _gpujobs(env, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "ROLE", "TENANT", "CREATED", "REVOKED"]
    assert [row.split()[0] for row in rows] == [admin["id"], user["id"]]
    assert "ci bot" in rows[1] and user["tenant"] in rows[1] and "admin" in rows[0]
    assert admin["key"] not in listed.stdout and user["key"] not in listed.stdout  # only hashes are stored

    revoked = _gpujobs(env, "keys", "revoke", user["id"])
    assert revoked.returncode == 0 and f"revoked {user['id']}" in revoked.stdout, revoked.stderr
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d"
    assert re.search(f"{when} +{when}$", _gpujobs(env, "keys", "list").stdout.splitlines()[2])  # created, revoked
    assert "already revoked" in _gpujobs(env, "keys", "revoke", user["id"]).stdout

    # The last active admin key: refused without --force, as the API refuses it with a 409.
    refused = _gpujobs(env, "keys", "revoke", admin["id"])
    assert refused.returncode == 1 and "last active admin key" in refused.stderr and "--force" in refused.stderr
    forced = _gpujobs(env, "keys", "revoke", admin["id"], "--force")
    assert forced.returncode == 0, forced.stderr

    unknown = _gpujobs(env, "keys", "revoke", "key_doesnotexist")
    assert unknown.returncode == 1 and "no key 'key_doesnotexist'" in unknown.stderr
    assert _gpujobs(env, "keys", "revoke").returncode == 2  # a usage error: no KEY_ID

    from db.keys import find_active_key
    from db.session import session_scope

    with session_scope(env["GPUJOBS_DATABASE_URL"]) as session:
        assert find_active_key(session, user["key"]) is None and find_active_key(session, admin["key"]) is None
