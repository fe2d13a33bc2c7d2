"""The local RabbitMQ (127.0.0.1:5672, guest/guest) for the tests and the benchmarks.

Whoever uses it asks unavailable() first and skips, saying why, when it answers with a
reason; a vhost of one's own (own_vhost) keeps the machine's RabbitMQ data untouched.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from kombu import Connection

ADDRESS = ("127.0.0.1", 5672)
URL = "amqp://guest:guest@127.0.0.1:5672/{vhost}"
# The default vhost "/", written as an amqp URL's path.
DEFAULT_URL = URL.format(vhost="/")


def unavailable(*, vhosts: bool = False) -> str | None:
    """Return why RabbitMQ cannot be used here, or None when it answers guest/guest.

    vhosts: also require rabbitmqctl, to make a vhost of one's own.
    """
    try:
        with socket.create_connection(ADDRESS, timeout=1):
            pass
    except OSError as exc:
        return f"no RabbitMQ on 127.0.0.1:5672 ({exc})"
    if vhosts and shutil.which("rabbitmqctl") is None:
        return "RabbitMQ answers but rabbitmqctl is not on PATH to make a vhost of our own"
    try:
        with Connection(DEFAULT_URL, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return f"RabbitMQ on 127.0.0.1:5672 refuses guest/guest ({type(exc).__name__}: {exc})"
    return None


class VhostError(RuntimeError):
    """rabbitmqctl could not make the vhost or let guest use it."""


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run rabbitmqctl with args; the caller reads its return code."""
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60,
                          check=False)


@contextmanager
def own_vhost(prefix: str) -> Iterator[str]:
    """Yield an amqp:// URL on a new vhost named prefix-<random>; delete it afterwards."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:12]}"
    made = rabbitmqctl("add_vhost", vhost)
    if made.returncode != 0:
        raise VhostError(f"rabbitmqctl add_vhost failed: {made.stderr.strip()[:300]}")
    try:
        allowed = rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        if allowed.returncode != 0:
            raise VhostError(f"rabbitmqctl set_permissions failed: {allowed.stderr[:300]}")
        yield URL.format(vhost=vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)
