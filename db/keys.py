"""API keys: created with a tenant, stored hashed, shown in plain text exactly once."""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from db.models import ApiKey, Role, Tenant, utcnow

KEY_PREFIX = "gpj_"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(
    session: Session, name: str, role: Role, tenant_id: str | None = None, plaintext: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key (in a new tenant of its own unless ``tenant_id`` is given); returns the row and the key."""
    if tenant_id is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
        tenant_id = tenant.id
    plaintext = plaintext or generate_key()
    key = ApiKey(tenant_id=tenant_id, name=name, role=role.value, key_hash=hash_key(plaintext))
    session.add(key)
    session.flush()
    return key, plaintext


@dataclass(frozen=True)
class Identity:
    """Who a request acts as: what authentication needs, read with one small query."""

    id: str
    tenant_id: str
    role: str


@functools.cache
def _active_key() -> Any:
    """Every request's first statement, built once (building it cost more CPU than running it)."""
    return select(ApiKey.id, ApiKey.tenant_id, ApiKey.role).where(
        ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
    )


def find_active_key(session: Session, plaintext: str) -> Identity | None:
    row = session.execute(_active_key(), {"key_hash": hash_key(plaintext)}).first()
    return Identity(*row) if row is not None else None


def ensure_admin_key(session: Session, plaintext: str, name: str = "bootstrap admin") -> ApiKey:
    """Create ``plaintext`` as an admin key if it does not exist (``GPUJOBS_ADMIN_KEY``); idempotent.

    A key that exists is left as it is: an operator's revocation or role change stands.
    """
    existing = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext))).one_or_none()
    if existing is not None:
        return existing
    key, _ = create_key(session, name, Role.ADMIN, plaintext=plaintext)
    return key


def revocation_refusal(session: Session, key: ApiKey, acting_key_id: str | None) -> str | None:
    """Why revoking ``key`` needs forcing, or None: it is the key making the request, or the last active
    admin key (nobody could manage keys or log in to the dashboard after it).

    On PostgreSQL the active admin keys are locked (``FOR UPDATE``) until the transaction ends, so two
    admins revoking each other at once cannot both pass; call :func:`revoke` in the same transaction.
    """
    if key.revoked_at is not None:
        return None  # revoking again changes nothing
    reasons = []
    if key.id == acting_key_id:
        reasons.append("it is the key making the request (you would lose your access)")
    if key.role == Role.ADMIN.value:
        admins = session.scalars(
            select(ApiKey.id).where(ApiKey.role == Role.ADMIN.value, ApiKey.revoked_at.is_(None)).with_for_update()
        ).all()
        if set(admins) <= {key.id}:
            reasons.append("it is the last active admin key (nobody could manage keys or use the dashboard)")
    if not reasons:
        return None
    return f"Revoking {key.id} needs force: {' and '.join(reasons)}."


def revoke(session: Session, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
