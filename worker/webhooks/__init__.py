"""Webhook delivery (the ``webhooks`` queue, CPU workers): signing, the SSRF guard, sending, retries.

The deliveries themselves are rows written by the state machine (``db/webhooks.py``); this
package sends them. The ``send_webhooks`` task wakes ``PUMP`` (this process's sender threads),
which claims due deliveries fairly between endpoints; ``sweep()`` is what beat runs to find due
retries, first tries whose message was lost and breakers due for a probe.
"""

from worker.webhooks.delivery import sweep
from worker.webhooks.pump import PUMP

__all__ = ["PUMP", "sweep"]
