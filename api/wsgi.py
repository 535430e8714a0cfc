"""WSGI entry point for gunicorn: ``gunicorn api.wsgi:app``."""

from api import build_storage_clients, create_app

app = create_app()
build_storage_clients(app)  # their one-time CPU is spent here, not in a request
