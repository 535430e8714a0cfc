"""The training set of a ``finetune`` job: a dataset zip checked member by member, then read.

A dataset zip holds images and, beside any of them, a caption: ``cats/01.png`` and
``cats/01.txt`` (UTF-8). Folders are allowed; macOS's ``__MACOSX/`` and ``.DS_Store`` entries are
skipped. Anything else is refused with a message naming the member: another kind of file, an
absolute or ``..`` path, a link, an encrypted member, a caption with no image, a member that
expands far beyond its compressed size (a zip bomb), more images or more bytes than configured,
an image Pillow cannot decode or one over the pixel limit.

The API runs ``read_dataset`` on upload (``purpose=dataset``), so a bad zip never becomes a file a
job can name; the worker runs it again when it trains. Nothing here imports torch.
"""

from __future__ import annotations

import io
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from db.settings import Settings

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CAPTION_SUFFIX = ".txt"
MAX_CAPTION_CHARS = 2000
MAX_RATIO = 200  # uncompressed / compressed size of a member: more is a zip bomb
SKIPPED = re.compile(r"(^|/)(__MACOSX/|\.DS_Store$)")


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message says which member and why."""


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...]


def dataset_limits(settings: Settings) -> Limits:
    return Limits(
        max_images=settings.finetune_max_images,
        max_bytes=settings.finetune_max_dataset_bytes,
        max_pixels=settings.max_image_pixels,
        formats=tuple(settings.image_formats),
    )


@dataclass(frozen=True)
class Sample:
    name: str
    image: bytes
    caption: str | None
    width: int
    height: int


def read_dataset(data: bytes, limits: Limits) -> list[Sample]:
    """Every image of the zip with its caption (if any), in name order; raises ``DatasetError``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DatasetError(f"the zip could not be read: {exc}") from None
    with archive:
        images, captions = _members(archive, limits)
        samples = []
        for stem, member in sorted(images.items()):
            image = _read(archive, member)
            width, height = check_image(member.filename, image, limits)
            caption_member = captions.pop(stem, None)
            caption = _caption(caption_member.filename, _read(archive, caption_member)) if caption_member else None
            samples.append(Sample(member.filename, image, caption, width, height))
    if captions:
        orphan = min(m.filename for m in captions.values())
        raise DatasetError(f"the caption {orphan!r} has no image of the same name beside it")
    return samples


def _members(archive: zipfile.ZipFile, limits: Limits) -> tuple[dict[str, zipfile.ZipInfo], dict[str, zipfile.ZipInfo]]:
    images: dict[str, zipfile.ZipInfo] = {}
    captions: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for member in archive.infolist():
        name = member.filename
        if name.startswith(("/", "\\")) or ".." in re.split(r"[\\/]", name) or re.match(r"^[A-Za-z]:", name):
            raise DatasetError(f"the zip entry {name!r} has an unsafe path")
        if member.is_dir() or SKIPPED.search(name):
            continue
        if stat.S_ISLNK(member.external_attr >> 16):
            raise DatasetError(f"the zip entry {name!r} is a link; a dataset holds plain files only")
        if member.flag_bits & 0x1:
            raise DatasetError(f"the zip entry {name!r} is encrypted")
        path = PurePosixPath(name.replace("\\", "/"))
        suffix, stem = path.suffix.lower(), str(path.with_suffix(""))
        if suffix in IMAGE_SUFFIXES:
            if stem in images:
                raise DatasetError(f"the zip has two images named {stem!r} ({images[stem].filename!r} and {name!r})")
            images[stem] = member
        elif suffix == CAPTION_SUFFIX:
            captions[stem] = member
        else:
            raise DatasetError(
                f"the zip entry {name!r} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a .txt caption"
            )
        if member.file_size > max(member.compress_size, 1) * MAX_RATIO:
            raise DatasetError(f"the zip entry {name!r} expands to far more than its size (a zip bomb?)")
        total += member.file_size
        if total > limits.max_bytes:
            raise DatasetError(f"the zip's files add up to more than the limit of {limits.max_bytes} bytes")
        if len(images) > limits.max_images:
            raise DatasetError(f"the zip has more than {limits.max_images} images, the most one fine-tune takes")
    if not images:
        raise DatasetError("the zip holds no images")
    return images, captions


def _read(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    """The member's bytes, never more than its header promised (a lying header is a bomb too)."""
    try:
        with archive.open(member) as handle:
            data = handle.read(member.file_size + 1)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise DatasetError(f"the zip entry {member.filename!r} could not be read: {exc}") from None
    if len(data) > member.file_size:
        raise DatasetError(f"the zip entry {member.filename!r} is larger than its header says")
    return data


def check_image(name: str, data: bytes, limits: Limits) -> tuple[int, int]:
    """Decode the image fully; its size, or ``DatasetError`` naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in limits.formats:
                    raise DatasetError(f"{name!r} is a {image.format} image; send one of {', '.join(limits.formats)}")
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise DatasetError(
                        f"{name!r} is {width}×{height} pixels, more than the limit of {limits.max_pixels}"
                    )
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetError(f"{name!r} has more pixels than the limit of {limits.max_pixels}") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{name!r} is not an image in a known format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{name!r} could not be decoded: {exc}") from None
    return width, height


def _caption(name: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise DatasetError(f"the caption {name!r} is not UTF-8 text") from None
    if "\x00" in text:
        raise DatasetError(f"the caption {name!r} is not text")
    if len(text) > MAX_CAPTION_CHARS:
        raise DatasetError(f"the caption {name!r} has {len(text)} characters; at most {MAX_CAPTION_CHARS} are read")
    return text
