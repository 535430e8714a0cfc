"""What input URLs may reach (``api.url_fetch.Policy``), and the settings it is built from."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from api.url_fetch import Policy
from db.settings import Settings


def policy(allow_private: bool = False, networks: tuple[str, ...] = ()) -> Policy:
    return Policy(
        allow_http=False,
        allow_private=allow_private,
        allowed_networks=tuple(ipaddress.ip_network(n, strict=False) for n in networks),
        max_bytes=1000,
        max_redirects=3,
        timeout=5.0,
    )


@pytest.mark.parametrize(
    ("address", "reason"),
    [("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("169.254.169.254", "link-local"), ("8.8.8.8", None)],
)
def test_by_default_only_public_addresses_are_reached(address, reason):
    found = policy().refusal(ipaddress.ip_address(address))
    assert (found is None) if reason is None else (found is not None and reason in found), found


def test_an_allowed_network_opens_that_network_only():
    allow = policy(networks=("10.1.2.0/24",))
    assert allow.refusal(ipaddress.ip_address("10.1.2.200")) is None
    assert "private" in (allow.refusal(ipaddress.ip_address("10.1.3.1")) or "")
    assert "loopback" in (allow.refusal(ipaddress.ip_address("127.0.0.1")) or "")


def test_allow_private_opens_every_address():
    assert policy(allow_private=True).refusal(ipaddress.ip_address("127.0.0.1")) is None


def test_the_input_settings_default_to_refusing_and_to_the_upload_limit():
    settings = Settings(_env_file=None)
    assert not settings.input_url_allow_http and not settings.input_url_allow_private
    assert settings.input_max_bytes_in_effect == settings.max_body_bytes
    assert Settings(input_max_bytes=5000).input_max_bytes_in_effect == 5000


def test_a_network_that_does_not_parse_is_refused_at_start():
    with pytest.raises(ValidationError, match="is not a network"):
        Settings(input_url_allowed_networks=["10.1.2.0/33"])
    assert Settings(input_url_allowed_networks=["10.1.2.3", "fd00::/8"]).input_url_allowed_networks
