"""The Celery app: `celery -A workers worker` finds it here (module workers.celery, name app)."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from celery import Celery, bootsteps, signals
from celery.utils.serialization import jsonify, strtobool
from celery.worker.control import inspect_command
from kombu.entity import Exchange, Queue

from breaker.connection import safe_url
from workers import redaction
from workers.config import Settings, SettingsError, read_settings, redis_broker
from workers.parking import Releaser
from workers.runtime import flush_runtimes, forget, runtime

PUBLISHER_QUEUE = "breaker"
# Countdown tasks a worker holds at once unless worker_eta_task_limit says otherwise:
# about 20 KB each (a held message, its request, its timer entry).
ETA_TASK_LIMIT = 1000
# Celery's worker consumer, and ours in its place unless another is configured.
CELERY_CONSUMER = "celery.worker.consumer:Consumer"
CONSUMER = "workers.consumer:Consumer"
# The broker when neither CELERY_BROKER_URL nor a config module names one.
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


def create_app(main: str = "workers", **conf: Any) -> Celery:
    """Return a configured app; conf keys are Celery settings, validated with our own."""
    app = Celery(main, set_as_current=False)
    app.conf.update(conf)
    configure(app)
    app.steps["worker"].add(ReleaseParkedCharges)
    return app


class ReleaseParkedCharges(bootsteps.StartStopStep):  # type: ignore[misc]
    """Every worker sends parked charges again as their breakers let them through."""

    # After the pool: a prefork pool forks its processes before this thread exists.
    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.releaser: Releaser | None = None

    def start(self, worker: Any) -> None:
        app = worker.app

        def state_of(name: str) -> tuple[Any, int]:
            breaker = runtime(app).registry.get(name)
            return breaker.state, breaker.config.half_open_max_calls

        self.releaser = Releaser(
            lambda: runtime(app).parking, state_of,
            lambda message: app.signature(message).apply_async(),
            interval=runtime(app).settings.payment_release_interval,
            refusing=lambda names: setattr(runtime(app), "refusing", names),
        )
        self.releaser.start()

    def stop(self, worker: Any) -> None:
        if self.releaser is not None:
            self.releaser.stop()
            self.releaser = None

    # A cold shutdown (and an embedded test worker's end) terminates instead of stopping.
    terminate = stop


def configure(app: Celery) -> Settings:
    """Read and validate the settings into app.conf, and derive the Celery settings they imply.

    The broker and the result backend come from CELERY_BROKER_URL / CELERY_RESULT_BACKEND,
    else from app.conf (a config module named by CELERY_CONFIG_MODULE included), else the
    local Redis; results default to the broker when it is Redis, so the web tier's
    result.get() has an answer. Raises SettingsError naming the bad setting. Call again
    after changing app.conf.
    """
    if not app.conf.broker_url:
        app.conf.broker_url = DEFAULT_BROKER_URL
    _default_results(app)
    settings = read_settings(app.conf)
    for name, value in vars(settings).items():
        app.conf[name] = value
    broker_url = app.conf.broker_url or ""
    transport_options = dict(app.conf.broker_transport_options or {})
    if redis_broker(broker_url):
        vt = settings.visibility_timeout
        transport_options.setdefault("visibility_timeout", vt)
        # Sweep for charges of a worker that died often enough to bring them back in time.
        transport_options.setdefault("unacked_restore_interval", max(1, min(10, int(vt / 4))))
        transport_options.setdefault("unacked_restore_throttle", 1)
        if not app.conf.broker_transport:
            # kombu's own, but keeping every message when the broker is at maxmemory.
            sentinel = str(broker_url if isinstance(broker_url, str) else broker_url[0])
            app.conf.broker_transport = (
                "workers.broker:SentinelTransport"
                if sentinel.startswith("sentinel")
                else "workers.broker:Transport"
            )
    app.conf.update(
        broker_transport_options=transport_options,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_send_task_events=True,
        task_track_started=True,
        # Task events sent a few milliseconds' worth at a time (workers.consumer).
        worker_consumer=(
            CONSUMER if app.conf.worker_consumer == CELERY_CONSUMER else app.conf.worker_consumer
        ),
        broker_connection_retry_on_startup=True,
        # Countdown tasks (backoff retries, busy orders) held by a worker at once: each also
        # holds a prefetch slot, so beyond this many the rest wait in the queue, where the
        # visibility timeout does not run. Charges refused by their breaker are parked,
        # not held (workers.parking).
        worker_eta_task_limit=app.conf.worker_eta_task_limit or ETA_TASK_LIMIT,
        beat_schedule={
            "breaker.publish_state": {
                "task": "breaker.publish_state",
                "schedule": settings.breaker_publish_interval,
                "options": {"expires": settings.breaker_publish_interval},
            }
        },
    )
    quorum = not redis_broker(broker_url) and app.conf.task_default_queue_type == "quorum"
    if quorum:
        # RabbitMQ quorum queues: countdown tasks then wait in the broker (Celery's native
        # delayed delivery), not in the worker; publishes are confirmed.
        transport_options.setdefault("confirm_publish", True)
    if not app.conf.task_queues:
        # The publisher has a queue of its own, so it is not stuck behind a backlog of
        # charges at the very moment the breaker state matters most.
        arguments = {"x-queue-type": "quorum"} if quorum else None
        # Native delayed delivery routes through topic exchanges; a direct one leaves the
        # countdown to the worker, holding the message until it is due.
        exchange = Exchange(app.conf.task_default_exchange or app.conf.task_default_queue,
                            type="topic") if quorum else None
        default = app.conf.task_default_queue
        app.conf.task_queues = [
            Queue(default, exchange, routing_key=default, queue_arguments=arguments),
            Queue(PUBLISHER_QUEUE, exchange, routing_key=PUBLISHER_QUEUE,
                  queue_arguments=arguments),
        ]
        if quorum:
            app.conf.task_default_exchange_type = "topic"
        app.conf.task_routes = {"breaker.publish_state": {"queue": PUBLISHER_QUEUE}}
    app.conf.setdefault("imports", [])
    if "workers.tasks" not in app.conf.imports:
        app.conf.imports = [*app.conf.imports, "workers.tasks"]
    forget(app)
    return settings


def _default_results(app: Celery) -> None:
    """Store results in the broker's Redis unless told otherwise; carry Sentinel's master."""
    broker_url = app.conf.broker_url
    if not app.conf.result_backend and redis_broker(broker_url):
        first = broker_url[0] if isinstance(broker_url, list | tuple) else str(broker_url)
        if not first.startswith("sentinel://"):
            first = first.split(";")[0]
        app.conf.result_backend = first.replace("redis+socket://", "socket://", 1)
    backend = str(app.conf.result_backend or "")
    if backend.startswith("sentinel://"):
        options = dict(app.conf.result_backend_transport_options or {})
        master = (app.conf.broker_transport_options or {}).get("master_name")
        if master and "master_name" not in options:
            options["master_name"] = master
            app.conf.result_backend_transport_options = options


# user:password@ in any URL, also in ';'-separated lists (sentinel://...;sentinel://...).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s;]*):[^@/\s;]+@")


def mask_url_passwords(value: Any) -> Any:
    """Return value with the password of every URL in it masked, through dicts and lists."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>:********@", value)
    if isinstance(value, dict):
        return {k: mask_url_passwords(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_url_passwords(v) for v in value)
    return value


@inspect_command(
    alias="dump_conf",
    signature="[include_defaults=False]",
    args=[("with_defaults", strtobool)],
)
def conf(state: Any, with_defaults: bool = False, **kwargs: Any) -> Any:
    """List configuration, as Celery's own `conf`, with every URL password masked.

    Celery masks the settings it knows (broker_url, result_backend, *password*); a URL
    under another name, such as breaker_redis_url, would show its password in Flower.
    """
    table = state.app.conf.table(with_defaults=with_defaults)
    return jsonify(
        mask_url_passwords(table),
        keyfilter=lambda key: isinstance(key, str) and not key.startswith("__"),
        unknown_type_filter=repr,
    )


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _flush_breaker_counts(**_: Any) -> None:
    """Send the successes this process batched (at most a second's) before it exits."""
    flush_runtimes()


@signals.celeryd_after_setup.connect
def _banner_shows_the_breakers(sender: str, instance: Any, conf: Any, **_: Any) -> None:
    """Add where the breakers and the order book live to the worker's banner."""
    startup_info = instance.startup_info

    def with_breakers(artlines: bool = True) -> str:
        lines = str(startup_info(artlines)).split("\n")
        for i, line in enumerate(lines):
            if ".> results:" in line:
                art = line[: line.index(".> results:")]
                where = f"{safe_url(conf.breaker_redis_url)} (and the order book)"
                lines.insert(i + 1, f"{art}.> breakers:    {where}")
                break
        return "\n".join(lines)

    instance.startup_info = with_breakers


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_logs(logger: logging.Logger, **_: Any) -> None:
    """Mask tokens, keys and secrets in every line the worker logs, Celery's own included."""
    redaction.install(logger, secrets=[os.environ.get("PAYMENT_PROVIDER_API_KEY", "")])


# `celery -A workers flower` listens on 127.0.0.1 unless told otherwise (Flower's own default
# is every interface); FLOWER_ADDRESS or --address still choose.
os.environ.setdefault("FLOWER_ADDRESS", "127.0.0.1")

try:
    app = create_app()
except SettingsError as exc:
    # A worker, beat or CLI started with a bad setting stops here, saying which one.
    raise SystemExit(f"payment-breaker: bad setting: {exc}") from None
