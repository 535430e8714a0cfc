"""The settings of the app being served (``create_app(settings)``), for views and helpers."""

from __future__ import annotations

from flask import current_app

from db.settings import Settings
from db.storage import Storage, get_storage


def settings() -> Settings:
    return current_app.config["GPUJOBS_SETTINGS"]  # type: ignore[no-any-return]


def storage() -> Storage:
    return get_storage(settings())
