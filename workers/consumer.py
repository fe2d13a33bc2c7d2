"""Celery's worker consumer, sending the task events it buffers a window at a time.

Celery buffers task events (task-received, task-started, task-succeeded, task-retried, ...)
and sends what it holds as one "task.multi" message, but it schedules that send for the
event loop's next turn after every event. The loop handles one message a turn, so a charge
cost an event publish of its own, two for a charge the gate parks (received and retried).
This consumer sends them EVENT_FLUSH_SECONDS after the first event of a window instead, or
at once when Celery's buffer is full (24 events), and sends what is left when it shuts
down. Flower sees an event at most that much later.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("workers.consumer")

# How long a task event may wait to be sent with others.
EVENT_FLUSH_SECONDS = 0.01


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, with task events sent a window at a time."""

    _events_due = False

    def on_send_event_buffered(self) -> None:
        """Send the buffered events within EVENT_FLUSH_SECONDS (Celery: the next turn)."""
        if self.hub is None or self._events_due:
            return
        self._events_due = True
        self.hub.call_later(EVENT_FLUSH_SECONDS, self._send_events_due)

    def _send_events_due(self) -> None:
        self._events_due = False
        self._flush_events()

    def connection_for_write(self, url: Any = None, heartbeat: Any = None) -> Any:
        """Return the task events' connection: without publisher confirms.

        Celery's consumer opens this connection for its event dispatcher only. On RabbitMQ
        the worker confirms what it publishes (confirm_publish), which made every event
        publish wait a broker round trip; an event is for display and Celery sends it
        without a retry anyway.
        """
        return self.ensure_connected(self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False},
        ))

    def shutdown(self) -> None:
        """Send the events still buffered, then shut down as Celery does."""
        try:
            self._flush_events()
        except Exception as exc:  # the broker is gone: lost, as Celery's own would be
            log.warning("Task events buffered at shutdown not sent (%s)", type(exc).__name__)
        super().shutdown()
