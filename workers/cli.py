"""`celery -A workers breaker ...`: show, reset and open the circuit breakers, serve metrics.

A Celery subcommand registered through the `celery.commands` entry point, as Flower is;
it reads the app from Celery's click context and builds breakers through the app's
runtime, so per-breaker overrides apply exactly as they do in the workers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from celery.bin.base import CeleryCommand

from breaker import CircuitBreaker
from breaker.connection import safe_url
from workers.exporter import DEFAULT_HOST, DEFAULT_PORT, ExporterServer
from workers.publication import STORE_ERRORS, StoreUnavailable, one_line, read_state
from workers.runtime import Runtime, runtime

# sysexits.h EX_UNAVAILABLE: a service the command needs cannot be reached.
EX_UNAVAILABLE = 69

COLUMNS = (
    ("NAME", "<"), ("STATE", "<"), ("RETRY_AFTER", ">"), ("OPEN_FOR", ">"), ("CAUSE", "<"),
    ("FAILURE_COUNT", ">"),
    ("SUCCESS_COUNT", ">"), ("CALLS", ">"), ("FAILURES", ">"), ("REJECTED", ">"),
    ("CLOSED_S", ">"), ("OPEN_S", ">"), ("HALF_OPEN_S", ">"),
)


class StoreUnavailableExit(click.ClickException):
    """The breaker store cannot be reached: one line on stderr, exit status 69."""

    exit_code = EX_UNAVAILABLE


@click.group()
@click.pass_context
def breaker(ctx: click.Context) -> None:
    """Show, reset or open the payment circuit breakers, or serve their metrics."""
    if ctx.obj is None or getattr(ctx.obj, "app", None) is None:
        raise click.UsageError("run it as a Celery subcommand: celery -A workers breaker ...")


@breaker.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True,
              help="Print the JSON the beat publisher sends, for scripts.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show every breaker known to the store: state, counts and time in each state."""
    rt = runtime(ctx.obj.app)
    try:
        with _store_warnings_silenced():
            state = read_state(rt.registry)
    except StoreUnavailable as exc:
        raise _unavailable(rt, exc) from None
    if as_json:
        click.echo(json.dumps(state))
        return
    conf = ctx.obj.app.conf
    click.echo(
        f"Breakers and order book: {safe_url(rt.settings.breaker_redis_url)}\n"
        f"Broker: {safe_url(str(conf.broker_url))}\n"
        f"Results: {safe_url(str(conf.result_backend or 'disabled'))}\n"
    )
    if state["breakers"]:
        click.echo(format_table(state["breakers"]))
    else:
        click.echo(f"No breaker has been used on {safe_url(rt.settings.breaker_redis_url)} yet.")


@breaker.command(cls=CeleryCommand)
@click.argument("name")
@click.pass_context
def reset(ctx: click.Context, name: str) -> None:
    """Close breaker NAME now, clearing its consecutive counts (running totals are kept)."""
    before, after = _operate(ctx, name, CircuitBreaker.reset)
    click.echo(f"Reset {name}: was {before['state']}, now {after['state']}.")


@breaker.command("open", cls=CeleryCommand)
@click.argument("name")
@click.pass_context
def open_(ctx: click.Context, name: str) -> None:
    """Open breaker NAME now, isolating its dependency for one timeout."""
    before, after = _operate(ctx, name, CircuitBreaker.force_open)
    click.echo(
        f"Opened {name}: was {before['state']}, now {after['state']}; "
        f"calls refused for {after['retry_after']:.1f}s."
    )


@breaker.command(cls=CeleryCommand)
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on; 0.0.0.0 inside a container.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on; 0 picks a free one.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int) -> None:
    """Serve GET /metrics (Prometheus) and GET /health until SIGINT or SIGTERM."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rt = runtime(ctx.obj.app)
    try:
        server = ExporterServer(rt.registry, host, port, orders=rt.orders)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--host'") from None
    try:
        server.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {one_line(exc)}") from None
    # The first line says where it listens: with --port 0 it is the only way to know.
    click.echo(
        f"Serving breaker metrics at {server.url}/metrics and health at {server.url}/health "
        f"(store {safe_url(rt.settings.breaker_redis_url)})"
    )
    signum = server.serve_until_signalled()
    click.echo(f"Stopped on signal {signum}.")


def format_table(breakers: list[dict[str, Any]]) -> str:
    """Return the breakers as an aligned text table, one row each."""
    rows = [
        [
            b["name"], b["state"], f"{b['retry_after']:.1f}s",
            f"{b.get('open_duration') or 0:.1f}s", b.get("open_cause") or "-",
            str(b["failure_count"]),
            str(b["success_count"]), str(b["calls"]), str(b["failures"]), str(b["rejected"]),
            *(f"{b['seconds_in_state'].get(s, 0.0):.1f}" for s in ("closed", "open", "half_open")),
        ]
        for b in breakers
    ]
    header = [title for title, _ in COLUMNS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(f"{cell:{align}{width}}" for cell, (_, align), width in zip(
            row, COLUMNS, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


@contextmanager
def _store_warnings_silenced() -> Iterator[None]:
    """Drop the breaker library's log records while a command talks to the store."""
    # The command reports an unreachable store itself, in one line on stderr; the library's
    # outage warning would say it again through logging's last-resort handler.
    logger = logging.getLogger("breaker")
    logger.addFilter(_drop)
    try:
        yield
    finally:
        logger.removeFilter(_drop)


def _drop(_record: logging.LogRecord) -> bool:
    """Reject a log record."""
    return False


def _operate(
    ctx: click.Context, name: str, action: Callable[[CircuitBreaker], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply an operator action to a known breaker; return its snapshots before and after."""
    rt = runtime(ctx.obj.app)
    registry = rt.registry
    try:
        with _store_warnings_silenced():
            # Checked before get(): building a breaker registers its name in the store.
            if not registry.known(name):
                known = ", ".join(registry.names()) or "none yet"
                raise click.ClickException(
                    f"no breaker named {name!r} on {safe_url(rt.settings.breaker_redis_url)} "
                    f"(known: {known})"
                )
            cb = registry.get(name)
            before = cb.snapshot()
            action(cb)
            after = cb.snapshot()
    except STORE_ERRORS as exc:
        raise _unavailable(rt, exc) from None
    # The store falls back to a per-process circuit when Redis stops answering: an action
    # taken there would change nothing any worker sees.
    if rt.store.degraded or "fallback" in (before.get("store"), after.get("store")):
        raise _unavailable(rt, "it stopped answering during the operation")
    return before, after


def _unavailable(rt: Runtime, reason: object) -> StoreUnavailableExit:
    """Return the one-line error for a breaker store that cannot be reached."""
    text = one_line(reason) if isinstance(reason, BaseException) else str(reason)
    return StoreUnavailableExit(
        f"breaker store {safe_url(rt.settings.breaker_redis_url)} unreachable: {text}"
    )


