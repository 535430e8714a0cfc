"""The sender threads of a webhooks worker process: attempts run here, not in Celery's worker slots.

A ``send_webhooks`` task (after a commit that recorded deliveries, a retry's countdown, the sweep)
only wakes the pump: ``kick`` claims due deliveries, fairly between endpoints, while a sender
thread is free, and hands each to one; it returns at once. When an attempt ends, its thread kicks
again, so an endpoint's waiting deliveries go as soon as one of its slots frees. A receiver that
takes 8 s holds one sender thread for 8 s and one of its endpoint's slots, never a Celery slot, and
never more than ``webhook_endpoint_concurrency`` threads: the others serve the other endpoints.

A process that dies mid-attempt loses nothing: the delivery's claim runs out and it is due again.
While the worker drains it claims nothing new.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from db.settings import get_settings
from worker.drain import DRAIN
from worker.webhooks import delivery

log = logging.getLogger(__name__)


class Pump:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # one claimer at a time in this process
        self._executor: ThreadPoolExecutor | None = None
        self._threads = 0
        self._busy = 0

    def kick(self) -> int:
        """Start an attempt on every free sender thread that a due delivery can take; returns how many started."""
        settings = get_settings()
        started = 0
        with self._lock:
            if self._executor is None:
                self._threads = settings.webhook_sender_threads
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="webhook-sender")
            while self._busy < self._threads and not DRAIN.active:
                try:
                    claimed = delivery.claim(settings)
                except Exception as exc:  # the database may be down: the sweep kicks again later
                    log.warning("could not claim a webhook delivery: %s", exc)
                    break
                if claimed is None:
                    break
                self._busy += 1
                self._executor.submit(self._send, claimed)
                started += 1
        return started

    @property
    def busy(self) -> int:
        return self._busy

    def _send(self, claimed: delivery.Claimed) -> None:
        try:
            delivery.send(claimed, get_settings())
        except Exception:  # its claim runs out and it is due again
            log.exception("webhook delivery %s: the attempt failed unexpectedly", claimed.delivery.id)
        finally:
            with self._lock:
                self._busy -= 1
        self.kick()


PUMP = Pump()
