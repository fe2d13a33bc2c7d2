"""The parts the demo runs on, each on a free port: a private redis-server, the sandbox provider
and a Celery worker with embedded beat; started in order and all stopped again, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import redis
from celery import Celery

from workers.config import Settings, SettingsError, read_settings
from workers.demo.options import DemoOptions
from workers.redis_binary import find_redis_server
from workers.sandbox import SandboxControl, SandboxServer

# Every setting the demo changes from its production default, so a sale ends in seconds:
# (environment variable, demo value, production default, what it is).
SHORTENED: tuple[tuple[str, str, str, str], ...] = (
    ("BREAKER_PUBLISH_INTERVAL", "0.5", "5", "breaker state published every"),
    ("PAYMENT_PROVIDER_TIMEOUT", "2", "10", "provider call timeout"),
    ("PAYMENT_RETRY_BACKOFF", "0.2", "1", "first retry backoff"),
    ("PAYMENT_RETRY_BACKOFF_MAX", "1", "30", "longest retry backoff"),
)
# Far beyond the sale's length: no charge may expire while the demo waits for it.
CHARGE_DEADLINE_SECONDS = 600
PRODUCTION_BREAKER_TIMEOUT = "30"

WORKER_START_SECONDS = 60.0
# A running charge ends within the provider timeout (2 s). Past that, a warm shutdown has
# nothing left to finish, yet billiard's pool processes may still wait up to 30 s for the
# main process to read their last results, which it no longer does once it is stopping.
WORKER_STOP_GRACE_SECONDS = 5.0
REDIS_START_SECONDS = 10.0
PROCESS_STOP_SECONDS = 5.0
# Variables of the caller's shell that would change how the worker runs, kept out of its env.
INHERITED_PREFIXES = ("BREAKER_", "PAYMENT_", "CELERY_")


class StartupError(RuntimeError):
    """A part of the demo could not be started; the message says which and why."""


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Check condition every interval until it holds or timeout passes; return whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def live_group_members(pgid: int) -> list[int]:
    """Return the pids of process group pgid that are still running (zombies excluded)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces: fields start after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def _stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate a process, kill it if it lingers, and reap it."""
    if process is None:
        return
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(PROCESS_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


class PrivateRedis:
    """A redis-server of the demo's own: 127.0.0.1, a free port, no persistence, a temp dir."""

    def __init__(self, workdir: Path, logfile: Path) -> None:
        self.workdir = workdir
        self.logfile = logfile
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the URL of its database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        binary = find_redis_server()
        self.logfile.write_text("")
        # Another program may take the free port between our look and redis-server's bind.
        for _ in range(3):
            self.port = free_port()
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--protected-mode", "yes", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), "--logfile", str(self.logfile),
                 "--loglevel", "notice"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                # Its own session: a Ctrl-C in the terminal reaches the demo, which stops it.
                start_new_session=True,
            )
            if self._wait_answering(self.process):
                return
            _stop_process(self.process)
        raise StartupError(f"redis-server ({binary}) did not start; see {self.logfile}")

    def _wait_answering(self, process: subprocess.Popen[bytes]) -> bool:
        """Wait until it answers PING; return False if it exits or stays silent."""
        poll_until(lambda: process.poll() is not None or self._answers(), REDIS_START_SECONDS)
        return process.poll() is None and self._answers()

    def _answers(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Stop it; it keeps nothing on disk."""
        _stop_process(self.process)


class Worker:
    """`celery -A workers worker -B --pool prefork` in a process group of its own."""

    def __init__(
        self, env: dict[str, str], concurrency: int, logfile: Path, schedule: Path
    ) -> None:
        self.env = env
        self.concurrency = concurrency
        self.logfile = logfile
        self.schedule = schedule
        self.hostname = f"flash-sale-{os.getpid()}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def pid(self) -> int:
        """Return the main process's pid (also its process group id)."""
        if self.process is None:
            raise RuntimeError("the worker is not started")
        return self.process.pid

    def start(self) -> None:
        """Start the worker, its pool and beat; the console and the log go to one file."""
        self.logfile.write_text("")
        # Appending, like Celery's own handler on the same file: neither overwrites the other.
        self._log = self.logfile.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "worker", "-B",
             "--pool", "prefork", "--concurrency", str(self.concurrency),
             "--hostname", self.hostname, "--loglevel", "INFO",
             "--logfile", str(self.logfile), "--schedule", str(self.schedule),
             # One worker alone: nothing to synchronise with, and it starts sooner.
             "--without-mingle", "--without-gossip"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            # Its own group: the terminal's Ctrl-C goes to the demo only, which stops the
            # worker in order (warm shutdown), and the group lets us kill all it forked.
            start_new_session=True,
        )

    def wait_ready(self, control: Celery) -> None:
        """Wait until the worker answers a ping, or raise StartupError with its last words."""
        process = self.process
        assert process is not None

        def pings() -> bool:
            return bool(control.control.ping(destination=[self.hostname], timeout=0.5))

        ready = poll_until(lambda: process.poll() is not None or pings(), WORKER_START_SECONDS)
        if process.poll() is not None:
            raise StartupError(
                f"the Celery worker exited with status {process.returncode}:\n{self.log_tail()}"
            )
        if not ready:
            raise StartupError(
                f"the Celery worker did not answer within {WORKER_START_SECONDS:g}s; "
                f"see {self.logfile}"
            )

    def pool_pids(self, control: Celery) -> list[int]:
        """Return the pids of the worker's pool processes, as the worker reports them."""
        stats = control.control.inspect(destination=[self.hostname], timeout=1.0).stats() or {}
        pool = stats.get(self.hostname, {}).get("pool", {})
        return [int(pid) for pid in pool.get("processes", [])]

    def log_tail(self, lines: int = 15) -> str:
        """Return the last lines of the worker's log."""
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no worker log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the worker warmly (SIGTERM), then kill whatever of its group is left."""
        try:
            if self.process is not None:
                self._stop(self.process)
        finally:
            if self._log is not None:
                self._log.close()

    @staticmethod
    def _stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(WORKER_STOP_GRACE_SECONDS)
        # Past the grace period, or orphaned by a main process that died: pool and beat too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        poll_until(lambda: not live_group_members(process.pid), PROCESS_STOP_SECONDS)


class Stack:
    """Redis, sandbox and worker for one sale; close() stops all of them and removes temp files."""

    def __init__(self, options: DemoOptions, output: Path) -> None:
        self.options = options
        self.output = output
        self.tempdir = Path(tempfile.mkdtemp(prefix="flash-sale-"))
        self.redis = PrivateRedis(self.tempdir, output / "redis.log")
        self.api_key = f"sk_demo_{secrets.token_hex(12)}"
        self.sandbox_server = SandboxServer(api_key=self.api_key)
        self.sandbox_port = 0
        self.sandbox: SandboxControl | None = None
        self.worker: Worker | None = None
        self.control: Celery | None = None
        self.settings: Settings | None = None
        self._pool_pids: list[int] = []
        self._group_pids: list[int] = []
        # Clean-ups run last-registered first, each even if an earlier one fails; each is
        # registered before its part starts, so a part interrupted while starting is stopped.
        self._cleanup = contextlib.ExitStack()
        self._cleanup.callback(self.record, "stopped")
        self._cleanup.callback(shutil.rmtree, self.tempdir, ignore_errors=True)

    def start(self, say: Callable[[str], None]) -> None:
        """Start Redis, the sandbox and the worker with beat, saying what runs where."""
        self.record("starting")
        self._cleanup.callback(self.redis.stop)
        self.redis.start()
        say(f"  redis-server     {self.redis.url}  (private, no persistence)")
        self.record("starting")
        self._cleanup.callback(self.sandbox_server.stop)
        self.sandbox_server.start()
        self.sandbox_port = self.sandbox_server.port
        self.sandbox = self._cleanup.enter_context(SandboxControl(self.sandbox_server.url))
        say(f"  sandbox provider {self.sandbox_server.url}")
        env = self.worker_environment()
        try:
            self.settings = read_settings({"broker_url": self.redis.url}, environ=env)
        except SettingsError as exc:
            raise StartupError(f"these breaker settings cannot run: {exc}") from None
        self.control = Celery("flash-sale-control", broker=self.redis.url, set_as_current=False)
        self.control.conf.update(task_serializer="json", accept_content=["json"])
        self._cleanup.callback(self.control.close)
        self.worker = Worker(
            env, self.options.concurrency, self.output / "worker.log",
            self.tempdir / "celerybeat-schedule",
        )
        self._cleanup.callback(self.worker.stop)
        self.worker.start()
        self.record("starting")
        self.worker.wait_ready(self.control)
        self._pool_pids = self.worker.pool_pids(self.control)
        self.record("ready")
        say(
            f"  celery worker    pid {self.worker.pid}, prefork pool of "
            f"{self.options.concurrency}, embedded beat; log {self.output / 'worker.log'}"
        )

    def worker_environment(self) -> dict[str, str]:
        """Return the worker's environment: ours, minus inherited settings, plus the demo's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_PREFIXES)}
        o = self.options
        env.update({name: value for name, value, _, _ in SHORTENED})
        env.update(
            CELERY_BROKER_URL=self.redis.url,
            CELERY_RESULT_BACKEND=self.redis.url,
            PAYMENT_PROVIDER_URL=self.sandbox_server.url,
            PAYMENT_PROVIDER_API_KEY=self.api_key,
            PAYMENT_CHARGE_DEADLINE=str(CHARGE_DEADLINE_SECONDS),
            BREAKER_TIMEOUT=f"{o.breaker_timeout:g}",
            BREAKER_FAILURE_THRESHOLD=str(o.failure_threshold),
            BREAKER_SUCCESS_THRESHOLD=str(o.success_threshold),
            BREAKER_HALF_OPEN_MAX_CALLS=str(o.half_open_max_calls),
        )
        return env

    def record(self, stage: str) -> None:
        """Write what runs where to processes.json, so a test can check all of it is gone."""
        worker: dict[str, Any] | None = None
        if self.worker is not None and self.worker.process is not None:
            pid = self.worker.pid
            if stage != "stopped":
                # Beat and the pool are forked while the worker starts: keep every pid seen.
                self._group_pids = sorted({*self._group_pids, *live_group_members(pid)})
            worker = {
                "pid": pid,
                "pgid": pid,
                "pool_pids": self._pool_pids,
                "group_pids": self._group_pids,
                "hostname": self.worker.hostname,
            }
        data = {
            "stage": stage,
            "demo_pid": os.getpid(),
            "temp_dir": str(self.tempdir),
            "redis": {
                "pid": self.redis.process.pid if self.redis.process else None,
                "port": self.redis.port,
            },
            "sandbox": {"port": self.sandbox_port, "in_process": True},
            "worker": worker,
        }
        path = self.output / "processes.json"
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        # Replaced in one step: a reader never sees half a file.
        os.replace(partial, path)

    def close(self) -> None:
        """Stop the worker, the sandbox and Redis, in that order, and remove the temp dir."""
        self._cleanup.close()
