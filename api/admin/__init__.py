"""The admin dashboard (``/admin``): server-rendered pages for operators, admin keys only.

- ``session``: login with an admin key → a signed session cookie; CSRF tokens; the secret key.
- ``pages``: overview, workers, jobs (list and one job), tenants, keys.
- ``actions``: cancel or retry a job, redeliver a webhook, create or revoke a key (POST + CSRF).
- ``charts``: the SVG charts, drawn server-side (no JavaScript library, no CDN).

Errors answer as an HTML page to a browser and as problem+json to anything else.
"""

from __future__ import annotations

from flask import Flask

from api.admin import actions, pages, session  # noqa: F401  (they attach their routes to ``bp``)
from api.admin.blueprint import bp
from db.settings import Settings


def init_app(app: Flask, settings: Settings) -> None:
    session.configure(app, settings)
    app.register_blueprint(bp)
