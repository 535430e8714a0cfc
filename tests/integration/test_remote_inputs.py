"""Image inputs as https:// URLs and data: URIs: fetched by the API at submit, stored as files of the tenant.

The images come from a real HTTPS server in the test process (a ``trustme`` authority that the API's
TLS check is made to trust through ``SSL_CERT_FILE``, as the webhook tests do), and run through a
real worker. Each hostile URL is answered with a 422 naming the field, and leaves no job and no file
behind. One test runs a real ``gpujobs api`` (gunicorn, gevent) to show that a slow URL holds only
its own request, and runs the README's example against it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.integration.client import assert_problem, auth, submit, upload, wait_for
from tests.integration.conftest import ROOT, Key, make_key
from tests.integration.image_server import ImageServer
from tests.integration.private_api import private_api
from tests.integration.test_segmentation import picture

LIMIT = 300_000  # GPUJOBS_INPUT_MAX_BYTES of these apps (the test body limit is 1 MiB)
DEADLINE = 2.0  # GPUJOBS_INPUT_URL_TIMEOUT_SECONDS of these apps
TEAL = picture(64, 48, seed=3)
NOTES = b"these are notes, not an image\n" * 10


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "orange").save(buffer, "JPEG")
    return buffer.getvalue()


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A certificate authority that the API process trusts (and only it), as an operator's bundle would."""
    import trustme

    ca = trustme.CA()
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    bundle.write_bytes(ca.cert_pem.bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(bundle))  # read by OpenSSL at each TLS connection the app makes
        yield ca


def tls_for(ca: Any, host: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def server(authority: Any) -> Iterator[ImageServer]:
    images = ImageServer("127.0.0.1", tls=tls_for(authority, "127.0.0.1"))
    images.images.update({"teal.png": TEAL, "notes.png": NOTES, "idem.png": picture(40, 40, seed=5)})
    yield images
    images.stop()


@pytest.fixture(scope="module")
def elsewhere(authority: Any) -> Iterator[ImageServer]:
    """A second server, on 127.0.0.2: where a redirect leads; nothing may reach it."""
    images = ImageServer("127.0.0.2", tls=tls_for(authority, "127.0.0.2"))
    images.images["teal.png"] = TEAL
    yield images
    images.stop()


def app_with(**settings: Any) -> Any:
    import api
    from db.settings import get_settings

    return api.create_app(get_settings().model_copy(update=settings))


@pytest.fixture(scope="module")
def open_app(services: Any) -> Any:
    """Private addresses allowed (the test server is on loopback); small limits so hostile cases end fast."""
    return app_with(
        input_url_allow_private=True,
        input_url_timeout_seconds=DEADLINE,
        input_max_bytes=LIMIT,
        input_url_max_redirects=2,
    )


@pytest.fixture(scope="module")
def strict_app(services: Any) -> Any:
    """The defaults: https only, no private addresses."""
    return app_with(input_max_bytes=LIMIT)


@pytest.fixture(scope="module")
def allowlist_app(services: Any) -> Any:
    """Non-public addresses refused except 127.0.0.1 (an operator's internal image store, say)."""
    return app_with(input_url_allowed_networks=["127.0.0.1/32"], input_max_bytes=LIMIT)


@pytest.fixture(scope="module")
def tenant(services: Any) -> Key:
    return make_key("url inputs", "user")


def rows(tenant: Key) -> tuple[int, int]:
    """The tenant's jobs and files: a refused submit must add neither."""
    from sqlalchemy import func, select

    from db.models import File, Job
    from db.session import session_scope

    with session_scope() as session:
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.tenant))
        files = session.scalar(select(func.count()).select_from(File).where(File.tenant_id == tenant.tenant))
        return int(jobs or 0), int(files or 0)


def accepted(response: Any, status: int = 202) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


