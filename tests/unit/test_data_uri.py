"""``api.data_uri``: the data: URIs an image field accepts, and each way one can be wrong."""

from __future__ import annotations

import base64

import pytest

from api.data_uri import DataUriError, encoded_limit, is_data_uri, parse

PNG_HEAD = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("uri", "media_type"),
    [
        (f"data:image/png;base64,{b64(PNG_HEAD)}", "image/png"),
        (f"DATA:Image/PNG;BASE64,{b64(PNG_HEAD)}", "image/png"),
        (f"data:application/octet-stream;base64,{b64(PNG_HEAD)}", "application/octet-stream"),  # Replicate's
        (f"data:image/png;name=x.png;base64,{b64(PNG_HEAD)}", "image/png"),
        (f"data:image/png;base64,{b64(PNG_HEAD).rstrip('=')}", "image/png"),  # padding left off
        (f"data:;base64,{b64(PNG_HEAD)}", "text/plain"),
    ],
)
def test_base64_data_uris_decode_to_their_bytes(uri, media_type):
    parsed = parse(uri, 1000)
    assert parsed.data == PNG_HEAD and parsed.media_type == media_type


def test_a_percent_encoded_data_uri_decodes_too():
    assert parse("data:image/png,%89PNG%0D%0A", 100).data == b"\x89PNG\r\n"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("https://example.com/x.png", "is not a data: URI"),
        ("data:image/png;base64", "without the comma"),
        ("data:image/png;base64,", "no data after the comma"),
        ("data:png;base64,AAAA", "not a type/subtype"),
        ("data:image/png;base64,AA$A", "a character base64 does not use: '$'"),
        ("data:image/png;base64,AA=A", "padding before its end"),
        ("data:image/png;base64,AAAAA", "does not decode"),
        ("data:image/png;" + "x" * 300 + ";base64,AAAA", "header (before the comma) is over 256"),
    ],
)
def test_a_malformed_data_uri_says_what_is_wrong(uri, words):
    with pytest.raises(DataUriError) as caught:
        parse(uri, 1000)
    assert words in str(caught.value)


def test_an_oversized_payload_is_refused_before_it_is_decoded(monkeypatch):
    def decoding(*_args, **_kwargs):
        raise AssertionError("decoded although the length alone refuses it")

    monkeypatch.setattr(base64, "b64decode", decoding)
    payload = "A" * (encoded_limit(300, True) + 4)
    with pytest.raises(DataUriError) as caught:
        parse(f"data:image/png;base64,{payload}", 300)
    assert f"{len(payload)} characters" in str(caught.value) and "at most 300 bytes" in str(caught.value)


def test_the_limit_is_exact_on_the_decoded_bytes():
    assert len(parse(f"data:image/png;base64,{b64(bytes(300))}", 300).data) == 300
    with pytest.raises(DataUriError, match="404 characters"):  # the length alone: more than 300 bytes' worth
        parse(f"data:image/png;base64,{b64(bytes(301))}", 300)
    with pytest.raises(DataUriError, match="302 bytes once decoded"):  # as long as 301 bytes' worth, yet over
        parse(f"data:image/png;base64,{b64(bytes(302))}", 301)
    with pytest.raises(DataUriError, match="5 bytes once decoded"):  # short: 3 characters a byte is the bound
        parse("data:image/png,abcde", 4)


def test_encoded_limit_is_the_longest_payload_within_the_limit():
    for size in range(0, 20):
        assert len(b64(bytes(size))) <= encoded_limit(size, True)
    assert encoded_limit(3, True) == 4 and encoded_limit(4, True) == 8 and encoded_limit(4, False) == 12


def test_is_data_uri_ignores_case():
    assert is_data_uri("DaTa:image/png;base64,AAAA") and not is_data_uri("file_abc")
