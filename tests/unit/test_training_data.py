"""Dataset zips of ``finetune`` jobs (``training_data.py``), built in memory, checked member by member."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib

import pytest
from PIL import Image

# The one import of the module under test (it moves to worker/jobs/finetune/training_data.py).
from worker.jobs.finetune.training_data import MAX_RATIO, DatasetError, Limits, dataset_limits, read_dataset

LIMITS = Limits(max_images=10, max_bytes=10_000_000, max_pixels=1_000_000, formats=("PNG", "JPEG", "WEBP"))


def image(size: tuple[int, int] = (8, 6), fmt: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(
    members: dict[str, bytes | tuple[zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            if isinstance(data, tuple):
                info, payload = data
                archive.writestr(info, payload)
            elif name.endswith("/"):
                archive.writestr(zipfile.ZipInfo(name), b"")
            else:
                archive.writestr(name, data)
    return buffer.getvalue()


def patch_central_directory(data: bytes, name: str, **fields: int) -> bytes:
    """Rewrite fields of one member's central-directory header (what ``infolist`` reads)."""
    offsets = {"flag_bits": (8, "<H"), "crc": (16, "<I"), "file_size": (24, "<I")}
    data = bytearray(data)
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + name_length]).decode() == name:
            for field, value in fields.items():
                offset, fmt = offsets[field]
                struct.pack_into(fmt, data, at + offset, value)
            return bytes(data)
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{name} not in the zip")


def refused(data: bytes, limits: Limits = LIMITS) -> str:
    with pytest.raises(DatasetError) as error:
        read_dataset(data, limits)
    return str(error.value)


# --- what a dataset may hold ---------------------------------------------------------------------------


def test_images_with_and_without_captions_in_folders() -> None:
    cat = image((8, 6))
    data = make_zip(
        {
            "cats/": b"",
            "cats/02.png": image((4, 4)),
            "cats/01.png": cat,
            "cats/01.txt": "\ufeff  a photo of sks cat \n".encode(),  # BOM and spaces: stripped
            "dogs/a.JPG": image((5, 7), "JPEG"),
            "dogs/a.TXT": b"a dog",
            "top.webp": image((3, 3), "WEBP"),
            "__MACOSX/cats/._01.png": b"\x00\x05\x16\x07 resource fork",
            "cats/.DS_Store": b"\x00\x00\x00\x01Bud1",
        }
    )
    samples = read_dataset(data, LIMITS)
    assert [(s.name, s.caption, s.width, s.height) for s in samples] == [
        ("cats/01.png", "a photo of sks cat", 8, 6),
        ("cats/02.png", None, 4, 4),
        ("dogs/a.JPG", "a dog", 5, 7),
        ("top.webp", None, 3, 3),
    ]
    assert samples[0].image == cat


def test_backslash_folders_pair_captions_too() -> None:
    samples = read_dataset(make_zip({"cats\\01.png": image(), "cats\\01.txt": b"caption"}), LIMITS)
    assert [(s.name, s.caption) for s in samples] == [("cats\\01.png", "caption")]


def test_dataset_limits_come_from_the_settings() -> None:
    from db.settings import Settings

    limits = dataset_limits(
        Settings(finetune_max_images=5, finetune_max_dataset_bytes=2048, max_image_pixels=100, image_formats=["PNG"])
    )
    assert limits == Limits(max_images=5, max_bytes=2048, max_pixels=100, formats=("PNG",))


# --- what is refused ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"not a zip at all", make_zip({"a.png": image()})[:-30]])
def test_what_is_not_a_zip(data: bytes) -> None:
    assert refused(data).startswith("the zip could not be read: ")


@pytest.mark.parametrize(
    "members",
    [{}, {"empty/": b""}, {"__MACOSX/._a.png": b"x", ".DS_Store": b"x"}],
    ids=["empty", "only-folders", "only-skipped"],
)
def test_a_zip_without_images(members: dict) -> None:
    assert refused(make_zip(members)) == "the zip holds no images"


@pytest.mark.parametrize(
    "name",
    [
        "../evil.png",
        "cats/../../evil.png",
        "/etc/evil.png",
        "\\evil.png",
        "dir\\..\\evil.png",
        "C:/evil.png",
        "c:evil.png",
    ],
)
def test_unsafe_paths(name: str) -> None:
    assert refused(make_zip({"ok.png": image(), name: image()})) == f"the zip entry {name!r} has an unsafe path"


def test_a_name_with_dots_is_not_a_parent_reference() -> None:
    samples = read_dataset(make_zip({"..cat..png": image(), "v1.2/a..png": image()}), LIMITS)
    assert [s.name for s in samples] == ["..cat..png", "v1.2/a..png"]


