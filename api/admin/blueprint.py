"""The dashboard's blueprint, which the page, action and session modules attach their routes to."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint(
    "admin",
    __name__.rpartition(".")[0],  # api.admin: its templates/ and static/ folders
    url_prefix="/admin",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