def file_of(client: Any, key: str, file_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/files/{file_id}", headers=auth(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def loopback_name() -> str:
    """The machine's own name: it resolves locally, to a non-public address on a test machine."""
    name = socket.gethostname()
    found = {info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    assert found and not any(ipaddress.ip_address(a).is_global for a in found), (name, found)
    return name


# --- what works --------------------------------------------------------------------------------------


def test_an_https_url_becomes_a_file_of_the_tenant_and_the_job_runs_on_it(open_app, tenant, server, gpu_worker):
    client = open_app.test_client()
    url = server.url("/img/teal.png")
    job = accepted(submit(client, tenant.secret, {"type": "segmentation", "input": {"image": url, "threshold": 0}}))

    file_id = job["input"]["image"]
    assert file_id.startswith("file_"), job["input"]
    stored = file_of(client, tenant.secret, file_id)
    assert stored["sha256"] == hashlib.sha256(TEAL).hexdigest() and stored["size"] == len(TEAL)
    assert (stored["filename"], stored["content_type"], stored["width"], stored["height"]) == (
        "teal.png",
        "image/png",
        64,
        48,
    )
    [(_, headers)] = [(path, headers) for path, headers in server.requests if path == "/img/teal.png"]
    assert headers["host"] == f"127.0.0.1:{server.port}" and headers["user-agent"].startswith("gpujobs-inputs/")

    done = wait_for(client, tenant.secret, job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert (done["output"]["width"], done["output"]["height"]) == (64, 48)
    assert done["input"]["image"] == file_id


def test_a_data_uri_becomes_a_file_too_its_type_sniffed_not_declared(open_app, tenant, gpu_worker):
    client = open_app.test_client()
    image = jpeg(40, 30)
    body = {"type": "segmentation", "input": {"image": data_uri(image, "application/octet-stream"), "threshold": 0}}
    job = accepted(submit(client, tenant.secret, body))

    stored = file_of(client, tenant.secret, job["input"]["image"])
    assert (stored["content_type"], stored["filename"], stored["size"]) == ("image/jpeg", "data-uri.jpg", len(image))
    done = wait_for(client, tenant.secret, job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert (done["output"]["width"], done["output"]["height"]) == (40, 30)


def test_a_repeated_idempotent_submit_returns_the_first_job_without_fetching_again(open_app, tenant, server):
    client = open_app.test_client()
    body = {"type": "segmentation", "input": {"image": server.url("/img/idem.png")}}
    headers = {"Idempotency-Key": "url-inputs-idem"}
    first = accepted(submit(client, tenant.secret, body, headers))
    after_first = rows(tenant)

    again = accepted(submit(client, tenant.secret, body, headers), status=200)
    assert again["id"] == first["id"] and again["input"]["image"] == first["input"]["image"]
    assert server.paths().count("/img/idem.png") == 1  # compared on the body as sent: no second fetch
    assert rows(tenant) == after_first  # and no second file
    client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(tenant.secret))


def test_a_list_of_images_mixes_file_ids_urls_and_data_uris(open_app, tenant, server):
    client = open_app.test_client()
    uploaded = accepted(upload(client, tenant.secret, picture(32, 32, seed=9)), status=201)["id"]
    url = server.url("/img/teal.png")
    images = [url, data_uri(picture(24, 24, seed=4)), uploaded, url]
    body = {"type": "finetune", "input": {"images": images, "resolution": 64, "steps": 1}}
    job = accepted(submit(client, tenant.secret, body))
    try:
        stored = job["input"]["images"]
        assert all(item.startswith("file_") for item in stored), stored
        assert stored[2] == uploaded and stored[0] == stored[3]  # one URL twice: fetched and stored once
        assert len(set(stored)) == 3
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(tenant.secret))


# --- what is refused ---------------------------------------------------------------------------------

REFUSED_BY_DEFAULT = [
    ("https://127.0.0.1:{port}/img/teal.png", "127.0.0.1, a loopback address"),
    ("https://localhost:{port}/img/teal.png", "a loopback host"),
    ("https://0x7f000001:{port}/img/teal.png", "127.0.0.1, a loopback address"),
    ("https://[::1]:{port}/img/teal.png", "loopback"),
    ("https://10.0.0.1/cat.png", "a private address"),
    ("https://169.254.169.254/latest/meta-data/", "a link-local address"),
    ("https://{name}:{port}/img/teal.png", "resolves to"),
    ("http://127.0.0.1:{port}/img/teal.png", "only https:// URLs are fetched"),
    ("ftp://example.com/cat.png", "must be a file id (file_…), an https:// URL or a data: URI"),
    ("https://user:secret@example.com/cat.png", "user name or password"),
]


@pytest.mark.parametrize(("template", "words"), REFUSED_BY_DEFAULT)
def test_by_default_a_url_to_a_non_public_address_is_a_422_and_nothing_is_fetched(
    strict_app, tenant, server, template, words
):
    client = strict_app.test_client()
    url = template.format(port=server.port, name=loopback_name())
    before, fetched = rows(tenant), len(server.requests)
    problem = assert_problem(
        submit(client, tenant.secret, {"type": "segmentation", "input": {"image": url}}),
        422,
        loc=["body", "input", "image"],
    )
    assert words in problem["detail"], problem
    assert rows(tenant) == before and len(server.requests) == fetched


def test_a_redirect_to_a_private_address_is_refused_before_it_is_followed(allowlist_app, tenant, server, elsewhere):
    client = allowlist_app.test_client()
    first = server.url("/redirect?to=" + elsewhere.url("/img/teal.png"))
    allowed = {"type": "segmentation", "input": {"image": server.url("/img/teal.png")}}
    job = accepted(submit(client, tenant.secret, allowed))  # 127.0.0.1 itself is allowed: the redirect is not
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(tenant.secret))
    before = rows(tenant)

    problem = assert_problem(
        submit(client, tenant.secret, {"type": "segmentation", "input": {"image": first}}),
        422,
        loc=["body", "input", "image"],
    )
    assert f"redirects to {elsewhere.url('/img/teal.png')}, which names 127.0.0.2, a loopback" in problem["detail"]
    assert elsewhere.requests == [] and rows(tenant) == before


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/loop", "redirected more than 2 times"),
        ("/slow", f"took longer than {DEADLINE:g} s"),
        ("/slow-headers", f"took longer than {DEADLINE:g} s"),
        ("/endless", f"more than the limit of {LIMIT} bytes"),
        ("/declared-huge", f"is 10000000000 bytes (its Content-Length), more than the limit of {LIMIT}"),
        ("/img/notes.png", "is not an image"),  # served as image/png: the bytes decide
        ("/nothing", "answered HTTP 404"),
        ("/redirect?to=https://[::1", "which is not a URL"),
    ],
)
def test_a_hostile_or_broken_url_is_a_422_within_the_deadline(open_app, tenant, server, path, words):
    client = open_app.test_client()
    before = rows(tenant)
    started = time.monotonic()
    problem = assert_problem(
        submit(client, tenant.secret, {"type": "segmentation", "input": {"image": server.url(path)}}),
        422,
        loc=["body", "input", "image"],
    )
    assert time.monotonic() - started < DEADLINE + 1.5
    assert words in problem["detail"], problem
    assert rows(tenant) == before
    if path == "/declared-huge":
        # Refused from its header: the body was never read (no chunk at all written yet, or one at most).
        assert server.sent.get(path, 0) <= 64 * 1024


