"""What the benchmarks share: figures (``stats``), CPU accounting (``cpu``), the HTTP clients (``client``),
closed-loop load (``load``) and what they print and write (``report``). Their deployment and runner are
``bench.deployment``."""
