"""/v1/models: the catalog's base models and the tenant's fine-tuned (LoRA) models.

Base models come from the model catalog (``GPUJOBS_MODEL_CATALOG``): their id is their catalog
name, and they cannot be deleted here. Fine-tuned models are rows made by ``finetune`` jobs; a
key sees its own tenant's (an admin key sees every tenant's), and another tenant's id is a 404.
Lists put the base models first, on the first page only; pages go through the LoRAs, newest
first. Deleting a LoRA deletes its weights from storage too (the job's ``weights`` link with it);
a queued job that still names it fails with ``lora_missing`` when it runs.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from sqlalchemy import select

from api import config
from api.auth import current_key, is_admin
from api.errors import ApiError, validation_error
from api.openapi import document
from api.presenters import page_params, paginate
from db.models import Model, ModelOrigin
from db.storage import StorageError
from db.wire import model_json
from worker.jobs import model_kinds
from worker.models.catalog import Catalog, CatalogError, ModelEntry, load_catalog

log = logging.getLogger(__name__)

bp = Blueprint("models", __name__, url_prefix="/v1/models")


def readable_catalog() -> Catalog | None:
    """The service's model catalog, or None if it cannot be read (the error is logged)."""
    try:
        return load_catalog(config.settings())
    except CatalogError as exc:
        log.error("the model catalog cannot be read: %s", exc)
        return None


def base_models() -> dict[str, ModelEntry]:
    """The catalog's base models by name (none if the catalog cannot be read)."""
    catalog = readable_catalog()
    if catalog is None:
        return {}
    listed = {name for name, kind in model_kinds(config.settings()).items() if kind.listed}  # not mere parts
    return {name: entry for name, entry in catalog.entries.items() if entry.kind in listed}


def base_json(entry: ModelEntry) -> dict[str, Any]:
    return {
        "id": entry.name,
        "name": entry.name,
        "kind": ModelOrigin.BASE.value,
        "base_model": None,
        "task": entry.kind,
        "default": entry.default,
        "created_at": None,
        "urls": {"self": f"/v1/models/{entry.name}"},
    }


def _visible(query: Any) -> Any:
    return query if is_admin() else query.where(Model.tenant_id == current_key().tenant_id)


def _load(model_id: str) -> Model:
    model: Model | None = g.db.scalars(_visible(select(Model).where(Model.id == model_id))).one_or_none()
    if model is None:
        raise ApiError(404, f"No model {model_id!r}.")
    return model


@bp.get("")
@document(
    "List models: the catalog's base models, then this tenant's fine-tuned ones",
    query=["kind", "limit", "cursor"],
    responses={200: "ModelList"},
)
def list_models() -> Response:
    limit, cursor = page_params()
    kind = request.args.get("kind")
    if kind is not None and kind not in {k.value for k in ModelOrigin}:
        raise validation_error(["query", "kind"], "must be `base` or `lora`")
    items: list[dict[str, Any]] = []
    if cursor is None and kind != ModelOrigin.LORA.value:
        items += [base_json(entry) for _, entry in sorted(base_models().items())]
    next_cursor = None
    if kind != ModelOrigin.BASE.value:
        rows, next_cursor = paginate(_visible(select(Model)), Model, limit, cursor)
        storage = config.storage()
        items += [model_json(row, storage=storage) for row in rows]
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.get("/<model_id>")
@document("Get a model", responses={200: "Model"})
def get_model(model_id: str) -> Response:
    if not model_id.startswith("mdl_"):
        entry = base_models().get(model_id)
        if entry is None:
            raise ApiError(404, f"No model {model_id!r}.")
        return jsonify(base_json(entry))
    return jsonify(model_json(_load(model_id), storage=config.storage()))


@bp.delete("/<model_id>")
@document("Delete a fine-tuned model and its weights", responses={204: "object", 409: "Problem"})
def delete_model(model_id: str) -> tuple[str, int]:
    if not model_id.startswith("mdl_"):
        if model_id in base_models():
            raise ApiError(
                409, f"{model_id!r} is a base model of the catalog; remove it from the catalog file instead."
            )
        raise ApiError(404, f"No model {model_id!r}.")
    model = _load(model_id)
    try:
        config.storage().delete(model.storage_key)
    except StorageError as exc:
        log.error("could not delete the weights of %s: %s", model_id, exc)
        raise ApiError(503, "Storage is unavailable; the model was not deleted. Try again.") from None
    g.db.delete(model)
    g.db.commit()
    return "", 204