def test_a_server_that_never_answers_the_tls_handshake_is_cut_at_the_deadline(open_app, tenant):
    """The deadline covers connecting and TLS too, not only the body: the socket is shut when it passes."""
    client = open_app.test_client()
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever answers
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/cat.png"
        started = time.monotonic()
        problem = assert_problem(
            submit(client, tenant.secret, {"type": "segmentation", "input": {"image": url}}),
            422,
            loc=["body", "input", "image"],
        )
    assert DEADLINE - 0.1 < time.monotonic() - started < DEADLINE + 1.5
    assert f"took longer than {DEADLINE:g} s" in problem["detail"], problem


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("data:image/png;base64,iVBOR$$$", "a character base64 does not use: '$'"),
        ("data:image/png;base64", "without the comma"),
        ("data:image/png;base64," + "A" * (4 * LIMIT // 3 + 8), f"an image of at most {LIMIT} bytes"),
        (data_uri(NOTES), "is not an image"),
    ],
    ids=["bad-base64", "no-comma", "oversized", "not-an-image"],
)
def test_a_bad_data_uri_is_a_422_naming_the_field(open_app, tenant, value, words):
    client = open_app.test_client()
    before = rows(tenant)
    problem = assert_problem(
        submit(client, tenant.secret, {"type": "segmentation", "input": {"image": value}}),
        422,
        loc=["body", "input", "image"],
    )
    assert words in problem["detail"], problem
    assert rows(tenant) == before


