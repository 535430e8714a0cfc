"""The admin session: log in with an admin key, a signed session cookie, CSRF tokens, and the signing secret.

The cookie (``gpujobs_admin``, path ``/admin``) is Flask's signed session: HttpOnly,
SameSite=Lax, Secure when the request came over https, and valid for 12 hours of
inactivity. It carries the key's id (never the key) and a per-session CSRF token. Every
request reads the key again, so a revoked key (or one no longer admin) ends its session
at its next request.

Every POST under ``/admin`` (the login form included) must carry the session's CSRF token
in the ``csrf_token`` form field (or an ``X-CSRF-Token`` header), compared in constant time;
otherwise it is refused with a 403.

The signing secret is ``GPUJOBS_SESSION_SECRET``; unset, one is generated the first time and
kept in ``<var_dir>/session-secret`` (created atomically, mode 0600), so restarts and the
several gunicorn processes of one machine agree on it. API servers on several machines
must be given the same ``GPUJOBS_SESSION_SECRET``: a session signed by one is then valid on
all (the session lives in the cookie, not in any one process).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Flask,
    Response,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.wrappers import Response as BaseResponse

from api import config
from api.admin.blueprint import bp
from api.errors import ApiError, problem
from api.throttle import Refusal, client_address, throttle
from db.keys import find_active_key
from db.models import ApiKey, Role
from db.settings import Settings

log = logging.getLogger(__name__)

COOKIE_NAME = "gpujobs_admin"
SESSION_LIFETIME = timedelta(hours=12)
CSRF_FIELD = "csrf_token"
SECRET_FILE = "session-secret"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Reachable without a session (the login form checks its own CSRF token).
PUBLIC_ENDPOINTS = frozenset({"admin.login", "admin.static"})


class AdminSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, marked Secure whenever the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        # A client that forges X-Forwarded-Proto only makes its own cookie https-only: safe to trust here.
        forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return request.is_secure or forwarded == "https" or bool(app.config["SESSION_COOKIE_SECURE"])


def configure(app: Flask, settings: Settings) -> None:
    app.secret_key = settings.session_secret or persisted_secret(settings.var_dir / SECRET_FILE)
    app.session_interface = AdminSessionInterface()
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH="/admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )


def persisted_secret(path: Path) -> str:
    """The secret in ``path``, made there first if missing; concurrent first callers all get the same one."""
    existing = _read_secret(path)
    if existing:
        return existing
    candidate = secrets.token_urlsafe(48)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(candidate)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(draft, path)  # atomic, and fails if another process published its secret first
        except FileExistsError:
            pass
        finally:
            os.unlink(draft)
    except OSError as exc:
        log.error(
            "cannot keep the admin session secret in %s (%s): using a random one for this process only, so "
            "admin sessions end at restart and are not shared between API processes; set GPUJOBS_SESSION_SECRET",
            path,
            exc,
        )
        return candidate
    return _read_secret(path) or candidate


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


# --- CSRF -------------------------------------------------------------------------------------------


def csrf_token() -> str:
    """This session's CSRF token (made on first use), for the hidden field of every form."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def check_csrf() -> None:
    expected = session.get("csrf")
    sent = request.form.get(CSRF_FIELD) or request.headers.get("X-CSRF-Token")
    if not expected or not sent:
        raise ApiError(
            403,
            "This form carries no valid CSRF token (are cookies enabled?); reload the page and try again.",
            title="CSRF token missing",
        )
    if not hmac.compare_digest(str(expected).encode(), sent.encode("utf-8", "replace")):
        raise ApiError(
            403,
            "This form's CSRF token does not match your session; reload the page and try again.",
            title="CSRF token invalid",
        )


# --- who is logged in ---------------------------------------------------------------------------------


def current_admin() -> ApiKey:
    return g.admin_key  # type: ignore[no-any-return]


