"""How a charge can end other than with a result: each names the order and what to do."""

from __future__ import annotations


class InvalidCharge(ValueError):
    """The task's arguments are wrong; nothing was sent to the provider."""


class ChargeRejected(Exception):
    """The provider refused the request (a 4xx other than a decline); retrying cannot help."""


class ChargeFailed(Exception):
    """The provider kept failing until payment_max_attempts calls were spent."""


class ChargeExpired(Exception):
    """The charge was not done within payment_charge_deadline of its first receipt."""


class ChargeRescheduled(Exception):
    """Why a charge was sent again for later: shown with its RETRY in Flower and the log."""
