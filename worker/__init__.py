"""Runs jobs: the Celery app, the ``run_job`` task, job types, the reconciler."""
