"""Run `celery -A workers worker` as a real subprocess for the tests, and wait on conditions."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import psutil
from celery import Celery

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
# Variables a worker reads as settings: only those the test gives reach the subprocess.
SETTING_PREFIXES = ("BREAKER_", "PAYMENT_", "CELERY_")

T = TypeVar("T")



class WorkerProcess:
    """One `celery -A workers worker` process group, its log captured to a file.

    The worker runs in a session of its own, so stop() and kill() reach the pool processes and
    an embedded beat too. Use it as a context manager: the group is gone when the block ends.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        args: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
        self.env.update(env)
        self.log_path = log_path
        self.hostname = f"{name or 'pb-test'}-{uuid.uuid4().hex[:8]}@%h"
        self.command = [
            sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel", "INFO",
            "-n", self.hostname, "--without-mingle", "--without-gossip", *args,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """Return the main process's pid."""
        if self.process is None:
            raise RuntimeError("the worker is not running")
        return self.process.pid

    def start(self, timeout: float = 20.0) -> Self:
        """Start the worker and return once it logs that it is ready."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            wait_until(self._ready, timeout, f"the worker to be ready (log: {self.log_path})")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"the worker exited with {self.process.returncode} before it was ready:\n"
                + self.log()[-3000:]
            )
        return " ready." in self.log()

    def log(self) -> str:
        """Return everything the worker has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pool_pids(self) -> list[int]:
        """Return the pids of the main process's children (pool processes, embedded beat)."""
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the whole group at once, main process and children, as a crash would."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group (warm shutdown), then SIGKILL whatever is left after grace seconds."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=grace)
        finally:
            # Pool processes or beat can outlive a main process that died: reap the group.
            self._signal_group(signal.SIGKILL)
            if self.process.poll() is None:
                self.process.wait()
            self.process = None

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def web_client(broker_url: str, backend_url: str) -> Celery:
    """Return an app as the web tier has it: the broker and results, JSON only, no project code."""
    client = Celery("web", broker=broker_url, backend=backend_url, set_as_current=False)
    client.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return client


def charge_kwargs(order_id: str, amount: int = 1999) -> dict[str, Any]:
    """Return the arguments of one card charge for order_id, as the web tier sends them."""
    return {
        "order_id": order_id,
        "amount": amount,
        "currency": "usd",
        "payment_token": "tok_visa",
    }
