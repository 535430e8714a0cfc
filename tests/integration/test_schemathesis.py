"""A bounded schemathesis run against a live `gpujobs api` (issue 13, item 12).

Every check (`--checks all`) but one: no server error, answers that match the OpenAPI document
(status, content type, headers, schema), bad input refused (414 and 431, the request line's and headers'
limits, count as refusals too), auth not ignored. Left out:
``positive_data_acceptance`` (see below: the API refuses with 422 input that is schema-valid but
names nothing, as it should).
The API is a deployment of its own (no worker: the jobs it is sent stay queued and nobody runs
them), with `Prefer: wait` capped at 1 s so that waits do not eat the time budget. The run
authenticates with a throw-away admin key (``schemathesis_hooks.py``), so revoking it ends nothing.

Bounded: ``--max-time`` (``GPUJOBS_TEST_SCHEMATHESIS_SECONDS``, default 100 s, to keep CI short) and
``--max-examples`` per operation; a fixed seed makes a failure reproducible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.private_api import private_api

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("GPUJOBS_TEST_SCHEMATHESIS_SECONDS", "100"))
MAX_EXAMPLES = 25
SEED = 13


def _st() -> list[str]:
    script = shutil.which("st", path=str(Path(sys.executable).parent))
    assert script, "schemathesis is not installed (pip install -e '.[test]')"
    return [script]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Any) -> None:
    settings = {
        "GPUJOBS_MAX_WAIT_SECONDS": "1",
        # Image fields take URLs: a generated one is refused or fails fast, never held for the default 15 s.
        "GPUJOBS_INPUT_URL_TIMEOUT_SECONDS": "2",
        "GPUJOBS_S3_BUCKET": "gpujobs-schemathesis",
        # The fuzzer sends bad keys on purpose (the `ignored_auth` check), with the prefix of its own key:
        # the failed-authentication throttle (tested on its own) would answer 429 where 401 is checked.
        "GPUJOBS_AUTH_FAILURE_LIMIT": "0",
        "GPUJOBS_AUTH_FAILURE_PREFIX_LIMIT": "0",
    }
    with private_api(tmp_path, settings=settings, workers=1) as api:
        env = {
            **os.environ,
            "GPUJOBS_DATABASE_URL": api.database_url,
            "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        report = tmp_path / "report"
        # A query long enough to pass the request-line limit is refused with 414 (431 for headers), as it
        # should be: a refusal schemathesis does not count as one by default.
        config = tmp_path / "schemathesis.toml"
        config.write_text(
            "[checks.negative_data_rejection]\n"
            'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422", '
            '"428", "429", "431", "5xx"]\n'
        )
        command = [
            *_st(),
            "--config-file",
            str(config),
            "run",
            f"{api.base_url}/openapi.json",
            "--checks",
            "all",
            # Schema-valid but meaningless input is refused with a precise 422, rightly: a cursor this API
            # never issued, a file that does not decode as an image, a tenant id that names no tenant.
            # No schema can say so; every other check runs.
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-time",
            str(SECONDS),
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            # One worker: with two threads, hypothesis's lambda descriptions run ast.parse concurrently, and
            # CPython 3.11 can raise "SystemError: AST constructor recursion depth mismatch" there (cpython
            # gh-106905; seen once in CI): a crash of the fuzzer, not a finding about the API.
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--report",
            "junit",
            "--report-dir",
            str(report),
            "--output-truncate",
            "true",
        ]
        run = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 240, check=False
        )
        output = run.stdout + run.stderr
        print(output[-6000:])
        assert run.returncode == 0, f"schemathesis found problems (exit {run.returncode}):\n{output[-20000:]}"
        assert "No issues found" in output or "passed" in output.lower(), output[-3000:]
