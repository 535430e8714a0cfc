"""The ``gpujobs`` client commands: submit, jobs get|list|cancel|retry, download, events, login (docs/clients.md).

They talk to a running service over HTTP through the SDK (``gpujobs.client``), configured by
``GPUJOBS_URL`` and ``GPUJOBS_KEY`` or else by the profile ``gpujobs login`` writes. Exit codes are for
scripts: 0 the job succeeded (or the command did what it says), 1 the job failed or was canceled, --timeout
passed, or the service could not be reached or failed (5xx), 2 bad input (a usage error, or a 4xx from the service), 130
interrupted (Ctrl-C: a job being followed goes on; the message says how to cancel it).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from gpujobs.client import Client, GpujobsError, Job, JobFailed

P = ParamSpec("P")
R = TypeVar("R")
MODES = ("auto", "bar", "plain", "none")  # --progress (gpujobs/client_display.py draws them; rich loads on use)
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
PROFILE_NAME = "profile.json"


# --- inputs ----------------------------------------------------------------------------------------


def parse_value(raw: str) -> Any:
    """A ``key=value`` value: ``@path`` is a file to upload (a ``Path``), ``@@text`` the string ``@text``;
    JSON-looking values (objects, arrays, quoted strings, numbers, ``true``/``false``/``null``) are parsed as
    JSON; anything else is a string (ids, URLs, data URIs, prompts)."""
    if raw.startswith("@@"):
        return raw[1:]
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        if not raw[1:]:
            raise ValueError("@ must be followed by a file path")
        if not path.is_file():
            raise ValueError(f"{raw[1:]}: no such file")
        return path
    text = raw.strip()
    if text[:1] in ("{", "[", '"'):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{raw!r} looks like JSON but does not parse: {exc}") from exc
    if text in ("true", "false", "null") or re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text):
        return json.loads(text)
    return raw


def parse_inputs(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments as a job input; ``ValueError`` naming the argument that is wrong."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"{pair!r}: give each input as key=value (files as key=@path)")
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"{pair!r}: {key!r} is not an input name (letters, digits and _)")
        if key in inputs:
            raise ValueError(f"{key!r} is given twice")
        try:
            inputs[key] = parse_value(raw)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from exc
    return inputs


# --- configuration ---------------------------------------------------------------------------------


def profile_path() -> Path:
    """The profile ``gpujobs login`` writes: ``$XDG_CONFIG_HOME/gpujobs/profile.json`` (``~/.config/…``)."""
    return Path(click.get_app_dir("gpujobs")) / PROFILE_NAME


def read_profile() -> dict[str, str]:
    path = profile_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"cannot read the profile {path}: {exc}; run `gpujobs login` again") from exc
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def connect() -> Client:
    """The client: ``GPUJOBS_URL``/``GPUJOBS_KEY`` where set, else the profile's."""
    profile = read_profile()
    url = os.environ.get("GPUJOBS_URL") or profile.get("url")
    key = os.environ.get("GPUJOBS_KEY") or profile.get("key")
    if not url or not key:
        raise click.UsageError("no service configured: run `gpujobs login`, or set GPUJOBS_URL and GPUJOBS_KEY")
    try:
        return Client(url, key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


# --- errors and exit codes ---------------------------------------------------------------------------


def explain(error: GpujobsError) -> str:
    """The problem's status, title and detail, then each bad field the detail does not already name."""
    lines = [f"error: {error}"]
    for item in error.problem.get("errors") or []:
        if isinstance(item, dict):
            field = f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}"
            if field not in lines[0]:
                lines.append(f"  {field}")
    return "\n".join(lines)