def test_links() -> None:
    link = zipfile.ZipInfo("cats/01.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = make_zip({"cats/01.png": (link, b"/etc/passwd")})
    assert refused(data) == "the zip entry 'cats/01.png' is a link; a dataset holds plain files only"


def test_encrypted_members() -> None:
    data = patch_central_directory(make_zip({"a.png": image()}), "a.png", flag_bits=0x1)
    assert refused(data) == "the zip entry 'a.png' is encrypted"


@pytest.mark.parametrize("name", ["notes.md", "cats/01.jpe", "model.safetensors", "README"])
def test_other_kinds_of_files(name: str) -> None:
    assert refused(make_zip({"a.png": image(), name: b"data"})) == (
        f"the zip entry {name!r} is neither an image (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) "
        "nor a .txt caption"
    )


def test_two_images_with_one_name() -> None:
    data = make_zip({"cats/01.png": image(), "cats/01.jpg": image(fmt="JPEG")})
    assert refused(data) == "the zip has two images named 'cats/01' ('cats/01.png' and 'cats/01.jpg')"


def test_a_caption_without_its_image() -> None:
    data = make_zip({"cats/01.png": image(), "cats/01.txt": b"ok", "cats/02.txt": b"orphan", "b.txt": b"orphan"})
    assert refused(data) == "the caption 'b.txt' has no image of the same name beside it"


def test_a_zip_bomb_member() -> None:
    bomb = b"\x00" * 2_000_000  # deflates about 1000:1
    data = make_zip({"a.png": image(), "bomb.png": bomb})
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("bomb.png")
    assert info.file_size > info.compress_size * MAX_RATIO
    assert refused(data) == "the zip entry 'bomb.png' expands to far more than its size (a zip bomb?)"


def test_a_member_larger_than_its_header_says() -> None:
    payload = image((16, 16))
    head = payload[:10]
    data = patch_central_directory(make_zip({"a.png": payload}), "a.png", file_size=len(head), crc=zlib.crc32(head))
    # zipfile stops at the size the header gives: what comes out is the truncated image, refused as such.
    assert refused(data) == "'a.png' is not an image in a known format"
    data = patch_central_directory(make_zip({"a.png": payload}), "a.png", file_size=10)
    assert refused(data) == "the zip entry 'a.png' could not be read: Bad CRC-32 for file 'a.png'"


def test_more_images_than_allowed() -> None:
    limits = Limits(max_images=2, max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, formats=LIMITS.formats)
    assert len(read_dataset(make_zip({"1.png": image(), "2.png": image(), "1.txt": b"c"}), limits)) == 2
    data = make_zip({"1.png": image(), "2.png": image(), "3.png": image()})
    assert refused(data, limits) == "the zip has more than 2 images, the most one fine-tune takes"


def test_more_bytes_than_allowed() -> None:
    members = {"1.png": image(), "2.png": image(), "1.txt": b"x" * 50}
    total = sum(len(v) for v in members.values())
    exact = Limits(max_images=10, max_bytes=total, max_pixels=LIMITS.max_pixels, formats=LIMITS.formats)
    assert len(read_dataset(make_zip(members), exact)) == 2
    less = Limits(max_images=10, max_bytes=total - 1, max_pixels=LIMITS.max_pixels, formats=LIMITS.formats)
    assert refused(make_zip(members), less) == f"the zip's files add up to more than the limit of {total - 1} bytes"


# --- the images and captions themselves -------------------------------------------------------------------------


def test_an_image_that_is_not_one() -> None:
    assert refused(make_zip({"a.png": b"just text, not a PNG"})) == "'a.png' is not an image in a known format"


def test_a_truncated_image() -> None:
    message = refused(make_zip({"a.png": image((64, 64))[:-40]}))
    assert message.startswith("'a.png' could not be decoded: ")


def test_an_image_in_a_format_not_accepted() -> None:
    data = make_zip({"a.bmp": image(fmt="BMP")})
    assert refused(data) == "'a.bmp' is a BMP image; send one of PNG, JPEG, WEBP"


def test_an_image_over_the_pixel_limit() -> None:
    limits = Limits(max_images=10, max_bytes=LIMITS.max_bytes, max_pixels=99, formats=LIMITS.formats)
    assert len(read_dataset(make_zip({"a.png": image((11, 9))}), limits)) == 1
    assert refused(make_zip({"a.png": image((10, 10))}), limits) == "'a.png' is 10×10 pixels, more than the limit of 99"


def test_pillows_decompression_bomb_check_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that (the API sets it from the settings).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    for side in (8, 12):  # 64 pixels: Pillow's warning; 144: its error
        message = refused(make_zip({"a.png": image((side, side))}))
        assert message == f"'a.png' has more pixels than the limit of {LIMITS.max_pixels}"


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        (b"\xff\xfe c\x00a\x00t\x00", "the caption 'a.txt' is not UTF-8 text"),
        (b"a cat\x00\x00", "the caption 'a.txt' is not text"),
        (b"x" * 2001, "the caption 'a.txt' has 2001 characters; at most 2000 are read"),
    ],
)
def test_bad_captions(caption: bytes, message: str) -> None:
    assert refused(make_zip({"a.png": image(), "a.txt": caption})) == message


def test_a_caption_of_exactly_the_limit() -> None:
    samples = read_dataset(make_zip({"a.png": image(), "a.txt": "é".encode() * 2000}), LIMITS)
    assert samples[0].caption == "é" * 2000
