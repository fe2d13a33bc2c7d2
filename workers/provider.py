"""Talk to the payment provider: the protocol of CONTRACT.md section 4 behind a small interface.

Another provider (a vendor SDK) plugs in through the `payment_provider_class` setting: a class
taking the Settings, with a `charge()` that answers like HttpProvider's.
"""

from __future__ import annotations

import email.utils
import importlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from workers.deadline import DeadlineTransport, call_deadline

if TYPE_CHECKING:
    from workers.config import Settings
    from workers.validation import ChargeRequest


@dataclass(frozen=True)
class ProviderAnswer:
    """The provider's final word on a charge: succeeded, or declined (HTTP 402)."""

    status: str
    charge_id: str | None = None
    decline_code: str | None = None


class ProviderFailure(Exception):
    """The provider could not answer (5xx, 429, timeout, connection error): a breaker failure."""

    def __init__(
        self, reason: str, *, may_have_reached: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        # True when the request may have been processed although no answer came back.
        self.may_have_reached = may_have_reached
        # The provider's own wait (Retry-After of a 429 or 503), read by the breaker.
        self.retry_after = retry_after


class ProviderRejection(Exception):
    """The provider refused the request (4xx other than 402); the provider itself is fine."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code


class Provider(Protocol):
    """What the charge task needs of a payment provider."""

    def charge(self, request: ChargeRequest, idempotency_key: str) -> ProviderAnswer:
        """Charge once; raise ProviderFailure or ProviderRejection if no answer or refused."""

    def close(self) -> None:
        """Release connections."""


class HttpProvider:
    """The HTTP provider protocol over one pooled httpx client per process."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.payment_provider_url.rstrip("/")
        # The whole call, connect to last byte: a trickling answer cannot outlive it.
        self.timeout = settings.payment_provider_timeout
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=10)
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 5.0)),
            transport=DeadlineTransport(limits),
            headers=_auth_headers(settings.payment_provider_api_key),
        )

    def charge(self, request: ChargeRequest, idempotency_key: str) -> ProviderAnswer:
        """POST /v1/charges with the charge's Idempotency-Key and map the answer."""
        body = {
            "amount": request.amount,
            "currency": request.currency,
            "source": request.payment_token,
            "metadata": {"order_id": request.order_id},
        }
        try:
            with call_deadline(self.timeout):
                response = self._client.post(
                    "/v1/charges", json=body, headers={"Idempotency-Key": idempotency_key}
                )
        except httpx.ConnectError as exc:
            raise ProviderFailure(
                f"cannot connect ({type(exc).__name__})", may_have_reached=False
            ) from None
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ProviderFailure(
                f"no connection in time ({type(exc).__name__})", may_have_reached=False
            ) from None
        except httpx.LocalProtocolError as exc:
            raise ProviderFailure(
                f"request not sent ({type(exc).__name__})", may_have_reached=False
            ) from None
        except httpx.TimeoutException as exc:
            raise ProviderFailure(
                f"no answer in time ({type(exc).__name__})", may_have_reached=True
            ) from None
        except httpx.TransportError as exc:
            raise ProviderFailure(
                f"connection lost ({type(exc).__name__})", may_have_reached=True
            ) from None
        return self._answer(response)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    @staticmethod
    def _answer(response: httpx.Response) -> ProviderAnswer:
        status = response.status_code
        payload = _json(response)
        if status in (200, 201):
            charge_id = payload.get("id")
            if payload.get("status") != "succeeded" or not isinstance(charge_id, str):
                raise ProviderFailure(
                    f"HTTP {status} without a succeeded charge in the body", may_have_reached=True
                )
            return ProviderAnswer("succeeded", charge_id=charge_id)
        error = payload.get("error")
        if not isinstance(error, dict):
            error = {}
        code = str(error.get("code", "unknown"))
        if status == 402:
            return ProviderAnswer("declined", decline_code=code)
        if status == 429:
            raise ProviderFailure(
                "HTTP 429 rate limited",
                may_have_reached=False,
                retry_after=retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            wait = retry_after(response.headers.get("Retry-After")) if status == 503 else None
            raise ProviderFailure(f"HTTP {status}", may_have_reached=True, retry_after=wait)
        if 400 <= status < 500:
            raise ProviderRejection(status, code, str(error.get("message", ""))[:200])
        raise ProviderFailure(f"unexpected HTTP {status}", may_have_reached=True)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return the seconds a Retry-After header asks for (seconds or an HTTP date), if valid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    wait = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, wait) if math.isfinite(wait) else None


def _auth_headers(api_key: str) -> dict[str, str]:
    # An empty key sends no Authorization header: "Bearer " alone is not a valid header.
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def load_provider(settings: Settings) -> Provider:
    """Return the provider named by payment_provider_class, built from the settings."""
    module_name, _, class_name = settings.payment_provider_class.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"payment_provider_class {settings.payment_provider_class!r} cannot be loaded: {exc}"
        ) from None
    provider: Provider = cls(settings)
    return provider
