"""The gpujobs Python SDK: ``from gpujobs.client import Client`` (docs/clients.md).

Needs only the base install (urllib3 for HTTP): no torch, Flask or database driver is imported, so a
script, a notebook or another service can use it with ``pip install gpujobs``.

    client = Client("http://127.0.0.1:8000", key)
    job = client.run("segmentation", image=open("street.png", "rb"), threshold=0.6)
    job.download("out/")
"""

from gpujobs.client.api import Client
from gpujobs.client.errors import (
    AuthenticationError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    DownloadError,
    GpujobsError,
    JobCanceled,
    JobFailed,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    ValidationError,
    WaitTimeout,
)
from gpujobs.client.models import Artifact, Event, Job, Page

__all__ = [
    "Artifact",
    "AuthenticationError",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DownloadError",
    "Event",
    "GpujobsError",
    "Job",
    "JobCanceled",
    "JobFailed",
    "NotFound",
    "Page",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "ValidationError",
    "WaitTimeout",
]
