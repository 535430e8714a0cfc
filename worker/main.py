"""The target of Celery's own command line: ``celery -A worker.main inspect ping``, ``… flower``.

``-A`` wants a module that holds an app, so this entry module (like ``api/wsgi.py`` for gunicorn)
builds the worker app from the ``GPUJOBS_*`` settings when imported; nothing else imports it.
``gpujobs worker`` and ``gpujobs beat`` build theirs with ``worker.tasks.worker_app`` instead.
"""

from worker.tasks import worker_app

app = worker_app()
