"""Sandbox payment provider speaking the charge protocol (CONTRACT section 4), with fault
injection and a ledger under ``/_sandbox/`` so the demo and tests can break it and audit it."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Final, Self, TypedDict, TypeGuard, cast
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger("workers.sandbox")

MAX_EVENTS: Final = 200_000
MAX_BODY_BYTES: Final = 1 << 20
DECLINED_SOURCE: Final = "tok_chargeDeclined"
DECLINED_SOURCE_PREFIX: Final = "tok_decline"
REJECTED_SOURCE: Final = "tok_reject"

# The settings each fault mode takes; any other field in a fault body is refused.
_MODE_SETTINGS: Final[Mapping[str, tuple[str, ...]]] = {
    "ok": (),
    "down": ("status", "retry_after"),
    "slow": ("delay",),
    "timeout": ("delay",),
    "flaky": ("status", "rate", "seed"),
    "lost_response": ("status",),
    # Charge, then close the connection without a word.
    "hang_up": (),
    # Charge, then send the answer one byte every `delay` seconds.
    "trickle": ("delay",),
}
_DEFAULT_DELAY: Final[Mapping[str, float]] = {"slow": 1.0, "timeout": 30.0, "trickle": 0.2}
# The status a ledger event records for a request that got no answer at all (hang_up).
NO_ANSWER: Final = 0
_MAX_DELAY: Final = 3600.0


class ChargeRecord(TypedDict):
    """One succeeded charge in the ledger."""

    id: str
    order_id: str
    amount: int
    currency: str
    created_at: float


class RequestStats(TypedDict):
    """Charge requests that reached the sandbox, counted by the status they got."""

    total: int
    by_status: dict[str, int]
    # Requests that arrived and have no answer yet (held by a slow fault, say).
    in_flight: int


def no_requests() -> RequestStats:
    """Return the request stats of a sandbox that has seen none (or whose ledger is unknown)."""
    return {"total": 0, "by_status": {}, "in_flight": 0}


class LedgerEvent(TypedDict):
    """One charge request: when it arrived (unix seconds), its status and its order."""

    t: float
    status: int
    order_id: str | None


class Ledger(TypedDict):
    """What ``GET /_sandbox/ledger`` returns."""

    charges: list[ChargeRecord]
    charges_by_order: dict[str, int]
    requests: RequestStats
    events: list[LedgerEvent]


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, JSON body and extra headers."""

    status: int
    body: Mapping[str, object]
    headers: tuple[tuple[str, str], ...] = ()
    # How the handler delivers it: at once, one byte every `trickle` seconds, or not at all.
    trickle: float = 0.0
    hang_up: bool = False