def handled(command: Callable[P, R]) -> Callable[P, R]:
    """Map what a command raises to a message on stderr and the documented exit code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            following = _following[-1] if _following else None
            note = f": job {following} goes on (gpujobs jobs cancel {following})" if following else ""
            click.echo(f"\ninterrupted{note}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except JobFailed as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        except GpujobsError as exc:
            click.echo(explain(exc), err=True)
            bad_input = exc.status is not None and 400 <= exc.status < 500
            sys.exit(EXIT_BAD_INPUT if bad_input else EXIT_FAILED)

    return run


_following: list[str] = []  # the job a command is following, for the Ctrl-C message


def emit(data: Any, as_json: bool) -> None:
    click.echo(json.dumps(data, indent=None if as_json else 2))


def follow(client: Client, job: Job, *, mode: str, timeout: float | None, as_json: bool, out: Path | None) -> None:
    """Follow ``job`` to its end with the chosen display, print the result, download it, exit by its status."""
    from gpujobs.client_display import Display

    _following.append(job.id)
    with Display(job.id, mode) as display:
        job = client.wait(job.id, timeout=timeout, progress=display)
    _following.pop()
    if as_json:
        emit(job.raw, True)
    elif job.succeeded:
        emit(job.output, False)
    if job.succeeded and out is not None:
        for path in client.download(job, out):
            click.echo(f"wrote {path}", err=True)
    job.raise_for_status()
    seconds = (job.raw.get("metrics") or {}).get("run_seconds")
    click.echo(f"{job.id} succeeded{f' in {seconds:.1f} s' if seconds is not None else ''}", err=True)


# --- commands ----------------------------------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print the JSON the service answered (for scripts).")
progress_option = click.option(
    "--progress",
    type=click.Choice(MODES),
    default="auto",
    show_default=True,
    help="How --wait shows the job: a live bar, plain lines on stderr, or nothing (auto: a bar on a terminal).",
)
timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), help="With --wait: give up after SECONDS."
)
output_option = click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --wait: download the artifacts into DIR.",
)


@click.command()
@click.argument("job_type")
@click.argument("inputs", nargs=-1)
@click.option("--wait", is_flag=True, help="Follow the job to its end (live progress) and print its output.")
@click.option("--priority", type=click.IntRange(0, 9), help="0 (lowest) to 9; default 5.")
@click.option("--metadata", help="A JSON object stored with the job and returned as is.")
@progress_option
@timeout_option
@output_option
@json_option
@handled
def submit(
    job_type: str,
    inputs: tuple[str, ...],
    wait: bool,
    priority: int | None,
    metadata: str | None,
    progress: str,
    timeout: float | None,
    output_dir: Path | None,
    as_json: bool,
) -> None:
    """Submit a job of JOB_TYPE with inputs as key=value (a file to upload as key=@path).

    \b
    Values: @path uploads the file and passes its id; JSON-looking values (numbers, true/false/null,
    [lists], {objects}, "quoted strings") are parsed as JSON; anything else is a string (a file id,
    an https:// URL, a data: URI, a prompt). Without --wait it prints the job id.

    \b
      gpujobs submit segmentation image=@street.png threshold=0.6 --wait -o out/
      gpujobs submit text_to_image prompt="a lighthouse at dusk" seed=7 --wait

    \b
    Exit: 0 succeeded, 1 failed or canceled, 2 bad input, 130 interrupted.
    """
    try:
        params = parse_inputs(inputs)
        meta = json.loads(metadata) if metadata is not None else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if meta is not None and not isinstance(meta, dict):
        raise click.UsageError("--metadata must be a JSON object")
    if output_dir is not None and not wait:
        raise click.UsageError("-o/--output-dir needs --wait (or run `gpujobs download JOB -o DIR` later)")
    client = connect()
    job = client.submit(job_type, params, metadata=meta, priority=priority)
    if not wait:
        if as_json:
            emit(job.raw, True)
        else:
            click.echo(job.id)
        return
    follow(client, job, mode=progress, timeout=timeout, as_json=as_json, out=output_dir)


@click.group()
def jobs() -> None:
    """Read, list, cancel and retry jobs on the service (GPUJOBS_URL / `gpujobs login`)."""


@jobs.command("get")
@click.argument("job_id")
@handled
def jobs_get(job_id: str) -> None:
    """Print the job JOB_ID as JSON."""
    emit(connect().get(job_id).raw, False)


@jobs.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "canceled"]))
@click.option("--type", "job_type", help="Only jobs of this type.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--cursor", help="The next_cursor of the previous page.")
@json_option
@handled
def jobs_list(status: str | None, job_type: str | None, limit: int, cursor: str | None, as_json: bool) -> None:
    """List jobs, newest first: id, type, status, progress, created."""
    page = connect().list(status=status, type=job_type, limit=limit, cursor=cursor)
    if as_json:
        emit({"items": [job.raw for job in page.items], "next_cursor": page.next_cursor}, True)
        return
    click.echo(f"{'ID':<28}{'TYPE':<16}{'STATUS':<11}{'PROGRESS':<10}CREATED")
    for job in page.items:
        step, total = job.progress.get("step"), job.progress.get("total")
        done = f"{step}/{total}" if total else "-"
        click.echo(f"{job.id:<28}{job.type:<16}{job.status:<11}{done:<10}{job.created_at or ''}")
    if page.next_cursor:
        click.echo(f"more: --cursor {page.next_cursor}", err=True)


@jobs.command("cancel")
@click.argument("job_id")
@json_option
@handled
def jobs_cancel(job_id: str, as_json: bool) -> None:
    """Cancel JOB_ID: a queued job at once, a running one at its next step (a finished one: exit 2)."""
    job = connect().cancel(job_id)
    if as_json:
        emit(job.raw, True)
    else:
        requested = " (cancel requested)" if job.status == "running" else ""
        click.echo(f"{job.id} {job.status}{requested}")


@jobs.command("retry")
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Follow the new job to its end.")
@progress_option
@timeout_option
@output_option
@json_option
@handled
def jobs_retry(
    job_id: str, wait: bool, progress: str, timeout: float | None, output_dir: Path | None, as_json: bool
) -> None:
    """Run a failed or canceled job's input again as a new job; prints the new job's id."""
    client = connect()
    job = client.retry(job_id)
    if not wait:
        if as_json:
            emit(job.raw, True)
        else:
            click.echo(job.id)
        return
    follow(client, job, mode=progress, timeout=timeout, as_json=as_json, out=output_dir)


@click.command()
@click.argument("job_id")
@click.option(
    "-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True
)
@handled
def download(job_id: str, output_dir: Path) -> None:
    """Download a succeeded job's artifacts into DIR, each checked against its sha256; prints the paths."""
    for path in connect().download(job_id, output_dir):
        click.echo(str(path))


@click.command()
@click.argument("job_id")
@click.option("--last-event-id", type=click.IntRange(min=0), help="Start after this event (as `id` printed it).")
@json_option
@handled
def events(job_id: str, last_event_id: int | None, as_json: bool) -> None:
    """Print a job's events as they happen, one a line, until it finishes (`id event details`)."""
    _following.append(job_id)
    for event in connect().events(job_id, last_event_id=last_event_id):
        if as_json:
            click.echo(json.dumps({"id": event.id, "event": event.event, "data": event.data}))
        else:
            from gpujobs.client_display import describe

            click.echo(f"{event.id if event.id is not None else '-':>6} {describe(event)}")


@click.command()
@click.option("--url", prompt="Service URL", default="http://127.0.0.1:8000", show_default=True)
@click.option("--key", prompt="API key", hide_input=True)
@handled
def login(url: str, key: str) -> None:
    """Check a service URL and API key, then save them (mode 0600) for the client commands.

    GPUJOBS_URL and GPUJOBS_KEY, when set, take precedence over the saved profile."""
    try:
        client = Client(url, key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    client.list(limit=1)  # a wrong key is a 401 now, not at the first job
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older profile may have been made with other permissions
    with os.fdopen(descriptor, "w") as out:
        json.dump({"url": client.url, "key": key}, out)
    click.echo(f"logged in to {client.url}; profile saved in {path}")


def register(group: click.Group) -> None:
    """Add the client commands to the ``gpujobs`` group."""
    for command in (submit, jobs, download, events, login):
        group.add_command(command)
