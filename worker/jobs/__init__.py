"""Job types: one package each (``spec.py``, ``run.py``, model code), listed in ``registry.py``.

The served list is the one ``GPUJOBS_JOB_REGISTRY`` names (the built-in ``registry.JOB_TYPES`` by
default); the model kinds the catalog accepts are those its job types declare. Importing this
package imports specs only (no torch): the API uses it to validate requests.
"""

from __future__ import annotations

from functools import lru_cache

from db.settings import Settings, get_settings
from worker.jobs.spec import JobType, ModelKind, resolve


def job_types(settings: Settings | None = None) -> dict[str, JobType]:
    """The served job types by name."""
    return _job_types((settings or get_settings()).job_registry)


def get_job_type(name: str, settings: Settings | None = None) -> JobType | None:
    return job_types(settings).get(name)


def model_kinds(settings: Settings | None = None) -> dict[str, ModelKind]:
    """The model kinds the served job types load, by name."""
    return _model_kinds((settings or get_settings()).job_registry)


@lru_cache(maxsize=4)
def _job_types(registry: str) -> dict[str, JobType]:
    listed = resolve(registry)
    types: dict[str, JobType] = {}
    for job_type in listed:
        if not isinstance(job_type, JobType):
            raise TypeError(f"{registry} lists {job_type!r}, which is not a JobType")
        if job_type.name in types:
            raise ValueError(f"{registry} lists the job type {job_type.name!r} twice")
        types[job_type.name] = job_type
    return types


@lru_cache(maxsize=4)
def _model_kinds(registry: str) -> dict[str, ModelKind]:
    kinds: dict[str, ModelKind] = {}
    for job_type in _job_types(registry).values():
        for kind in job_type.model_kinds:
            if kinds.setdefault(kind.name, kind) != kind:
                raise ValueError(f"{registry}: two different model kinds are named {kind.name!r}")
    return kinds
