"""``python -m gpujobs`` is the ``gpujobs`` command (the supervisor starts its children this way)."""

from gpujobs.cli import main

main()