def _session_key() -> ApiKey | None:
    key_id = session.get("key_id")
    if not key_id:
        return None
    key: ApiKey | None = g.db.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None or key.role != Role.ADMIN.value:
        session.clear()
        flash("Your session ended: its key was revoked (or is no longer an admin key). Log in again.", "error")
        return None
    return key


@bp.before_request
def _require_admin() -> BaseResponse | None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    key = _session_key()
    if key is None:
        target = request.full_path.rstrip("?") if request.method in SAFE_METHODS else None
        return redirect(url_for("admin.login", next=target), 303)
    g.admin_key = key
    if request.method not in SAFE_METHODS:
        check_csrf()
    return None


@bp.context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "admin_key": g.get("admin_key"), "CSRF_FIELD": CSRF_FIELD}


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; "
        f"img-src 'self' data: {_storage_origin()}; "
        "style-src 'self'; script-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "admin.static":
        response.headers["Cache-Control"] = "no-store"
    return response


def _storage_origin() -> str:
    """Where artifact thumbnails come from: the S3 endpoint that presigned URLs name."""
    settings = config.settings()
    endpoint = settings.s3_public_url or settings.s3_endpoint_url
    if not endpoint:
        return "https:"  # AWS S3: bucket hosts vary by region and style
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}"


def wants_html() -> bool:
    best = request.accept_mimetypes.best_match(["application/problem+json", "application/json", "text/html"])
    return best == "text/html"


@bp.errorhandler(ApiError)
def _error(exc: ApiError) -> Response | tuple[str, int, dict[str, str]]:
    if wants_html():
        return render_template("admin/error.html", error=exc), exc.status, exc.headers
    return problem(exc.status, exc.detail, exc.title, exc.errors, exc.headers, exc.extra)


# --- login and logout ---------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path inside the dashboard (no scheme, no host): never an open redirect."""
    default = url_for("admin.overview")
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//") or "\\" in target:
        return default
    if parts.path != "/admin" and not parts.path.startswith("/admin/"):
        return default
    return target


def _login_key(plaintext: str) -> ApiKey | Refusal | None:
    """The active key ``plaintext`` names, None for an unknown or revoked one, or a refusal past the
    failed-authentication limits (failed logins count with the API's, per address and per key prefix)."""
    guard = throttle()
    address = client_address(config.settings())
    refusal = guard.check(address, plaintext)
    if refusal is not None:
        return refusal
    identity = find_active_key(g.db, plaintext)
    key: ApiKey | None = g.db.get(ApiKey, identity.id) if identity is not None else None
    if key is not None:
        return key
    return guard.failed(address, plaintext)


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | tuple[str, int] | tuple[str, int, dict[str, str]]:
    next_target = request.values.get("next")
    if request.method == "GET":
        return render_template("admin/login.html", next=next_target, error=None), 200
    check_csrf()
    plaintext = request.form.get("key", "").strip()
    if not plaintext:
        return render_template("admin/login.html", next=next_target, error="Enter an admin API key."), 422
    found = _login_key(plaintext)
    if isinstance(found, Refusal):
        message = f"Too many failed logins: try again in {found.retry_after} s."
        page = render_template("admin/login.html", next=next_target, error=message)
        return page, 429, {"Retry-After": str(found.retry_after)}
    if found is None:
        message = "This key is unknown or has been revoked."
        return render_template("admin/login.html", next=next_target, error=message), 401
    key = found
    if key.role != Role.ADMIN.value:
        message = (
            f"“{key.name}” is a user key: it works with the API, but the dashboard needs an admin key "
            "(create one with `gpujobs keys create --role admin`)."
        )
        return render_template("admin/login.html", next=next_target, error=message), 403
    session.clear()  # a fresh session (and CSRF token) for the new identity: no fixation
    session.permanent = True
    session["key_id"] = key.id
    csrf_token()
    log.info("admin login with key %s (%s)", key.id, key.name)
    return redirect(_safe_next(next_target), 303)


@bp.post("/logout")
def logout() -> BaseResponse:
    session.clear()
    flash("You are logged out.", "info")
    return redirect(url_for("admin.login"), 303)
