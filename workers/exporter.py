"""The breaker exporter: Prometheus metrics and a health check, read from the shared store.

`celery -A workers breaker serve` runs it. Every scrape reads every breaker from Redis
afresh, so the figures cover every worker process and a short open period that began and
ended between two scrapes still shows in the counters.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from breaker import BreakerRegistry
from breaker.store import STATES
from workers.orders import OrderBook
from workers.publication import STORE_ERRORS, StoreUnavailable, one_line, read_state

log = logging.getLogger("workers.exporter")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9808
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Every transition the state machine can make, reported from zero so that rate() and
# increase() see the first one happen instead of a series that appears out of nowhere.
TRANSITIONS = (
    ("closed", "open"),
    ("open", "half_open"),
    ("half_open", "closed"),
    ("half_open", "open"),
    ("open", "closed"),
)


# Every cause an opening can have, reported from zero like the transitions.
OPEN_CAUSES = ("failures", "failure_rate", "slow_calls", "probe_failed", "retry_after", "forced")


def health(registry: BreakerRegistry) -> tuple[int, dict[str, Any]]:
    """Return the HTTP status and body of GET /health."""
    try:
        breakers = read_state(registry)["breakers"]
    except StoreUnavailable as exc:
        return 503, {"status": "unavailable", "breakers": [], "error": str(exc)}
    tripped = any(b["state"] != "closed" for b in breakers)
    return 200, {"status": "open" if tripped else "ok", "breakers": breakers}


class BreakerCollector(Collector):
    """Turn the store's snapshots into Prometheus families on every collect()."""

    def __init__(self, registry: BreakerRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        """Yield every family, read from the store now."""
        up = GaugeMetricFamily(
            "breaker_store_up", "1 if the breaker store answered this scrape, else 0"
        )
        try:
            breakers = read_state(self.registry)["breakers"]
        except StoreUnavailable as exc:
            log.warning("Breaker store unavailable for a scrape: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(breakers)


class PaymentsCollector(Collector):
    """The order book's incident count: second charges seen for one order."""

    def __init__(self, orders: OrderBook) -> None:
        self.orders = orders

    def collect(self) -> Iterator[Metric]:
        """Yield payments_conflicts_total, read from the order book now (nothing if it is down)."""
        try:
            total = self.orders.conflicts_total()
        except STORE_ERRORS as exc:
            log.warning("Order book unavailable for a scrape: %s", one_line(exc))
            return
        conflicts = CounterMetricFamily(
            "payments_conflicts",
            "Second charges seen for one order (each one an incident: refund it); the orders "
            "are in the sorted set payments:conflicts:orders",
        )
        conflicts.add_metric([], total)
        yield conflicts


def families(breakers: list[dict[str, Any]]) -> list[Metric]:
    """Return the per-breaker metric families for a list of snapshots."""
    state = GaugeMetricFamily(
        "breaker_state", "1 for the state the circuit is in, 0 for the others",
        labels=["name", "state"],
    )
    calls = CounterMetricFamily(
        "breaker_calls", "Calls that reached the dependency, by how the breaker counted them",
        labels=["name", "outcome"],
    )
    rejected = CounterMetricFamily(
        "breaker_rejected_calls", "Calls refused without reaching the dependency",
        labels=["name"],
    )
    transitions = CounterMetricFamily(
        "breaker_transitions", "State changes of the circuit",
        labels=["name", "from_state", "to_state"],
    )
    seconds = CounterMetricFamily(
        "breaker_state_seconds", "Seconds the circuit has spent in each state",
        labels=["name", "state"],
    )
    retry_after = GaugeMetricFamily(
        "breaker_retry_after_seconds", "Seconds until a call may be tried again; 0 when it may now",
        labels=["name"],
    )
    failures = GaugeMetricFamily(
        "breaker_consecutive_failures", "Consecutive failures counted in CLOSED", labels=["name"]
    )
    successes = GaugeMetricFamily(
        "breaker_consecutive_successes", "Consecutive successes counted in HALF_OPEN",
        labels=["name"],
    )
    open_duration = GaugeMetricFamily(
        "breaker_open_duration_seconds",
        "How long the current (or last) opening lasts: the timeout, grown by backoff or the "
        "dependency's Retry-After",
        labels=["name"],
    )
    openings = CounterMetricFamily(
        "breaker_openings", "Openings of the circuit, by cause", labels=["name", "cause"]
    )
    slow = CounterMetricFamily(
        "breaker_slow_calls", "Calls slower than slow_call_seconds", labels=["name"]
    )
    window_calls = GaugeMetricFamily(
        "breaker_window_calls", "Outcomes in the failure-rate window now", labels=["name"]
    )
    window_failure_rate = GaugeMetricFamily(
        "breaker_window_failure_rate", "Share of failures in the window now", labels=["name"]
    )
    window_slow_rate = GaugeMetricFamily(
        "breaker_window_slow_call_rate", "Share of slow calls in the window now", labels=["name"]
    )
    for b in breakers:
        name = b["name"]
        open_duration.add_metric([name], float(b.get("open_duration") or 0.0))
        seen_causes = b.get("openings") or {}
        for cause in dict.fromkeys([*OPEN_CAUSES, *seen_causes]):
            openings.add_metric([name, cause], seen_causes.get(cause, 0))
        slow.add_metric([name], b.get("slow_calls", 0))
        window = b.get("window")
        if window:
            window_calls.add_metric([name], window["calls"])
            window_failure_rate.add_metric([name], window["failure_rate"] or 0.0)
            window_slow_rate.add_metric([name], window["slow_call_rate"] or 0.0)
        for s in STATES:
            state.add_metric([name, s.value], 1.0 if b["state"] == s.value else 0.0)
            seconds.add_metric([name, s.value], float(b["seconds_in_state"].get(s.value, 0.0)))
        calls.add_metric([name, "success"], b["successes"])
        calls.add_metric([name, "failure"], b["failures"])
        rejected.add_metric([name], b["rejected"])
        seen = {tuple(key.split("->", 1)): count for key, count in b["transitions"].items()}
        for pair in dict.fromkeys([*TRANSITIONS, *seen]):
            transitions.add_metric([name, *pair], seen.get(pair, 0))
        retry_after.add_metric([name], b["retry_after"])
        failures.add_metric([name], b["failure_count"])
        successes.add_metric([name], b["success_count"])
    return [state, calls, rejected, transitions, seconds, retry_after, failures, successes,
            open_duration, openings, slow, window_calls, window_failure_rate, window_slow_rate]


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, content_type, encoder(self.server.metrics))
        elif path == "/health":
            status, body = health(self.server.breakers)
            self._send(status, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # A restarted exporter must be able to bind its port again at once.
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        breakers: BreakerRegistry,
        orders: OrderBook | None,
    ) -> None:
        self.address_family = family
        self.breakers = breakers
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(BreakerCollector(breakers))
        if orders is not None:
            self.metrics.register(PaymentsCollector(orders))
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host, which can hang."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def address_family(host: str, port: int) -> socket.AddressFamily:
    """Return the address family to listen on host with, or raise ValueError."""
    if not host:
        raise ValueError("host must not be empty")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host {host!r}: {one_line(exc)}") from None
    return infos[0][0]


class ExporterServer:
    """Serve /metrics and /health for a registry's breakers on host:port, in a thread.

    With an order book, /metrics also counts second charges (payments_conflicts_total).
    """

    def __init__(
        self,
        registry: BreakerRegistry,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        orders: OrderBook | None = None,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
        self.registry = registry
        self.orders = orders
        self.host = host
        self.family = address_family(host, port)
        self.requested_port = port
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Listen and serve in a background thread; raise OSError if the port cannot be had."""
        server = _HTTPServer(
            (self.host, self.requested_port), self.family, self.registry, self.orders
        )
        self._server = server
        # stop() waits for the serving loop's next poll: keep that wait short.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name="breaker-exporter", daemon=True,
        )
        self._thread.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        """Return the host and port listened on (the port the OS chose when asked for 0)."""
        if self._server is None:
            raise RuntimeError("the exporter is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """Return the port listened on."""
        return self.address[1]

    @property
    def url(self) -> str:
        """Return the base URL of the exporter."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_until_signalled(self) -> int:
        """Serve until SIGINT or SIGTERM arrives, then stop; return that signal's number."""
        received: list[int] = []
        stop = threading.Event()

        def handle(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            stop.set()

        previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
        try:
            if self._server is None:
                self.start()
            stop.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return received[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
