"""The webhook SSRF guard (worker/webhooks/guard.py): what a URL may name, at submit and at send.

No network: ``check_url`` never resolves; ``resolve`` is called only on IP literals (which
``getaddrinfo`` answers without a lookup), on ``localhost`` (the hosts file) and on a name the
resolver refuses before any lookup.
"""

from __future__ import annotations

import base64
import ipaddress

import pytest

from worker.webhooks.guard import Refused, Target, Unresolvable, check_url, forbidden, literal_address, parse, resolve

PUBLIC_ONLY = "webhooks may only go to public addresses"


# --- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://hooks.example/in", "must be an http:// or https:// URL"),
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
        ("gopher://hooks.example:70/", "must be an http:// or https:// URL"),
        ("javascript:alert(1)", "must be an http:// or https:// URL"),
        ("hooks.example/in", "must be an http:// or https:// URL"),
        ("http:///in", "has no host"),
        ("https://:443/in", "has no host"),
        ("http://hooks.example:99999/", "is not a valid URL (Port out of range 0-65535)"),
        ("http://[::1/", "is not a valid URL (Invalid IPv6 URL)"),
    ],
)
def test_parse_refuses_what_is_not_an_http_url(url: str, message: str) -> None:
    with pytest.raises(Refused) as refused:
        parse(url)
    assert str(refused.value) == message
    # The scheme and shape are checked even when private addresses are allowed.
    with pytest.raises(Refused):
        check_url(url, allow_private=True)


def test_parse_gives_what_to_connect_to_and_what_to_send() -> None:
    assert parse("  HTTPS://Hooks.Example.:8443/in/?a=1&b=2  ") == Target(
        scheme="https",
        host="hooks.example",
        port=8443,
        path="/in/?a=1&b=2",
        host_header="hooks.example:8443",
        authorization=None,
    )
    plain = parse("http://hooks.example")
    assert (plain.port, plain.path, plain.host_header) == (80, "/", "hooks.example")
    assert parse("https://hooks.example/x").port == 443
    assert parse("https://hooks.example:443/x").host_header == "hooks.example"  # default port: not repeated


def test_parse_brackets_ipv6_hosts_and_encodes_international_names() -> None:
    v6 = parse("http://[2606:4700::1111]:8080/in")
    assert (v6.host, v6.host_header) == ("2606:4700::1111", "[2606:4700::1111]:8080")
    assert parse("https://[2606:4700::1111]/").host_header == "[2606:4700::1111]"
    idn = parse("https://bücher.example/hook")
    assert (idn.host, idn.host_header) == ("xn--bcher-kva.example", "xn--bcher-kva.example")


def test_credentials_in_the_url_become_basic_authorization() -> None:
    target = parse("https://us%40er:p%3Ass@hooks.example/in")
    assert target.authorization == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert target.host == "hooks.example" and "@" not in target.host_header
    assert parse("https://token@hooks.example/").authorization == "Basic " + base64.b64encode(b"token:").decode()


# --- addresses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),  # one decimal number
        ("0x7f000001", "127.0.0.1"),  # one hex number
        ("0177.0.0.1", "127.0.0.1"),  # octal part
        ("0x7F.1", "127.0.0.1"),  # two parts, hex
        ("127.1", "127.0.0.1"),  # two parts
        ("10.0.258", "10.0.1.2"),  # three parts, the last one 16 bits
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
    ],
)
def test_literal_address_reads_every_spelling_a_resolver_accepts(host: str, address: str) -> None:
    assert literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["hooks.example", "1.2.3.4.5", "localhost", "0x7f.example"])
