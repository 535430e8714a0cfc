"""``python -m tests.integration.skewed_clock ARGS``: the ``gpujobs ARGS`` command, for a process whose wall
clock Debian's ``faketime`` shifts (``faketime -f -15s`` with ``FAKETIME_DONT_FAKE_MONOTONIC=1``).

libfaketime 0.9.10 (Debian's) mishandles ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`` when it leaves
the monotonic clock alone (wolfcw/libfaketime#426): Python 3.11's ``time.sleep`` then raises EINVAL. So here
``time.sleep`` waits on an event instead (a semaphore wait on the real monotonic clock, which libfaketime
does not touch). The wall clock (``time.time``, ``datetime.now``) stays shifted, which is what the tests
are about. The first line of output is the wall clock this process sees, so a test can check the shift.
"""

from __future__ import annotations

import sys
import threading
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(seconds)


def main() -> None:
    time.sleep = _sleep
    print(f"skewed_clock: wall clock {time.time():.3f}", flush=True)
    from gpujobs.cli import main as gpujobs

    gpujobs(args=sys.argv[1:], prog_name="gpujobs")


if __name__ == "__main__":
    main()
