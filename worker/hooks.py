"""Process-wide hooks that every gpujobs process needs, installed explicitly at start.

``install_hooks(settings)`` is called by ``api.create_app`` and by the worker and beat entry
(``worker.tasks.worker_app``): after a commit, jobs that finished are announced on Redis (for
``Prefer: wait``) and jobs that got webhook deliveries have them sent. Idempotent; the latest call's
settings win.
"""

from __future__ import annotations

import functools

from db import notify, webhooks
from db.settings import Settings
from worker import celery_app


def install_hooks(settings: Settings) -> None:
    notify.install()
    webhooks.install(functools.partial(celery_app.send_webhooks, settings=settings))
