"""/v1/keys (admin): create, list, revoke API keys."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from api.auth import current_key, require_admin
from api.body import json_object
from api.errors import ApiError, from_pydantic, validation_error
from api.openapi import document
from api.presenters import key_json, page_params, paginate
from db import keys
from db.models import ApiKey, Role, Tenant


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$", description="Who or what uses the key."
    )
    role: Role = Field(Role.USER, description="`user` or `admin`.")
    tenant: str | None = Field(
        None,
        max_length=40,
        pattern=r"^ten_[A-Za-z0-9_-]+$",
        description="An existing tenant id to share; without it the key gets a new tenant.",
    )


bp = Blueprint("keys", __name__, url_prefix="/v1/keys")


def force_param() -> bool:
    """``?force=true`` (or 1, yes; false, 0, no or absent: not forced); anything else, an empty value
    included (``?force=``: the OpenAPI document says boolean), is a 422."""
    raw = request.args.get("force", "false").strip().lower()
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise validation_error(["query", "force"], "must be true or false")


@bp.post("")
@require_admin
@document("Create an API key (admin); the key is shown this once", body=KeyCreate, responses={201: "CreatedKey"})
def create_key() -> tuple[Response, int]:
    body = json_object()
    try:
        spec = KeyCreate.model_validate(body)
    except ValidationError as exc:
        raise from_pydantic(exc, ["body"]) from None
    if spec.tenant is not None and g.db.get(Tenant, spec.tenant) is None:
        raise validation_error(["body", "tenant"], f"no tenant {spec.tenant!r}")
    key, plaintext = keys.create_key(g.db, spec.name, spec.role, spec.tenant)
    g.db.commit()
    return jsonify(key_json(key, plaintext)), 201


@bp.get("")
@require_admin
@document("List API keys (admin)", query=["limit", "cursor"], responses={200: "KeyList"})
def list_keys() -> Response:
    limit, cursor = page_params()
    rows, next_cursor = paginate(select(ApiKey), ApiKey, limit, cursor)
    return jsonify({"items": [key_json(k) for k in rows], "next_cursor": next_cursor})


@bp.delete("/<key_id>")
@require_admin
@document(
    "Revoke an API key (admin); it is refused at once. The key making the request, or the last active "
    "admin key, only with `force=true` (else 409)",
    query=["force"],
    responses={200: "Key", 409: "Problem"},
)
def revoke_key(key_id: str) -> Response:
    key = g.db.get(ApiKey, key_id)
    if key is None:
        raise ApiError(404, f"No key {key_id!r}.")
    force = force_param()
    refusal = None if force else keys.revocation_refusal(g.db, key, current_key().id)
    if refusal is not None:
        g.db.rollback()
        raise ApiError(409, f"{refusal} Add `?force=true` to revoke it anyway.", title="Revocation needs force")
    keys.revoke(g.db, key)
    g.db.commit()
    return jsonify(key_json(key))
