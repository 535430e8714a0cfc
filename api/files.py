"""/v1/files: upload job inputs (images, dataset zips), read them back."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

from flask import Blueprint, Response, g, jsonify, redirect, request
from PIL import Image, UnidentifiedImageError
from sqlalchemy import select
from werkzeug.wrappers import Response as WerkzeugResponse

from api import config
from api.auth import current_key, is_admin
from api.errors import ApiError, validation_error
from api.openapi import document
from api.presenters import file_json
from db.models import File, new_id
from db.storage import StorageError
from worker.jobs.finetune.training_data import DatasetError, dataset_limits, read_dataset

log = logging.getLogger(__name__)

bp = Blueprint("files", __name__, url_prefix="/v1/files")

PURPOSES = ("input", "dataset")
UPLOAD_ATTEMPTS = 2  # tries of the S3 PUT within one upload request


@dataclass(frozen=True)
class CheckedImage:
    content_type: str
    width: int
    height: int


def check_image(data: bytes, loc: Sequence[str | int] = ("body", "file")) -> CheckedImage:
    """Decode the image fully; refuse unknown formats, undecodable data and decompression bombs (422 at ``loc``).

    Uploads and the images of input URLs and data URIs (``api.remote_inputs``) go through this one check."""
    settings = config.settings()
    loc = list(loc)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or "unknown"
                if fmt not in settings.image_formats:
                    raise validation_error(
                        loc, f"{fmt} images are not accepted; send one of {', '.join(settings.image_formats)}"
                    )
                width, height = image.size
                if width * height > settings.max_image_pixels:
                    raise _too_many_pixels(width, height, loc)
                image.load()
                content_type = Image.MIME.get(fmt, "application/octet-stream")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise validation_error(
            loc, f"the image has more pixels than the limit of {settings.max_image_pixels} (a decompression bomb?)"
        ) from None
    except UnidentifiedImageError:
        raise validation_error(loc, "is not an image in a known format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise validation_error(loc, f"the image could not be decoded: {exc}") from None
    return CheckedImage(content_type=content_type, width=width, height=height)


def _too_many_pixels(width: int, height: int, loc: list[str | int]) -> ApiError:
    limit = config.settings().max_image_pixels
    return validation_error(
        loc, f"the image is {width}×{height} = {width * height} pixels, more than the limit of {limit}"
    )


def check_dataset(data: bytes, loc: Sequence[str | int] = ("body", "file")) -> None:
    """A dataset zip is read whole as a fine-tune would read it: a bad member is a 422 naming it (at ``loc``)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise validation_error(list(loc), "a dataset must be a .zip file")
    try:
        read_dataset(data, dataset_limits(config.settings()))
    except DatasetError as exc:
        raise validation_error(list(loc), str(exc)) from None


def _safe_filename(name: str | None) -> str:
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    base = re.sub(r"[\x00-\x1f\x7f\"]", "", base)
    return base[:255] or "upload"


@bp.post("")
@document(
    "Upload a file (an input image, or a zip dataset)",
    form={
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "purpose": {"type": "string", "enum": list(PURPOSES), "default": "input"},
        },
    },
    responses={201: "File"},
)
def upload() -> tuple[Response, int, dict[str, str]]:
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise ApiError(415, "Upload with `Content-Type: multipart/form-data` and the file in the `file` field.")
    purpose = request.form.get("purpose", "input")
    if purpose not in PURPOSES:
        raise validation_error(["body", "purpose"], f"must be one of {', '.join(PURPOSES)}")
    upload = request.files.get("file")
    if upload is None:
        raise validation_error(["body", "file"], "is required (a multipart field named `file`)")
    data = upload.read()
    if not data:
        raise validation_error(["body", "file"], "is empty")
    row = save_file(data, upload.filename, purpose)
    return jsonify(file_json(row)), 201, {"Location": f"/v1/files/{row.id}"}


def save_file(data: bytes, filename: str | None, purpose: str, loc: Sequence[str | int] = ("body", "file")) -> File:
    """Check an upload as its purpose needs (422 naming ``loc``), store it and record it as the caller's.

    The Replicate-compatible ``POST /replicate/v1/files`` (``api.replicate``) stores through it too."""
    width = height = None
    if purpose == "input":
        image = check_image(data, loc)
        content_type, width, height = image.content_type, image.width, image.height
    else:
        check_dataset(data, loc)
        content_type = "application/zip"
    row = store(data, purpose, filename, content_type, width, height)
    g.db.commit()
    return row


def store(
    data: bytes, purpose: str, filename: str | None, content_type: str, width: int | None, height: int | None
) -> File:
    """Put checked bytes in S3 and add their ``File`` row of the caller's tenant to the session (uncommitted).

    The caller commits: an upload at once, a submit together with its job (``api.remote_inputs``)."""
    file_id = new_id("file")
    storage_key = f"inputs/{file_id}"
    try:
        config.storage().put(storage_key, data, content_type, attempts=UPLOAD_ATTEMPTS)
    except StorageError as exc:
        log.error("upload of %s failed: %s", file_id, exc)
        raise ApiError(503, "Storage is unavailable; the file was not saved. Try again.") from None
    row = File(
        id=file_id,
        tenant_id=current_key().tenant_id,
        purpose=purpose,
        filename=_safe_filename(filename),
        content_type=content_type,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        storage_key=storage_key,
    )
    g.db.add(row)
    return row


def load_file(file_id: str) -> File:
    query = select(File).where(File.id == file_id)
    if not is_admin():
        query = query.where(File.tenant_id == current_key().tenant_id)
    file: File | None = g.db.scalars(query).one_or_none()
    if file is None:
        raise ApiError(404, f"No file {file_id!r}.")
    return file


@bp.get("/<file_id>")
@document("Get a file's description", responses={200: "File"})
def get_file(file_id: str) -> Response:
    return jsonify(file_json(load_file(file_id)))


@bp.get("/<file_id>/content")
@document("Download a file (a redirect to a presigned URL)", responses={302: "object"})
def get_content(file_id: str) -> WerkzeugResponse:
    file = load_file(file_id)
    return redirect(config.storage().presigned_url(file.storage_key), code=302)
