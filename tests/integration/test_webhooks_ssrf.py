"""The SSRF guard: with GPUJOBS_WEBHOOK_ALLOW_PRIVATE off, webhooks never reach loopback or private addresses.

What the URL alone shows is refused at submit (422 on `webhook`); what only DNS tells is refused
at send, as a failed delivery that says why, before any connection is made. The receivers here
listen on the very addresses the URLs lead to, so a guard that let a request through would be seen.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from tests.integration import webhook_fixtures
from tests.integration.client import assert_problem, auth, submit
from tests.integration.webhook_fixtures import job_with_webhook, wait_deliveries
from tests.integration.webhook_receiver import Receiver

receiver = webhook_fixtures.receiver
webhooks_worker = webhook_fixtures.webhooks_worker

LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:{port}/",
    "http://0x7f000001:{port}/",
    "http://2130706433:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://127.1:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://localhost:{port}/",
    "http://LocalHost.:{port}/",
]
OTHER_PRIVATE = [
    "http://[::1]:{port}/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://0.0.0.0:{port}/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://[64:ff9b::7f00:1]/",
]


@pytest.fixture(scope="module")
def strict_app(services):
    """An API app whose operator did not allow private webhook targets (the default)."""
    import api
    from db.settings import get_settings

    return api.create_app(get_settings().model_copy(update={"webhook_allow_private": False}))


def loopback_name() -> str:
    """A host name that resolves (through /etc/hosts or the resolver) to a loopback or private address.

    Offline, no public name resolves to loopback, so the machine's own name is used: it resolves
    locally, and never to a public address on a test machine.
    """
    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    assert addresses and not any(ipaddress.ip_address(a).is_global for a in addresses), (
        f"this test needs the machine's name {name!r} to resolve to a non-public address; it gives {addresses}"
    )
    return name


@pytest.mark.parametrize("url", [*LOOPBACK_SPELLINGS, *OTHER_PRIVATE, "file:///etc/passwd", "ftp://example.com/"])
def test_an_obviously_private_url_is_a_422_at_submit(strict_app, keys, url):
    client = strict_app.test_client()
    response = submit(client, keys.admin.secret, {"type": "diagnostic", "input": {}, "webhook": url.format(port=8080)})
    body = assert_problem(response, 422, loc=["body", "webhook"])
    assert "public addresses" in body["detail"] or "http:// or https://" in body["detail"], body


def test_a_public_url_passes_the_submit_check(strict_app, keys):
    """The request is made to fail later, on `metadata`, so that no job is created that would try the Internet."""
    client = strict_app.test_client()
    too_big = {"blob": "x" * 20_000}
    for url in ("https://hooks.example.com/gpujobs?tenant=7", "http://93.184.216.34:8080/hook"):
        body = {"type": "diagnostic", "input": {}, "webhook": url, "metadata": too_big}
        problem = assert_problem(submit(client, keys.admin.secret, body), 422, loc=["body", "metadata"])
        assert all(error["loc"][-1] != "webhook" for error in problem["errors"])


def test_every_spelling_of_loopback_and_every_private_range_is_refused_at_send(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    """Jobs submitted where private targets were allowed, sent by a worker where they are not."""
    admin = keys.admin.secret
    ipv6 = Receiver("::1")
    try:
        webhooks_worker(webhook_allow_private="false")
        jobs = {}
        for template in [*LOOPBACK_SPELLINGS, *OTHER_PRIVATE]:
            port = ipv6.port if "[::1]" in template else receiver.port
            url = template.format(port=port)
            jobs[url] = job_with_webhook(client, admin, url)["id"]

        for url, job_id in jobs.items():
            [delivery] = wait_deliveries(client, admin, job_id, lambda ds: ds and ds[0]["status"] != "pending", 30)
            assert delivery["status"] == "failed", (url, delivery)
            assert delivery["attempts"] == 1 and delivery["next_attempt_at"] is None
            error = delivery["last_error"]
            assert error.startswith("refused: the webhook URL") and "public addresses" in error, (url, error)
            [attempt] = delivery["history"]
            assert attempt["status_code"] is None and attempt["error"] == error
        time.sleep(1)
        assert receiver.received == [] and ipv6.received == []
    finally:
        ipv6.stop()


def test_a_name_that_resolves_to_loopback_passes_submit_and_is_refused_at_send(
    strict_app, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    name = loopback_name()
    client = strict_app.test_client()
    webhooks_worker(webhook_allow_private="false")
    listening = Receiver("0.0.0.0")  # whatever the name resolves to on this machine, this would answer
    try:
        url = listening.url("/hook", host=name)
        job = job_with_webhook(client, admin, url)  # the URL alone shows nothing wrong: 202

        [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["status"] != "pending", 30)
        assert delivery["status"] == "failed"
        assert f"{name} resolves to" in delivery["last_error"], delivery["last_error"]
        assert "loopback" in delivery["last_error"] or "private" in delivery["last_error"]
        time.sleep(1)
        assert listening.received == []
    finally:
        listening.stop()


def test_with_private_targets_allowed_the_request_goes_to_the_resolved_address_with_the_urls_host(
    client, keys, gpu_worker, webhooks_worker
):
    """The sender connects to the address it checked, and still says the URL's host name in `Host`."""
    admin = keys.admin.secret
    name = loopback_name()
    listening = Receiver("0.0.0.0")
    try:
        webhooks_worker()  # GPUJOBS_WEBHOOK_ALLOW_PRIVATE=true
        job = job_with_webhook(client, admin, listening.url("/named", host=name))
        [request] = listening.wait_for("/named", lambda found: len(found) >= 1, 30)
        assert request.headers["host"] == f"{name}:{listening.port}"
        [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["status"] == "delivered")
        assert delivery["attempts"] == 1
    finally:
        listening.stop()


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("example.com", None),
    ],
)
def test_the_guard_reads_a_host_as_a_resolver_would(host, address):
    from worker.webhooks import guard

    found = guard.literal_address(host)
    assert (str(found) if found else None) == (str(ipaddress.ip_address(address)) if address else None)
    if address is not None:  # and the resolver agrees: what the guard reads is where a connection would go
        infos = socket.getaddrinfo(host.strip("[]"), 80, type=socket.SOCK_STREAM)
        assert {ipaddress.ip_address(info[4][0]) for info in infos} == {ipaddress.ip_address(address)}


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("2002:7f00:1::", "loopback"),
        ("100.64.0.1", "publicly routable"),
        ("240.0.0.1", "reserved"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_the_guard_refuses_every_non_public_range(address, reason):
    from worker.webhooks import guard

    found = guard.forbidden(ipaddress.ip_address(address))
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found, found


def test_the_submit_check_answers_a_precise_422_for_a_broken_url(strict_app, keys):
    client = strict_app.test_client()
    for url, words in [
        ("http://example.com:99999/", "not a valid URL"),
        ("http://999999999999/", "not a valid IPv4 address"),
    ]:
        response = client.post("/v1/jobs", json={"type": "diagnostic", "webhook": url}, headers=auth(keys.admin.secret))
        body = assert_problem(response, 422, loc=["body", "webhook"])
        assert words in body["detail"], body


def test_https_is_pinned_to_the_checked_address_yet_verified_against_the_urls_host(
    client, keys, gpu_worker, webhooks_worker, tmp_path
):
    """SNI and the certificate check use the URL's host name although the connection goes to an IP address."""
    import ssl

    import trustme

    admin = keys.admin.secret
    name = loopback_name()
    authority = trustme.CA()
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(authority.cert_pem.bytes())
    server_names: list[str | None] = []

    def tls_for(host: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert(host).configure_cert(context)
        context.sni_callback = lambda _socket, server_name, _context: server_names.append(server_name)
        return context

    good, wrong = Receiver("0.0.0.0", tls=tls_for(name)), Receiver("0.0.0.0", tls=tls_for("someone-else.example"))
    try:
        webhooks_worker(env={"SSL_CERT_FILE": str(bundle)})  # the worker trusts this CA (and only it)
        verified = job_with_webhook(client, admin, good.url("/tls", host=name))
        mismatched = job_with_webhook(client, admin, wrong.url("/tls", host=name))

        [request] = good.wait_for("/tls", lambda found: len(found) >= 1, 30)
        assert request.headers["host"] == f"{name}:{good.port}"
        assert name in server_names
        wait_deliveries(client, admin, verified["id"], lambda ds: ds and ds[0]["status"] == "delivered")
        [refused] = wait_deliveries(client, admin, mismatched["id"], lambda ds: ds and ds[0]["attempts"] >= 1)
        error = refused["history"][0]["error"]
        assert error.startswith("TLS failed") and name in error and "someone-else.example" in error, error
        assert wrong.received == []
    finally:
        good.stop()
        wrong.stop()