def test_literal_address_is_none_for_names(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize("host", ["256.256.256.256", "08.0.0.1", "0x", "1.2.3.4294967296"])
def test_a_numeric_host_that_is_no_address_is_refused(host: str) -> None:
    with pytest.raises(Refused, match=rf"^has a numeric host that is not a valid IPv4 address: '{host}'$"):
        literal_address(host)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", "an unspecified address"),
        ("127.0.0.1", "a loopback address"),
        ("127.255.255.254", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a link-local address"),  # cloud metadata services
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a reserved address"),
        ("100.64.0.1", "not a publicly routable address"),  # carrier-grade NAT
        ("::", "an unspecified address"),
        ("::1", "a loopback address"),
        ("fe80::1", "a link-local address"),
        ("fc00::1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("ff02::1", "a multicast address"),
        ("2001:db8::1", "a private address"),  # documentation range
        # IPv6 forms that carry an IPv4 address reach that address: judged by it.
        ("::ffff:127.0.0.1", "a loopback address (IPv4 127.0.0.1 inside IPv6)"),
        ("::ffff:169.254.169.254", "a link-local address (IPv4 169.254.169.254 inside IPv6)"),
        ("::ffff:10.0.0.1", "a private address (IPv4 10.0.0.1 inside IPv6)"),
        ("2002:7f00:1::", "a loopback address (IPv4 127.0.0.1 inside IPv6)"),  # 6to4
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "a loopback address (IPv4 127.0.0.1 inside IPv6)"),  # Teredo
        ("64:ff9b::7f00:1", "a loopback address (IPv4 127.0.0.1 inside IPv6)"),  # NAT64
        ("64:ff9b::a9fe:a9fe", "a link-local address (IPv4 169.254.169.254 inside IPv6)"),
    ],
)
def test_forbidden_names_why_an_address_is_not_public(address: str, reason: str) -> None:
    assert forbidden(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden(ipaddress.ip_address(address)) is None


# --- at submit: check_url --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost/in", "names localhost, a loopback host"),
        ("http://LOCALHOST:8080/in", "names localhost, a loopback host"),
        ("http://localhost./in", "names localhost, a loopback host"),
        ("http://api.localhost/in", "names api.localhost, a loopback host"),
        ("http://127.0.0.1/in", "names 127.0.0.1, a loopback address"),
        ("http://2130706433/in", "names 127.0.0.1, a loopback address"),
        ("http://0x7f000001/in", "names 127.0.0.1, a loopback address"),
        ("http://0177.0.0.1/in", "names 127.0.0.1, a loopback address"),
        ("http://127.1:9000/in", "names 127.0.0.1, a loopback address"),
        ("http://0/in", "names 0.0.0.0, an unspecified address"),
        ("https://10.0.0.5/in", "names 10.0.0.5, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "names 169.254.169.254, a link-local address"),
        ("http://[::1]:8080/in", "names ::1, a loopback address"),
        ("http://[fe80::1]/in", "names fe80::1, a link-local address"),
        ("http://[fd00::1]/in", "names fd00::1, a private address"),
        ("http://[::ffff:127.0.0.1]/in", "names ::ffff:7f00:1, a loopback address (IPv4 127.0.0.1 inside IPv6)"),
        (
            "http://[::ffff:a9fe:a9fe]/in",
            "names ::ffff:a9fe:a9fe, a link-local address (IPv4 169.254.169.254 inside IPv6)",
        ),
        ("http://user:pw@127.0.0.1/in", "names 127.0.0.1, a loopback address"),
    ],
)
def test_check_url_refuses_non_public_hosts_in_any_spelling(url: str, message: str) -> None:
    with pytest.raises(Refused) as refused:
        check_url(url, allow_private=False)
    assert str(refused.value) == f"{message}; {PUBLIC_ONLY}"


@pytest.mark.parametrize(
    "url",
    ["http://localhost:8080/in", "http://127.0.0.1/in", "http://2130706433/", "http://[::1]/", "http://10.0.0.5/"],
)
def test_allow_private_lets_non_public_hosts_through(url: str) -> None:
    assert check_url(url, allow_private=True) == parse(url)


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example/in", "http://8.8.8.8:8080/in", "https://[2606:4700:4700::1111]/", "http://1.2.3.4.5/"],
)
def test_check_url_passes_public_literals_and_names_without_resolving_them(url: str) -> None:
    assert check_url(url, allow_private=False) == parse(url)


# --- at send: resolve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message", "addresses"),
    [
        ("http://127.0.0.1:9/", "127.0.0.1 resolves to 127.0.0.1, a loopback address", ["127.0.0.1"]),
        ("http://2130706433:9/", "2130706433 resolves to 127.0.0.1, a loopback address", ["127.0.0.1"]),
        (
            "http://[::ffff:10.0.0.1]/",
            "::ffff:10.0.0.1 resolves to ::ffff:10.0.0.1, a private address (IPv4 10.0.0.1 inside IPv6)",
            ["::ffff:10.0.0.1"],
        ),
    ],
)
def test_resolve_checks_the_addresses_it_will_connect_to(url: str, message: str, addresses: list[str]) -> None:
    target = parse(url)
    with pytest.raises(Refused) as refused:
        resolve(target, allow_private=False)
    assert str(refused.value) == f"{message}; {PUBLIC_ONLY}"
    assert resolve(target, allow_private=True) == addresses


def test_resolve_refuses_localhost_whatever_it_resolves_to() -> None:
    target = parse("http://localhost:9/")  # what check_url would refuse by name; resolve judges the addresses
    with pytest.raises(
        Refused, match=rf"^localhost resolves to (127\.0\.0\.1|::1), a loopback address; {PUBLIC_ONLY}$"
    ):
        resolve(target, allow_private=False)
    addresses = resolve(target, allow_private=True)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    assert len(addresses) == len(set(addresses))


def test_resolve_returns_public_literals_as_they_are() -> None:
    assert resolve(parse("http://8.8.8.8/"), allow_private=False) == ["8.8.8.8"]
    assert resolve(parse("https://[2606:4700:4700::1111]/"), allow_private=False) == ["2606:4700:4700::1111"]


def test_a_name_that_cannot_be_resolved_is_unresolvable_not_refused() -> None:
    # A 64-character label: the resolver refuses it before any lookup.
    target = parse(f"https://{'a' * 64}.example/in")
    with pytest.raises(Unresolvable, match=rf"^could not resolve {'a' * 64}\.example: "):
        resolve(target, allow_private=True)
