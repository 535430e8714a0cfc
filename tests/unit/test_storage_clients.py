"""The S3 clients of ``db.storage``: built once per process, from one boto3 session, before the API serves.

Building the first boto3 client parses botocore's S3 model (about 0.1 s of CPU); under gevent that
holds every request of the process, ``/healthz`` included. Building a client sends no request, so
these tests need no S3 server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from db.settings import Settings
from db.storage import Storage, reset_storages

S3 = {"s3_endpoint_url": "http://127.0.0.1:9", "s3_access_key": "key", "s3_secret_key": "secret"}


@pytest.fixture(autouse=True)
def no_cached_storage() -> Iterator[None]:
    reset_storages()  # get_storage keeps one Storage per endpoint for the process
    yield
    reset_storages()


def test_the_clients_of_a_storage_share_one_session_and_its_parsed_model():
    storage = Storage(Settings(**S3))
    default, upload, probe = storage.client_for(), storage.client_for(2), storage.client_for(1, 0.5)
    assert len({id(default), id(upload), id(probe)}) == 3
    assert default._loader is upload._loader is probe._loader  # the model is read and parsed once
    assert storage.client_for(2) is upload


def test_the_api_builds_its_storage_clients_before_serving(monkeypatch: pytest.MonkeyPatch):
    import api
    from api import config, files

    settings = Settings(**S3, database_url="sqlite://", broker_url="memory://", readiness_timeout_seconds=0.7)
    app = api.create_app(settings)
    api.build_storage_clients(app)

    def built_in_a_request(*_: object) -> None:
        raise AssertionError("a client was built after the app was prepared")

    monkeypatch.setattr(Storage, "_client", built_in_a_request)
    with app.app_context():
        storage = config.storage()
        storage.client_for(files.UPLOAD_ATTEMPTS)  # POST /v1/files
        storage.client_for(1, settings.readiness_timeout_seconds)  # /readyz (Storage.ping)
        storage.client_for()  # downloads, deletes
        assert storage.presign_client is storage.client
