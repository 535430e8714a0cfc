"""/v1/files: images are checked before they are stored; what is stored reads back byte for byte."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib

import pytest
import requests

from tests.integration.client import assert_problem, auth, png_bytes, upload


def png_header_only(width: int, height: int) -> bytes:
    """A valid, tiny PNG that claims ``width`` × ``height`` pixels: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_an_uploaded_image_reads_back(client, keys):
    data = png_bytes(32, 24)
    response = upload(client, keys.user_a.secret, data, filename="photo.png")
    assert response.status_code == 201, response.get_data(as_text=True)
    file = response.get_json()
    assert file["id"].startswith("file_")
    assert response.headers["Location"] == f"/v1/files/{file['id']}"
    assert (file["filename"], file["content_type"], file["size"]) == ("photo.png", "image/png", len(data))
    assert file["sha256"] == hashlib.sha256(data).hexdigest()
    assert (file["width"], file["height"]) == (32, 24)
    assert file["created_at"].endswith("Z")

    again = client.get(f"/v1/files/{file['id']}", headers=auth(keys.user_a.secret))
    assert again.status_code == 200 and again.get_json() == file

    content = client.get(f"/v1/files/{file['id']}/content", headers=auth(keys.user_a.secret))
    if content.status_code in (302, 303, 307):
        downloaded = requests.get(content.headers["Location"], timeout=10)
        assert downloaded.status_code == 200
        body = downloaded.content
    else:
        assert content.status_code == 200
        body = content.data
    assert body == data


@pytest.mark.parametrize("fmt,content_type", [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")])
def test_other_accepted_formats(client, keys, fmt, content_type):
    data = png_bytes(16, 16, fmt=fmt)
    response = upload(client, keys.user_a.secret, data, filename=f"x.{fmt.lower()}")
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["content_type"] == content_type


def test_a_dataset_zip_is_accepted(client, keys):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", png_bytes())
        archive.writestr("a.txt", "a red square")
    response = upload(client, keys.user_a.secret, buffer.getvalue(), filename="set.zip", purpose="dataset")
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["content_type"] == "application/zip"


@pytest.mark.parametrize(
    "data,filename,why",
    [
        (b"just some text, not an image\n", "notes.txt", "not an image"),
        (b"GIF89a", "trunc.gif", "a truncated header"),
        (png_bytes(40, 40)[:60], "cut.png", "a truncated PNG"),
        (png_bytes(16, 16, fmt="ICO"), "icon.ico", "a format off the allow-list"),
        (png_bytes(16, 16, fmt="PDF"), "doc.pdf", "a PDF"),
    ],
    ids=["text", "gif-header", "truncated-png", "ico", "pdf"],
)
def test_a_file_that_is_not_an_accepted_image_is_a_422(client, keys, data, filename, why):
    response = upload(client, keys.user_a.secret, data, filename=filename)
    assert_problem(response, 422, ["file"])


def test_a_decompression_bomb_is_a_422(client, keys):
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels in a file of under a hundred bytes
    assert len(bomb) < 200
    body = assert_problem(upload(client, keys.user_a.secret, bomb, filename="bomb.png"), 422, ["file"])
    assert "pixels" in body["detail"]


def test_an_image_over_the_pixel_limit_is_a_422(client, keys):
    from db.settings import get_settings

    limit = get_settings().max_image_pixels
    # Just over the limit, under twice it: Pillow only warns there, the API must still refuse.
    width = int(limit**0.5) + 50
    data = png_bytes(width, width)
    body = assert_problem(upload(client, keys.user_a.secret, data, filename="big.png"), 422, ["file"])
    assert str(limit) in body["detail"]


def test_an_image_at_the_pixel_limit_is_accepted(client, keys):
    from db.settings import get_settings

    side = int(get_settings().max_image_pixels ** 0.5)
    response = upload(client, keys.user_a.secret, png_bytes(side, side), filename="edge.png")
    assert response.status_code == 201, response.get_data(as_text=True)


def test_an_upload_over_the_body_limit_is_a_413(client, keys):
    from db.settings import get_settings

    data = b"\x00" * (get_settings().max_body_bytes + 1024)
    assert_problem(upload(client, keys.user_a.secret, data, filename="huge.png"), 413)


def test_upload_form_problems(client, keys):
    key = keys.user_a.secret
    assert_problem(client.post("/v1/files", json={"file": "x"}, headers=auth(key)), 415)
    assert_problem(
        client.post("/v1/files", data={"other": "x"}, headers=auth(key), content_type="multipart/form-data"),
        422,
        ["file"],
    )
    assert_problem(upload(client, key, b"", filename="empty.png"), 422, ["file"])
    assert_problem(upload(client, key, png_bytes(), purpose="weights"), 422, ["purpose"])
    assert_problem(upload(client, key, png_bytes(), filename="x.zip", purpose="dataset"), 422, ["file"])


def test_a_zip_with_an_unsafe_path_is_a_422(client, keys):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../etc/evil.txt", "x")
    response = upload(client, keys.user_a.secret, buffer.getvalue(), filename="set.zip", purpose="dataset")
    assert_problem(response, 422, ["file"])


def test_an_unknown_file_is_a_404(client, keys):
    assert_problem(client.get("/v1/files/file_nope", headers=auth(keys.user_a.secret)), 404)
    assert_problem(client.get("/v1/files/file_nope/content", headers=auth(keys.user_a.secret)), 404)