def test_in_a_list_the_422_names_the_index_and_stores_nothing(open_app, tenant):
    client = open_app.test_client()
    before = rows(tenant)
    images = [data_uri(picture(24, 24)), data_uri(picture(24, 24, seed=1)), "data:image/png;base64,@@"]
    problem = assert_problem(
        submit(client, tenant.secret, {"type": "finetune", "input": {"images": images, "resolution": 64}}),
        422,
        loc=["body", "input", "images", 2],
    )
    assert "base64" in problem["detail"]
    assert rows(tenant) == before  # the two good images stored first are not kept either


def test_a_dataset_stays_a_file_id(open_app, tenant):
    client = open_app.test_client()
    body = {"type": "finetune", "input": {"dataset": "data:application/zip;base64,UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="}}
    assert_problem(submit(client, tenant.secret, body), 422, loc=["body", "input", "dataset"])


# --- under gunicorn and gevent, and the README ---------------------------------------------------------

README_SECTION = "### Images by URL or data URI"


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(README_SECTION) + r"\n.*?```sh\n(.*?)```", text, re.DOTALL)
    assert block, f"README.md has no sh block under {README_SECTION!r}"
    return block.group(1)


def idle_in_transaction(database_url: str) -> int:
    """Connections to this database parked inside a transaction (none on SQLite, which has no server)."""
    if not database_url.startswith("postgresql"):
        return 0
    import psycopg

    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in%'"
        row = connection.execute(query).fetchone()
        return int(row[0]) if row else 0


def test_under_gevent_a_slow_url_holds_only_its_own_request_and_the_readme_example_runs(tmp_path):
    plain = ImageServer("127.0.0.1")
    plain.images["teal.png"] = TEAL
    settings = {
        "GPUJOBS_INPUT_URL_ALLOW_HTTP": "true",
        "GPUJOBS_INPUT_URL_ALLOW_PRIVATE": "true",
        "GPUJOBS_INPUT_URL_TIMEOUT_SECONDS": "3",
    }
    try:
        with private_api(tmp_path / "api", settings=settings, workers=1) as api:
            key = api.key("url inputs").secret
            slow: dict[str, Any] = {}

            def submit_slow() -> None:
                started = time.monotonic()
                body = {"type": "segmentation", "input": {"image": plain.url("/slow")}}
                slow["response"] = requests.post(f"{api.base_url}/v1/jobs", json=body, headers=auth(key), timeout=30)
                slow["seconds"] = time.monotonic() - started

            thread = threading.Thread(target=submit_slow)
            thread.start()
            deadline = time.monotonic() + 10
            while "/slow" not in plain.paths() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "/slow" in plain.paths()

            assert idle_in_transaction(api.database_url) == 0  # the fetch holds no database connection

            started = time.monotonic()  # the one gevent process is fetching /slow meanwhile
            assert requests.get(f"{api.base_url}/healthz", timeout=5).status_code == 200
            body = {"type": "segmentation", "input": {"image": plain.url("/img/teal.png")}}  # http:// allowed here
            other = requests.post(f"{api.base_url}/v1/jobs", json=body, headers=auth(key), timeout=10)
            assert other.status_code == 202 and other.json()["input"]["image"].startswith("file_"), other.text
            # Answered while /slow is still being fetched (it gives up at 3 s): not queued behind it.
            assert time.monotonic() - started < 2.5 and "response" not in slow

            thread.join(15)
            assert_problem(slow["response"], 422, loc=["body", "input", "image"])
            assert "took longer than 3 s" in slow["response"].json()["detail"]
            assert 2.5 < slow["seconds"] < 5

            workdir = tmp_path / "user"
            workdir.mkdir()
            env = {**os.environ, "GPUJOBS": api.base_url, "KEY": key}
            script = "set -euo pipefail\n" + readme_block()
            subprocess.run(["bash", "-c", script], cwd=workdir, env=env, check=True, timeout=60)
            outputs = sorted(path.name for path in workdir.iterdir())
            job = json.loads((workdir / "url-job.json").read_text())
            assert job["status"] == "queued" and job["input"]["image"].startswith("file_"), (outputs, job)
            stored = requests.get(f"{api.base_url}/v1/files/{job['input']['image']}", headers=auth(key), timeout=5)
            assert (stored.json()["width"], stored.json()["height"]) == (64, 48)
    finally:
        plain.stop()
