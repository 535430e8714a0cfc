"""What ``gpujobs keys list|revoke`` and ``gpujobs info`` do (the commands themselves are in ``gpujobs.cli``).

The key commands act on the configured database directly, like ``gpujobs keys create``: they work with
no API running, from the machine that holds the database settings. Revoking follows the API's rule
(``db.keys.revocation_refusal``): the last active admin key only with ``--force``.

``gpujobs info`` reads ``<var_dir>/up.json``, which a running ``gpujobs up`` writes once it is ready and
removes when it stops: where its broker, S3 server and database are, so that Flower or a second worker
(``eval "$(gpujobs info --env)"; gpujobs worker``) can join it. ``--env`` also exports the model catalog
(a second worker without ``--demo``'s catalog would fetch the built-in checkpoints instead of the demo
ones) and, as ``GPUJOBS_URL`` and ``GPUJOBS_KEY``, the API and its admin key, which the README's
walkthrough and the command-line client read.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import click

SETUP_FILE = "up.json"


def key_rows() -> list[dict[str, Any]]:
    """Every API key, oldest first: id, name, role, tenant, created, revoked (never the key itself)."""
    from sqlalchemy import select

    from db.models import ApiKey
    from db.session import session_scope

    with session_scope() as session:
        keys = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)).all()
        return [
            {
                "id": key.id,
                "name": key.name,
                "role": key.role,
                "tenant": key.tenant_id,
                "created": key.created_at.strftime("%Y-%m-%d %H:%M"),
                "revoked": key.revoked_at.strftime("%Y-%m-%d %H:%M") if key.revoked_at else "",
            }
            for key in keys
        ]


def key_table(rows: list[dict[str, Any]]) -> str:
    columns = ["id", "name", "role", "tenant", "created", "revoked"]
    widths = {c: max([len(c), *(len(str(row[c])) for row in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip() for row in rows]
    return "\n".join(lines)


def revoke_key(key_id: str, force: bool) -> str:
    """Revoke ``key_id``; what was done (a ``ClickException`` for an unknown key or a refusal)."""
    from db import keys
    from db.models import ApiKey
    from db.session import session_scope

    with session_scope() as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            raise click.ClickException(f"there is no key {key_id!r} (gpujobs keys list shows them)")
        if key.revoked_at is not None:
            return f"{key_id} was already revoked"
        refusal = None if force else keys.revocation_refusal(session, key, None)
        if refusal is not None:
            raise click.ClickException(f"{refusal} Add --force to revoke it anyway.")
        keys.revoke(session, key)
    return f"revoked {key_id}: it is refused from now on"


def read_setup(var_dir: Path) -> dict[str, Any]:
    """The running ``gpujobs up``'s record in ``var_dir`` (a ``ClickException`` if none runs)."""
    path = var_dir / SETUP_FILE
    try:
        setup: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise click.ClickException(
            f"no gpujobs up is running with var dir {var_dir} (no {path}); start one, or set GPUJOBS_VAR_DIR"
        ) from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    if not _alive(int(setup.get("pid", 0))):
        raise click.ClickException(f"the gpujobs up that wrote {path} (pid {setup.get('pid')}) is not running")
    return setup


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def info_lines(setup: dict[str, Any]) -> list[str]:
    rows = [
        ("api", setup["api_url"]),
        ("database", setup["database_url"]),
        ("broker", setup["broker_url"]),
        ("s3 endpoint", setup["s3_endpoint_url"]),
        ("s3 bucket", setup["s3_bucket"]),
        ("s3 keys file", setup.get("s3_credentials_file") or "(configured: GPUJOBS_S3_ACCESS_KEY/SECRET_KEY)"),
        ("admin key file", setup.get("admin_key_file") or "(configured: GPUJOBS_ADMIN_KEY)"),
        ("model catalog", setup.get("model_catalog") or "(the built-in one)"),
        ("var dir", setup["var_dir"]),
        ("pid", str(setup["pid"])),
    ]
    return [f"{name + ':':<16}{value}" for name, value in rows]


def env_lines(setup: dict[str, Any]) -> list[str]:
    """``export`` lines with which another process (a worker, Flower, a client) joins the set-up."""
    env = {
        "GPUJOBS_VAR_DIR": setup["var_dir"],
        "GPUJOBS_DATABASE_URL": setup["database_url"],
        "GPUJOBS_BROKER_URL": setup["broker_url"],
        "GPUJOBS_S3_ENDPOINT_URL": setup["s3_endpoint_url"],
        "GPUJOBS_S3_BUCKET": setup["s3_bucket"],
        "GPUJOBS_URL": setup["api_url"],
    }
    if setup.get("model_catalog"):
        env["GPUJOBS_MODEL_CATALOG"] = setup["model_catalog"]
    admin_key_file = setup.get("admin_key_file")  # None when the key came from GPUJOBS_ADMIN_KEY: the user has it
    if admin_key_file and Path(admin_key_file).is_file():
        env["GPUJOBS_KEY"] = Path(admin_key_file).read_text().strip()
    if setup.get("s3_credentials_file"):
        credentials = json.loads(Path(setup["s3_credentials_file"]).read_text())
        env["GPUJOBS_S3_ACCESS_KEY"] = credentials["access_key"]
        env["GPUJOBS_S3_SECRET_KEY"] = credentials["secret_key"]
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
