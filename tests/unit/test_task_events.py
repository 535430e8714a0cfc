"""Task events sent from pool threads all reach the broker (worker.tasks.UnbufferedTaskEvents).

Celery 5.6's consumer buffers ``task-*`` events; a thread that appends one while the loop thread
flushes can lose it (celery/celery#10434), which left Flower showing finished jobs as RECEIVED. The
step turns the buffering off. Here a real ``EventDispatcher`` (kombu's in-memory transport), set up the
way the consumer's Events step sets it up, takes events from two threads while a third flushes, and
every event is read back from a queue bound to the events exchange.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from celery import Celery
from kombu import Connection, Exchange, Queue

from worker.tasks import UnbufferedTaskEvents

SENDERS, EACH = 2, 400


def _dispatcher_and_queue(app: Celery, connection: Connection):  # type: ignore[no-untyped-def]
    exchange = Exchange(app.conf.event_exchange, type="topic")
    queue = Queue("test-events", exchange=exchange, routing_key="#", channel=connection.default_channel)
    queue.declare()
    dispatcher = app.events.Dispatcher(
        connection,
        hostname="worker@test",
        groups=["worker", "task"],
        buffer_group=["task"],
        on_send_buffered=lambda: None,  # the consumer asks its loop to flush; here a thread flushes
    )
    return dispatcher, queue


def _published(queue: Queue) -> int:
    count = 0
    while (message := queue.get(no_ack=True)) is not None:
        body = message.decode()
        count += len(body) if isinstance(body, list) else 1  # a flushed buffer is one ``task.multi`` list
    return count


def _hammer(dispatcher) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()

    def flusher() -> None:
        while not done.is_set():
            dispatcher.flush()

    def sender(n: int) -> None:
        for i in range(EACH):
            dispatcher.send("task-succeeded", uuid=f"{n}-{i}", result="'succeeded'", runtime=0.0)

    flushing = threading.Thread(target=flusher)
    flushing.start()
    senders = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    done.set()
    flushing.join()
    dispatcher.flush()


def test_the_step_makes_every_task_event_from_any_thread_reach_the_broker() -> None:
    app = Celery("test", broker="memory://")
    with Connection("memory://") as connection:
        dispatcher, queue = _dispatcher_and_queue(app, connection)
        UnbufferedTaskEvents(SimpleNamespace()).start(SimpleNamespace(event_dispatcher=dispatcher))
        assert dispatcher.buffer_group == frozenset() and dispatcher.on_send_buffered is None
        _hammer(dispatcher)
        assert _published(queue) == SENDERS * EACH


def test_the_step_is_part_of_the_worker_app_and_tolerates_a_consumer_without_events() -> None:
    from db.settings import Settings
    from worker.tasks import worker_app

    app = worker_app(Settings())
    assert UnbufferedTaskEvents in app.steps["consumer"]
    UnbufferedTaskEvents(SimpleNamespace()).start(SimpleNamespace(event_dispatcher=None))  # events off: no-op