def _error(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    """Build an error reply in the provider's ``{"error": {...}}`` shape."""
    error: dict[str, str] = {"code": code, "message": message}
    if param is not None:
        error["param"] = param
    return Reply(status, {"error": error}, headers)


def _unavailable(status: int, mode: str, retry_after: float | None = None) -> Reply:
    """Build the reply of an injected failure, with a Retry-After header if one is set."""
    code = {429: "rate_limited", 504: "timeout"}.get(status, "service_unavailable")
    headers = () if retry_after is None else (("Retry-After", f"{math.ceil(retry_after)}"),)
    return _error(status, code, f"sandbox fault injected: {mode}", headers=headers)


class InvalidRequest(ValueError):
    """A request field the sandbox refuses; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def reply(self) -> Reply:
        """Answer 400 invalid_request naming the field."""
        return _error(400, "invalid_request", str(self), param=self.param)


def _is_int(value: object) -> TypeGuard[int]:
    """Tell whether a JSON value is an integer (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    """Tell whether a JSON value is a number (a bool is not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Faults:
    """The failure injected into every charge request until the faults change."""

    mode: str = "ok"
    status: int = 503
    delay: float = 0.0
    rate: float = 0.5
    seed: int | None = None
    retry_after: float | None = None

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Build faults from a ``POST /_sandbox/faults`` body, refusing any doubtful field."""
        if not isinstance(data, dict):
            raise InvalidRequest("body", "the body must be a JSON object")
        mode = data.get("mode")
        if not isinstance(mode, str) or mode not in _MODE_SETTINGS:
            raise InvalidRequest("mode", f"mode must be one of: {', '.join(_MODE_SETTINGS)}")
        for name in data:
            if name != "mode" and name not in _MODE_SETTINGS[mode]:
                raise InvalidRequest(name, f"{name} is not a setting of mode {mode}")
        status = data.get("status", 503)
        if not _is_int(status) or not (status == 429 or 500 <= status <= 599):
            raise InvalidRequest("status", "status must be 429 or a 5xx code")
        delay = data.get("delay", _DEFAULT_DELAY.get(mode, 0.0))
        if not _is_number(delay) or not 0 <= delay <= _MAX_DELAY:
            raise InvalidRequest("delay", f"delay must be seconds from 0 to {_MAX_DELAY:g}")
        rate = data.get("rate", 0.5)
        if not _is_number(rate) or not 0 <= rate <= 1:
            raise InvalidRequest("rate", "rate must be a fraction from 0 to 1")
        seed = data.get("seed")
        if seed is not None and not _is_int(seed):
            raise InvalidRequest("seed", "seed must be an integer or null")
        retry_after = data.get("retry_after")
        if retry_after is not None and (
            not _is_number(retry_after) or not 0 <= retry_after <= _MAX_DELAY
        ):
            raise InvalidRequest(
                "retry_after", f"retry_after must be seconds from 0 to {_MAX_DELAY:g}, or null"
            )
        return cls(
            mode, status, float(delay), float(rate), seed,
            None if retry_after is None else float(retry_after),
        )

    def to_json(self) -> dict[str, object]:
        """Return the mode and its settings, in the shape ``from_json`` accepts."""
        settings = {name: getattr(self, name) for name in _MODE_SETTINGS[self.mode]}
        return {"mode": self.mode, **settings}


@dataclass(frozen=True)
class _Charge:
    """A charge request that passed validation."""

    amount: int
    currency: str
    source: str
    order_id: str


def _decode(body: bytes) -> object:
    """Parse a JSON body; None when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _parse_charge(payload: object) -> _Charge:
    """Validate a charge body, raising InvalidRequest naming the first bad field."""
    if not isinstance(payload, dict):
        raise InvalidRequest("body", "the request body must be a JSON object")
    amount = payload.get("amount")
    if not _is_int(amount) or amount < 1:
        raise InvalidRequest("amount", "amount must be a positive integer in minor units")
    currency = payload.get("currency")
    if not isinstance(currency, str) or not re.fullmatch("[A-Za-z]{3}", currency):
        raise InvalidRequest("currency", "currency must be a three-letter ISO 4217 code")
    source = payload.get("source")
    if not isinstance(source, str) or not source:
        raise InvalidRequest("source", "source must be a non-empty payment token")
    metadata = payload.get("metadata")
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata", "metadata must be an object holding order_id")
    order_id = metadata.get("order_id")
    if not isinstance(order_id, str) or not order_id:
        raise InvalidRequest("metadata.order_id", "metadata.order_id must be a non-empty string")
    return _Charge(amount, currency.lower(), source, order_id)


def _order_id_of(payload: object) -> str | None:
    """Find the order a request body names, if any, valid or not."""
    metadata = payload.get("metadata") if isinstance(payload, dict) else None
    order_id = metadata.get("order_id") if isinstance(metadata, dict) else None
    return order_id if isinstance(order_id, str) else None


class Sandbox:
    """The provider's state: charges, idempotency records, request stats and faults."""

    _charges: list[ChargeRecord]
    _charges_by_order: Counter[str]
    _idempotency: dict[str, tuple[str, Reply]]
    _by_status: Counter[int]
    _events: deque[LedgerEvent]
    _faults: Faults
    _rng: random.Random

    def __init__(self, api_key: str | None = None) -> None:
        self._api_key = api_key or None
        self._lock = threading.Lock()
        # Not statistics: a reset does not forget the requests still being answered.
        self._in_flight = 0
        self._closing = threading.Event()
        self._clear()

    def _clear(self) -> None:
        """Forget every charge, idempotency record, statistic and fault."""
        self._charges = []
        self._charges_by_order = Counter()
        self._idempotency = {}
        self._by_status = Counter()
        self._events = deque(maxlen=MAX_EVENTS)
        self._faults = Faults()
        self._rng = random.Random()

    @property
    def faults(self) -> Faults:
        """Return the faults in force."""
        with self._lock:
            return self._faults

    def set_faults(self, data: object) -> Faults:
        """Replace the faults from a JSON body; the next request sees them."""
        faults = Faults.from_json(data)
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)
        return faults

    def reset(self) -> None:
        """Clear the ledger, idempotency records, stats and faults."""
        with self._lock:
            self._clear()

    def close(self) -> None:
        """Release requests held by a slow, timeout or trickle fault, for shutdown."""
        self._closing.set()

    @property
    def closing(self) -> threading.Event:
        """Return the event set when the sandbox shuts down."""
        return self._closing

    def ledger(self) -> Ledger:
        """Return a snapshot of charges, request stats and events."""
        with self._lock:
            by_status = sorted(self._by_status.items())
            return {
                # Records are never changed once appended, so shallow copies are snapshots.
                "charges": list(self._charges),
                "charges_by_order": dict(self._charges_by_order),
                "requests": {
                    "total": sum(self._by_status.values()),
                    "by_status": {str(status): count for status, count in by_status},
                    "in_flight": self._in_flight,
                },
                "events": list(self._events),
            }

    def charge(self, body: bytes, authorization: str | None, idempotency_key: str | None) -> Reply:
        """Answer one charge request under the current faults and count it."""
        arrived = time.time()
        with self._lock:
            self._in_flight += 1
        try:
            return self._answer(body, authorization, idempotency_key, arrived)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(
        self, body: bytes, authorization: str | None, idempotency_key: str | None,
        arrived: float,
    ) -> Reply:
        payload = _decode(body)
        with self._lock:
            faults = self._faults
            dropped = faults.mode == "flaky" and self._rng.random() < faults.rate
        if faults.mode == "down" or dropped:
            reply = _unavailable(faults.status, faults.mode, faults.retry_after)
        elif faults.mode == "timeout":
            self._closing.wait(faults.delay)
            reply = _unavailable(504, faults.mode)
        else:
            if faults.mode == "slow":
                self._closing.wait(faults.delay)
            reply = self._process(payload, authorization, idempotency_key)
            if faults.mode == "lost_response":
                reply = _unavailable(faults.status, faults.mode)
            elif faults.mode == "hang_up":
                reply = replace(reply, hang_up=True)
            elif faults.mode == "trickle":
                reply = replace(reply, trickle=faults.delay)
        status = NO_ANSWER if reply.hang_up else reply.status
        with self._lock:
            self._by_status[status] += 1
            self._events.append({"t": arrived, "status": status, "order_id": _order_id_of(payload)})
        return reply

    def _process(
        self, payload: object, authorization: str | None, idempotency_key: str | None
    ) -> Reply:
        """Authorise, validate and settle a charge, replaying the first answer to a key."""
        if not self._authorised(authorization):
            return _error(
                401,
                "unauthorized",
                "a valid API key is required as a Bearer token",
                headers=(("WWW-Authenticate", "Bearer"),),
            )
        try:
            charge = _parse_charge(payload)
        except InvalidRequest as exc:
            return exc.reply()
        if charge.source == REJECTED_SOURCE:
            return _error(400, "invalid_request", "source cannot be charged", param="source")
        fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        with self._lock:
            first = self._idempotency.get(idempotency_key) if idempotency_key else None
            if first is not None:
                first_fingerprint, first_reply = first
                if first_fingerprint != fingerprint:
                    return _error(
                        400,
                        "idempotency_error",
                        "this Idempotency-Key was already used with a different request body",
                    )
                return replace(first_reply, headers=(("Idempotent-Replayed", "true"),))
            reply = self._settle(charge)
            if idempotency_key:
                self._idempotency[idempotency_key] = (fingerprint, reply)
        return reply

    def _authorised(self, authorization: str | None) -> bool:
        """Tell whether the Authorization header carries the configured key, if any."""
        if self._api_key is None:
            return True
        expected = f"Bearer {self._api_key}".encode()
        return authorization is not None and hmac.compare_digest(authorization.encode(), expected)

    def _settle(self, charge: _Charge) -> Reply:
        """Decline or record a valid charge; the caller holds the lock."""
        if charge.source == DECLINED_SOURCE or charge.source.startswith(DECLINED_SOURCE_PREFIX):
            return _error(402, "card_declined", "Your card was declined.")
        charge_id = f"ch_{uuid.uuid4().hex[:24]}"
        self._charges.append(
            {
                "id": charge_id,
                "order_id": charge.order_id,
                "amount": charge.amount,
                "currency": charge.currency,
                "created_at": time.time(),
            }
        )
        self._charges_by_order[charge.order_id] += 1
        return Reply(
            200,
            {
                "id": charge_id,
                "object": "charge",
                "status": "succeeded",
                "amount": charge.amount,
                "currency": charge.currency,
                "metadata": {"order_id": charge.order_id},
            },
        )


class _Handler(BaseHTTPRequestHandler):
    """Route requests to the sandbox and answer JSON on kept-alive connections."""

    protocol_version = "HTTP/1.1"
    server_version = "PaymentSandbox/1"
    # Headers and body leave in two writes; Nagle would hold the body back for an ACK.
    disable_nagle_algorithm = True
    server: _Server

    def _dispatch(self) -> None:
        """Read the body, then answer from the route table (404 and 405 as JSON)."""
        body = self._read_body()
        if body is None:
            return
        methods = self._ROUTES.get(self._route())
        if methods is None:
            reply = _error(404, "not_found", "no such endpoint")
        elif (action := methods.get(self.command)) is None:
            allowed = ", ".join(methods)
            reply = _error(
                405,
                "method_not_allowed",
                f"this endpoint accepts {allowed}",
                headers=(("Allow", allowed),),
            )
        else:
            reply = action(self, body)
        self._send(reply)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def _charge(self, body: bytes) -> Reply:
        """Answer ``POST /v1/charges``."""
        return self.server.sandbox.charge(
            body, self.headers.get("Authorization"), self.headers.get("Idempotency-Key")
        )

    def _get_faults(self, body: bytes) -> Reply:
        """Answer ``GET /_sandbox/faults``."""
        return Reply(200, self.server.sandbox.faults.to_json())

    def _set_faults(self, body: bytes) -> Reply:
        """Answer ``POST /_sandbox/faults``."""
        try:
            return Reply(200, self.server.sandbox.set_faults(_decode(body)).to_json())
        except InvalidRequest as exc:
            return exc.reply()

    def _ledger(self, body: bytes) -> Reply:
        """Answer ``GET /_sandbox/ledger``."""
        return Reply(200, self.server.sandbox.ledger())

    def _reset(self, body: bytes) -> Reply:
        """Answer ``POST /_sandbox/reset``."""
        self.server.sandbox.reset()
        return Reply(200, {"status": "reset"})

    _ROUTES: ClassVar[dict[str, dict[str, Callable[[_Handler, bytes], Reply]]]] = {
        "/v1/charges": {"POST": _charge},
        "/_sandbox/faults": {"GET": _get_faults, "POST": _set_faults},
        "/_sandbox/ledger": {"GET": _ledger},
        "/_sandbox/reset": {"POST": _reset},
    }

    def _route(self) -> str:
        """Return the request path without its query string."""
        # ``path`` is unset when the request line itself could not be parsed.
        return urlsplit(getattr(self, "path", "")).path

    def _read_body(self) -> bytes | None:
        """Read the request body; None after answering one that cannot be framed."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            reply = _error(411, "length_required", "send the body with a Content-Length")
        else:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if 0 <= length <= MAX_BODY_BYTES:
                return self.rfile.read(length)
            reply = _error(
                413 if length > MAX_BODY_BYTES else 400,
                "invalid_request",
                f"Content-Length must be from 0 to {MAX_BODY_BYTES}",
                param="Content-Length",
            )
        self._send(reply, close=True)
        return None

    def _send(self, reply: Reply, *, close: bool = False) -> None:
        """Write a JSON reply with its Content-Length so the connection can be reused."""
        if reply.hang_up:
            self.close_connection = True
            return
        data = json.dumps(reply.body).encode()
        if reply.trickle:
            self._trickle(reply, data)
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers:
                self.send_header(name, value)
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            # The client stopped waiting (its own timeout): there is nobody left to answer.
            self.close_connection = True

    def _trickle(self, reply: Reply, data: bytes) -> None:
        """Write the whole answer, status line included, one byte at a time."""
        head = [f"HTTP/1.1 {reply.status} {self.responses.get(reply.status, ('',))[0]}"]
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        head += [f"{name}: {value}" for name, value in reply.headers]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        self.log_request(reply.status)
        closing = self.server.sandbox.closing
        try:
            for i in range(len(raw)):
                self.wfile.write(raw[i : i + 1])
                self.wfile.flush()
                if closing.wait(reply.trickle):
                    break
        except OSError:
            pass
        self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log method, path and status only: headers and bodies carry tokens and keys."""
        logger.info("%s %s %s", self.command or "-", self._route() or "-", code)

    def log_message(self, format: str, *args: Any) -> None:
        """Log a protocol error without its text, which may quote the raw request."""
        logger.warning(
            "%s %s: malformed request or protocol error", self.command or "-", self._route() or "-"
        )


class _Server(ThreadingHTTPServer):
    """HTTP server whose handler threads share one Sandbox."""

    # Idle kept-alive connections would otherwise make server_close() wait on their clients.
    block_on_close = False

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        super().__init__(address, _Handler)
        self.sandbox = sandbox


class SandboxServer:
    """The sandbox provider served from a background thread; port 0 picks a free port."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None
    ) -> None:
        self._host = host
        self._port = port
        self._sandbox = Sandbox(api_key)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind the socket and serve on a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("the sandbox server is already running")
        self._httpd = _Server((self._host, self._port), self._sandbox)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="sandbox-server",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        """Return the bound port."""
        if self._httpd is None:
            raise RuntimeError("the sandbox server is not running")
        return self._httpd.server_port

    @property
    def url(self) -> str:
        """Return the base URL, e.g. ``http://127.0.0.1:8099``."""
        return f"http://{self._host}:{self.port}"

    def stop(self) -> None:
        """Release held requests, stop serving and close the socket."""
        if self._httpd is None or self._thread is None:
            return
        self._sandbox.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class SandboxControl:
    """Client for the sandbox's ``/_sandbox/`` fault and ledger endpoints."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self._client = httpx.Client(base_url=url, timeout=timeout)

    def set_faults(self, mode: str = "ok", **settings: float | None) -> dict[str, Any]:
        """Inject a fault into the next charge requests ("ok" clears it); return it."""
        return self._call("POST", "/_sandbox/faults", {"mode": mode, **settings})

    def faults(self) -> dict[str, Any]:
        """Return the faults in force."""
        return self._call("GET", "/_sandbox/faults")

    def ledger(self) -> Ledger:
        """Return the charges, request stats and events."""
        return cast(Ledger, self._call("GET", "/_sandbox/ledger"))

    def reset(self) -> None:
        """Clear the ledger, idempotency records, stats and faults."""
        self._call("POST", "/_sandbox/reset")

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def _call(self, method: str, path: str, payload: object = None) -> dict[str, Any]:
        """Send one control request; a refused fault body raises ValueError with its reason."""
        response = self._client.request(method, path, json=payload)
        if response.status_code == 400:
            raise ValueError(response.json()["error"]["message"])
        response.raise_for_status()
        return cast(dict[str, Any], response.json())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _port(text: str) -> int:
    """Parse a TCP port number for argparse."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 65535, not {text!r}")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the sandbox provider until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.sandbox", description="Sandbox payment provider."
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=8099, help="0 picks a free port (default: %(default)s)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SANDBOX_API_KEY") or None,
        help="require this Bearer key (default: $SANDBOX_API_KEY, which keeps it out of ps)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stopping = threading.Event()
    # Installed before the socket opens, so an early SIGTERM still ends in a clean exit.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    server = SandboxServer(args.host, args.port, api_key=args.api_key)
    try:
        server.start()
    except OSError as exc:
        parser.exit(1, f"{parser.prog}: cannot listen on {args.host}:{args.port}: {exc}\n")
    print(f"Sandbox payment provider listening on {server.url}", flush=True)
    stopping.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
