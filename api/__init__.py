"""The HTTP API: a Flask app factory, one blueprint per resource.

``import api`` never imports torch, transformers or diffusers (a test keeps it so), nor the database
driver: gunicorn's master imports ``api.access_log`` and ``api.gunicorn_conf`` (so this package) before
its gevent workers patch the standard library, and psycopg picks its blocking C wait when it is imported
unpatched; every database round trip of that worker would then stall all its requests while PostgreSQL
hangs (the fault matrix's SIGSTOP case). The app's modules are imported by ``create_app``, in the worker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from db.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    from flask import Flask, g, request
    from PIL import Image

    from api import (
        admin,
        auth,
        errors,
        events,
        files,
        health,
        instruments,
        job_actions,
        jobs,
        keys,
        limits,
        metrics,
        models,
        openapi,
        replicate,
        request_ids,
        tenants,
        webhooks,
    )
    from api.errors import ApiError
    from api.presenters import ID
    from db import tracing
    from db.session import session_factory
    from db.settings import get_settings
    from worker.hooks import install_hooks

    settings = settings or get_settings()
    tracing.configure("api", settings.trace_file)  # off unless OTEL_EXPORTER_OTLP_ENDPOINT or GPUJOBS_TRACE_FILE
    install_hooks(settings)  # finish notifications and webhook sends after commits, in this process
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, GPUJOBS_SETTINGS=settings)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Pillow raises DecompressionBombError past twice this; our upload check refuses anything past it.
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    sessions = session_factory(settings.database_url, settings)

    instruments.register(app)  # first: its clock starts before authentication

    @app.before_request
    def _open_session() -> None:
        if request.endpoint in health.NO_DEPENDENCIES:
            return  # liveness and readiness touch no dependency here (readiness checks its own, bounded)
        g.db = sessions()
        if request.path.startswith(("/v1/", "/replicate/v1/")):
            # The Replicate-compatible surface also takes Replicate's own `Authorization: Token <key>`.
            auth.authenticate(token_scheme=request.path.startswith("/replicate/"))
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
    request_ids.register(app)  # before even that: every answer, an error too, carries X-Request-ID
    blueprints = (
        health.bp,
        metrics.bp,
        files.bp,
        jobs.bp,
        events.bp,
        job_actions.bp,
        models.bp,
        keys.bp,
        tenants.bp,
        webhooks.bp,
        openapi.bp,
        replicate.bp,
    )
    app.url_map.converters["job"] = jobs.JobIdConverter
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    admin.init_app(app, settings)
    tracing.instrument_flask(app)
    logging.getLogger(__name__).debug("gpujobs API ready")
    return app


def build_storage_clients(app: Flask) -> None:
    """Build, before the first request, the S3 clients the app's routes use (no request is sent).

    The first boto3 client parses botocore's S3 model, about 0.1 s of CPU. Under gevent nothing
    else of the process runs meanwhile: built on a first upload or ``/readyz`` during an S3 outage,
    it held ``/healthz`` past its 100 ms bound in the fault matrix. ``api/wsgi.py`` calls this."""
    from api import config, files

    with app.app_context():
        storage = config.storage()
        storage.client_for()  # every other call
        storage.client_for(files.UPLOAD_ATTEMPTS)
        storage.client_for(1, config.settings().readiness_timeout_seconds)  # /readyz's ping
        storage.presign_client  # noqa: B018  (the default client, or one for s3_public_url)
