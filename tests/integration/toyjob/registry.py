"""The served job types: the built-in ones and the toy one (``GPUJOBS_JOB_REGISTRY`` names this list)."""

from tests.integration.toyjob import spec as invert
from worker.jobs.registry import JOB_TYPES as BUILT_IN

JOB_TYPES = [*BUILT_IN, invert.JOB_TYPE]
