"""The embedded Redis and S3 servers of `gpujobs up`: free ports, loopback only, credentials, clean stop."""

from __future__ import annotations

import socket

import pytest
import redis
from botocore.exceptions import ClientError

from gpujobs.harness.ports import free_port
from gpujobs.harness.servers import ServiceError, s3_client, start_redis, start_s3


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_redis_starts_answers_restarts_on_its_port_and_stops(tmp_path):
    server = start_redis(tmp_path / "redis")
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        port = server.port
        server.stop()
        assert server.process.poll() is not None and not _listening(port)

        server = start_redis(tmp_path / "redis", port=port)
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
    assert not _listening(server.port)
    assert not list((tmp_path / "redis").glob("*.rdb")) and not list((tmp_path / "redis").glob("*.aof"))


def test_redis_on_a_taken_port_fails_with_its_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceError) as failure:
            start_redis(tmp_path / "redis", port=port)
    assert str(port) in str(failure.value)
    assert "log" in str(failure.value)


def test_two_s3_servers_run_side_by_side_and_check_credentials(tmp_path):
    first = start_s3(tmp_path / "one")
    second = None
    try:
        second = start_s3(tmp_path / "two", access_key="other", secret_key="other-secret-key")
        assert set(first.ports.values()).isdisjoint(second.ports.values())
        assert all(port < 65536 for port in [*first.ports.values(), *second.ports.values()])

        s3 = first.client()
        s3.create_bucket(Bucket="abc")
        s3.put_object(Bucket="abc", Key="a/b.txt", Body=b"hello")
        assert s3.get_object(Bucket="abc", Key="a/b.txt")["Body"].read() == b"hello"
        assert [b["Name"] for b in second.client().list_buckets()["Buckets"]] == []  # separate data

        with pytest.raises(ClientError):
            s3_client(first.endpoint_url, first.access_key, "not-the-secret").list_buckets()
        with pytest.raises(ClientError):
            s3_client(first.endpoint_url, second.access_key, second.secret_key).list_buckets()
    finally:
        first.stop()
        if second is not None:
            second.stop()
    for server in (first, second):
        assert server.process.poll() is not None
        assert not any(_listening(port) for port in server.ports.values())


def test_s3_data_survives_a_restart(tmp_path):
    server = start_s3(tmp_path / "s3")
    try:
        server.client().create_bucket(Bucket="keep")
        server.client().put_object(Bucket="keep", Key="x", Body=b"kept")
    finally:
        server.stop()
    server = start_s3(tmp_path / "s3")
    try:
        assert server.client().get_object(Bucket="keep", Key="x")["Body"].read() == b"kept"
    finally:
        server.stop()


def test_free_port_is_free():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
