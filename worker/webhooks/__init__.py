"""Webhook delivery (the ``webhooks`` queue, CPU workers): signing, the SSRF guard, sending, retries.

The deliveries themselves are rows written by the state machine (``db/webhooks.py``); this
package sends them. ``send_due(job_id)`` is what the ``send_webhooks`` task runs, ``sweep()``
what beat runs to find due retries and first tries whose message was lost.
"""

from worker.webhooks.delivery import send_due, sweep

__all__ = ["send_due", "sweep"]
