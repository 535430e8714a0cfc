"""Where the CPU of a job goes: ``bench.queue_overhead --py-spy`` recordings, split into named parts.

Run from the repository root, on the directory that ``--py-spy`` wrote (``--profile-dir``)::

    . .venv/bin/activate && python -m bench.queue_overhead --py-spy .venv/bin/py-spy \\
        --profile-dir /tmp/prof --json qo.json [--submissions 600 --latency-samples 50 ...]
    python -m bench.profile_report /tmp/prof --json qo.json

Each recording is py-spy's collapsed stacks of one server (``c-gpujobs-api.txt``: the gpujobs API's
gunicorn master and workers during phase (c), sampled while a thread holds the GIL, so samples are CPU).
Every stack is given to the innermost frame that one of the server's parts names (the tables below: a
part matches ``function (path:line) <- caller``, so it can name a step by where it is called); a stack
no part names goes to the server's own machinery (gunicorn and Flask around the routes, with gevent's
hub for gpujobs and gthread for the hand-written app; Celery's consumer around the task). With ``--json`` (the benchmark's figures), each
part's share is also shown in milliseconds per job: the share times the process's measured CPU per job
in the same phase (psutil), so the parts of a server add up to its figure there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

Part = tuple[str, str]  # (name, regular expression matched against "function (path:line) <- caller's function")

# The parts of each server, most of them one route's or one task's steps.
GPUJOBS_API: list[Part] = [
    ("authentication: key lookup, per-key rate limit", r"^authenticate \(.*api/auth\.py"),
    ("request session: open, close", r"^(create_app\.<locals>\._open_session|create_app\.<locals>\._close_session) "),
    ("quota check", r"^admit \(.*api/quotas\.py"),
    ("job insert (files, job, event), commit", r"^insert_and_send \(.*api/jobs\.py"),
    ("dispatch pass after the submit", r"^dispatch_soon \("),
    ("wait for the end (Redis pub/sub)", r"^(_wait_for_finish \(|FinishListener\.)"),
    ("read of the finished job and artifacts", r"^_load \(.*api/jobs\.py"),
    ("answer: job JSON, presigned URLs", r"^job_answer \(.*api/jobs\.py"),
    ("route: body, validation, the rest", r"^create_job \(.*api/jobs\.py"),
    ("access log", r"^GunicornLogger\.access "),
]
GPUJOBS_WORKER: list[Part] = [
    ("claim (lease, event)", r"^claim \(.*db/transitions\.py"),
    ("fence before the store", r"^JobContext\._ensure_owner "),
    ("S3 put (with Content-MD5)", r"^Storage\.put \(.*db/storage\.py"),
    ("the job's own code", r"^run \(.*worker/jobs/"),
    ("success (job, artifact rows, events), commit", r"^_execute\.<locals>\.succeed "),
    ("dispatch pass after the end", r"^dispatch_soon \("),
    ("end of the job: the rest", r"^_finish \(.*worker/runner\.py"),
    ("lease renewals (control thread)", r"^(JobContext\._control|JobContext\.renew|_renew)"),
    ("runner: context, metrics, the rest", r"^_execute \(.*worker/runner\.py"),
]
HAND_API: list[Part] = [
    (
        "row insert, commit",
        r"^(Engine\.begin|Connection\.execute|values|insert|_GeneratorContextManager\.__(enter|exit)__) .* <- create_job$",
    ),
    ("Celery send (.delay)", r"^Task\.delay "),
    ("wait for the end (AsyncResult.get)", r"^AsyncResult\.get "),
    ("read of the row, answer", r"^(_row_json|jsonify) "),
    ("route: the rest", r"^create_job \(.*baseline_app\.py"),
]
HAND_WORKER: list[Part] = [
    ("S3 put", r"^ClientCreator\._create_api_method\.<locals>\._api_call "),
    ("row update, commit", r"^run_row \(.*baseline_app\.py"),
]
MACHINERY = {
    ("gpujobs", "api"): "HTTP server: gunicorn, gevent, Flask (outside the route)",
    ("gpujobs", "worker"): "Celery: consumer, protocol, task tracing",
    ("hand-written", "api"): "HTTP server: gunicorn, gthread, Flask (outside the route)",
    ("hand-written", "worker"): "Celery: consumer, protocol, task tracing",
}
PARTS = {
    ("gpujobs", "api"): GPUJOBS_API,
    ("gpujobs", "worker"): GPUJOBS_WORKER,
    ("hand-written", "api"): HAND_API,
    ("hand-written", "worker"): HAND_WORKER,
}
# The benchmark's process labels (``cpu_ms_per_op``) for each recording.
CPU_LABELS = {
    ("gpujobs", "api"): "gpujobs api",
    ("gpujobs", "worker"): "gpujobs worker",
    ("hand-written", "api"): "baseline api",
    ("hand-written", "worker"): "baseline worker",
}
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?):(?P<line>\d+)\)$")
SITE = re.compile(r"^.*/(site-packages|lib/python3\.\d+)/|^.*?/(?=(api|db|worker|bench|gpujobs)/)")


@dataclass
class Split:
    """One recording's samples by part (in the parts' order, the machinery last)."""

    system: str
    server: str
    samples: int
    parts: dict[str, int]


def frame_name(frame: str) -> str:
    """``function (path:line)`` with the path relative to the repository or site-packages."""
    match = FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({SITE.sub('', match['path'])}:{match['line']})"


def split(lines: list[str], parts: list[Part], machinery: str) -> tuple[int, dict[str, int]]:
    """Samples in all, and by part: each stack goes to the innermost frame a part names."""
    patterns = [(name, re.compile(pattern)) for name, pattern in parts]
    counts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        owner = machinery
        frames = stack.split(";")
        for depth in range(len(frames) - 1, -1, -1):
            caller = frames[depth - 1].split(" (", 1)[0] if depth else ""
            name = f"{frame_name(frames[depth])} <- {caller}"
            found = next((part for part, pattern in patterns if pattern.search(name)), None)
            if found is not None:
                owner = found
                break
        counts[owner] += samples
    ordered = {name: counts[name] for name, _ in parts if counts[name]}
    ordered[machinery] = counts[machinery]
    return total, ordered


def read(directory: Path, phase: str) -> list[Split]:
    """Every recording of ``phase`` in ``directory`` that this report knows how to split."""
    found = []
    for (system, server), parts in PARTS.items():
        path = directory / f"{phase}-{system}-{server}.txt"
        if path.exists():
            total, counts = split(path.read_text().splitlines(), parts, MACHINERY[system, server])
            found.append(Split(system, server, total, counts))
    return found


def report(splits: list[Split], figures: dict | None, phase: str) -> str:
    phase_figures = (figures or {}).get({"a": "throughput", "c": "load"}.get(phase, ""), {})
    out = []
    for item in splits:
        cpu = phase_figures.get(item.system, {}).get("cpu_ms_per_op", {}).get(CPU_LABELS[item.system, item.server])
        head = f"{item.system} {item.server}, phase ({phase}): {item.samples} samples"
        out.append(head + (f", {cpu:.2f} ms of CPU per job" if cpu is not None else ""))
        for name, samples in item.parts.items():
            share = samples / item.samples if item.samples else 0.0
            ms = f"{share * cpu:6.2f} ms" if cpu is not None else ""
            out.append(f"  {100 * share:5.1f} %  {ms}  {name}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the --profile-dir of a bench.queue_overhead --py-spy run")
    parser.add_argument("--json", type=Path, help="that run's --json figures: shares become ms per job")
    parser.add_argument("--phase", default="c", choices=["a", "c"], help="the phase's recordings (default c)")
    args = parser.parse_args(argv)
    splits = read(args.directory, args.phase)
    if not splits:
        print(f"no recordings of phase ({args.phase}) in {args.directory}", file=sys.stderr)
        return 1
    figures = json.loads(args.json.read_text()) if args.json else None
    print(report(splits, figures, args.phase))
    return 0


if __name__ == "__main__":
    sys.exit(main())
