"""``python -m gpujobs`` is the ``gpujobs`` command (the harness runs it so where no console script is installed)."""

from gpujobs.cli import main

main()
