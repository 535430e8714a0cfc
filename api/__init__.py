"""The HTTP API: a Flask app factory, one blueprint per resource.

``import api`` never imports torch, transformers or diffusers (a test keeps it so).
"""

from __future__ import annotations

import logging

from flask import Flask, g, request
from PIL import Image

from db.session import session_factory
from db.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Flask:
    from api import admin, auth, errors, files, health, jobs, keys, limits, metrics, models, openapi, webhooks
    from api.errors import ApiError
    from api.presenters import ID
    from worker.hooks import install_hooks

    settings = settings or get_settings()
    install_hooks(settings)  # finish notifications and webhook sends after commits, in this process
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, GPUJOBS_SETTINGS=settings)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Pillow raises DecompressionBombError past twice this; our upload check refuses anything past it.
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    sessions = session_factory(settings.database_url, settings)

    @app.before_request
    def _open_session() -> None:
        if request.endpoint in health.NO_DEPENDENCIES:
            return  # liveness and readiness touch no dependency here (readiness checks its own, bounded)
        g.db = sessions()
        if request.path.startswith("/v1/"):
            auth.authenticate()
            # Ids are a prefix and url-safe base64: anything else (NUL, spaces…) names nothing.
            if request.view_args and not all(ID.fullmatch(str(v)) for v in request.view_args.values()):
                raise ApiError(404, "No such resource.")

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            errors.close_quietly(session)

    errors.register(app)
    limits.register(app)  # 414 / 431 first, before authentication
    for blueprint in (health.bp, metrics.bp, files.bp, jobs.bp, models.bp, keys.bp, webhooks.bp, openapi.bp):
        app.register_blueprint(blueprint)
    admin.init_app(app, settings)
    logging.getLogger(__name__).debug("gpujobs API ready")
    return app
