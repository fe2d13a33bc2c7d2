"""The processes the charge benchmarks run against, and the means to feed and watch them.

Private redis-servers (the broker and result backend on one, the breakers and order book on
another), a RabbitMQ vhost of the benchmark's own when RabbitMQ answers, the sandbox provider
in a process of its own, and `celery worker` prefork processes logging to files that the
benchmark reads to count receptions, reschedules and successes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import redis
from celery import Celery
from kombu import Exchange, Queue

from tests.rabbitmq import own_vhost
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A queue no task is sent to: a worker started on it takes nothing until it is told to
# consume its real queue, so that a whole batch is sent before the worker sees any of it.
IDLE_QUEUE = "bench.idle"

BrokerKind = Literal["redis", "amqp"]

# What a worker's log says, for either app.
RECEIVED = re.compile(r"Task (?P<name>[\w.]+)\[(?P<task>[0-9a-f-]{36})\] received")
# A task's end: succeeded, or raised (ChargeFailed, ChargeExpired, anything unexpected).
ENDED = re.compile(r"Task (?P<name>[\w.]+)\[(?P<task>[0-9a-f-]{36})\] (?:succeeded|raised)")
# payments.charge, rescheduling itself: refused by its breaker (parked), or after an attempt.
OURS_RESCHEDULED = re.compile(
    r"Charge (?P<order>\S+) (?P<why>.*?) in [\d.]+s \(attempts \d+, deferrals \d+\)"
)
# The plain task, retried by Celery's autoretry_for.
PLAIN_RESCHEDULED = re.compile(r"Task [\w.]+\[(?P<task>[0-9a-f-]{36})\] retry: Retry in")
ALREADY_DONE = "already succeeded"


def progress(message: str) -> None:
    """Print a progress line at once."""
    print(f"  .. {message}", flush=True)


def load() -> str:
    """Return the machine's load averages, for the record: the figures depend on them."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- Processes ------------------------------------------------------------------------------


class SandboxProcess:
    """`python -m workers.sandbox` on a free port, in a process of its own."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> None:
        """Start the sandbox and read the URL it listens on."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.sandbox", "--port", "0", "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"http://\S+", line)
        if match is None:
            raise RuntimeError(f"the sandbox did not start: {line!r}")
        self.url = match.group(0)

    def stop(self) -> None:
        """Stop the sandbox."""
        if self.process is not None:
            terminate(self.process)
            self.process = None


@dataclass
class LogCounts:
    """What a worker's log said so far."""

    received: Counter[str] = field(default_factory=Counter)  # by task id
    rescheduled: Counter[str] = field(default_factory=Counter)  # by task id
    # When each task ended (unix s, as logged), by task id.
    ended: dict[str, float] = field(default_factory=dict)
    already_done: int = 0


@dataclass
class Worker:
    """`celery -A <app> worker` (prefork, events on) in a process group of its own."""

    app: str
    name: str
    env: dict[str, str]
    log: Path
    concurrency: int
    # Queues the worker starts on (and is then told to stop consuming until a batch is
    # sent): on RabbitMQ, Celery binds native delayed delivery only to the queues a worker
    # has when it starts, so a queue first added by add_consumer never gets its countdowns.
    queues: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    # payments.charge logs order ids when it reschedules: the benchmark maps them to tasks.
    task_of_order: dict[str, str] = field(default_factory=dict)
    counts: LogCounts = field(default_factory=LogCounts)
    process: subprocess.Popen[bytes] | None = None
    _offset: int = 0
    _peak: int = 0
    _sampling: threading.Event | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the worker on the idle queue and wait until it says it is ready."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, "worker",
             "--pool", "prefork", "--concurrency", str(self.concurrency), "-n", self.name,
             "-E", "-Q", ",".join([IDLE_QUEUE, *self.queues]),
             "--loglevel", "INFO", "-f", str(self.log),
             "--without-mingle", "--without-gossip", *self.extra_args],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while " ready." not in self._text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start:\n{self._text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the worker and its pool processes."""
        self.stop_sampling()
        if self.process is not None:
            terminate(self.process, group=True)
            self.process = None

    def members(self) -> list[int]:
        """Return the worker's main process and its pool processes."""
        assert self.process is not None
        main = self.process.pid
        return [main, *(pid for pid in _pids() if _parent(pid) == main)]

    def rss(self) -> int:
        """Return the resident memory of the whole process group, in bytes."""
        return sum(_rss(pid) for pid in self.members())

    def cpu(self) -> float:
        """Return the CPU seconds used so far by the main process and its pool processes."""
        return sum(_cpu(pid) for pid in self.members())

    def start_sampling(self, every: float = 0.1) -> None:
        """Sample the group's RSS in a thread from now on; peak_rss() has the highest seen."""
        self.stop_sampling()
        self._peak = self.rss()
        stop = self._sampling = threading.Event()

        def sample() -> None:
            while not stop.wait(every):
                with suppress(AssertionError):
                    self._peak = max(self._peak, self.rss())

        threading.Thread(target=sample, name=f"rss-{self.name}", daemon=True).start()

    def stop_sampling(self) -> None:
        """Stop the RSS sampler."""
        if self._sampling is not None:
            self._sampling.set()
            self._sampling = None

    def peak_rss(self) -> int:
        """Return the highest group RSS sampled since start_sampling()."""
        return self._peak

    def read_log(self) -> LogCounts:
        """Count the log lines written since the last read; return the running totals."""
        with self.log.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        counts = self.counts
        for line in chunk[:end].decode(errors="replace").splitlines():
            if (match := RECEIVED.search(line)) is not None:
                counts.received[match["task"]] += 1
            elif (match := ENDED.search(line)) is not None:
                counts.ended[match["task"]] = logged_at(line)
            elif (match := OURS_RESCHEDULED.search(line)) is not None:
                counts.rescheduled[self.task_of_order.get(match["order"], match["order"])] += 1
            elif (match := PLAIN_RESCHEDULED.search(line)) is not None:
                counts.rescheduled[match["task"]] += 1
            if ALREADY_DONE in line:
                counts.already_done += 1
        return counts

    def errors(self) -> list[str]:
        """Return the ERROR and CRITICAL lines of the log (at most 20)."""
        lines = [line for line in self._text().splitlines()
                 if ": ERROR/" in line or ": CRITICAL/" in line]
        return lines[:20]

    def _text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def logged_at(line: str) -> float:
    """Return when a worker log line was written ("[2026-01-02 03:04:05,678: ..."), unix s."""
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def terminate(process: subprocess.Popen[Any], *, group: bool = False) -> None:
    """Stop a process we started (and its group): SIGTERM, then SIGKILL after 20 s."""
    members = [pid for pid in _pids() if _group(pid) == process.pid] if group else []
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in members:
        # A pool process its worker left behind (the worker was killed, or died).
        if _group(pid) == process.pid:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> list[str]:
    """Return the fields of /proc/<pid>/stat after the command name, [] if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _parent(pid: int) -> int:
    stat = _stat(pid)
    return int(stat[1]) if stat else -1


def _group(pid: int) -> int:
    stat = _stat(pid)
    return int(stat[2]) if stat else -1


def _cpu(pid: int) -> float:
    stat = _stat(pid)
    return (int(stat[11]) + int(stat[12])) / CLOCK_TICKS if stat else 0.0


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


# --- The lab: servers, a sender, workers ----------------------------------------------------


@dataclass
class Lab:
    """One broker's set-up: its servers, a sender and the settings workers get."""

    broker_kind: BrokerKind
    broker_url: str
    backend_url: str
    store_url: str
    sandbox_url: str
    backend: redis.Redis
    store: redis.Redis
    sender: Celery
    workdir: Path

    def worker_env(self, **settings: str) -> dict[str, str]:
        """Return a worker's environment: our servers and the settings given, none inherited."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BREAKER_", "PAYMENT_", "CELERY_", "PLAIN_"))}
        env.update(
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.backend_url,
            BREAKER_REDIS_URL=self.store_url,
            PAYMENT_PROVIDER_URL=self.sandbox_url,
            PYTHONPATH=f"{ROOT}{os.pathsep}{self.workdir}",
        )
        if self.broker_kind == "amqp":
            # Quorum queues: countdown tasks wait in RabbitMQ (native delayed delivery).
            env.update(CELERY_CONFIG_MODULE="bench_rabbitmq", PLAIN_QUEUE_TYPE="quorum")
        env.update(settings)
        return env

    @contextmanager
    def worker(self, app: str, name: str, queue: str, settings: dict[str, str] | None = None,
               concurrency: int = 2) -> Iterator[Worker]:
        """Run a worker of app for the length of the with-block, not consuming queue yet."""
        log = self.workdir / f"{name}.log"
        worker = Worker(app, f"{name}@{socket.gethostname()}",
                        self.worker_env(**(settings or {})), log, concurrency, [queue])
        try:
            worker.start()
            self.consume(worker, queue, on=False)
            yield worker
        finally:
            worker.stop()

    def consume(self, worker: Worker, queue: str, *, on: bool) -> None:
        """Make the worker start (on) or stop consuming queue, and wait for its answer."""
        control = self.sender.control
        call = control.add_consumer if on else control.cancel_consumer
        options: dict[str, Any] = {}
        if on and self.broker_kind == "amqp":
            # As the apps declare their exchanges on RabbitMQ (add_consumer's default is
            # 'direct', which RabbitMQ refuses for an exchange already declared 'topic').
            options["exchange_type"] = "topic"
        replies = call(queue, destination=[worker.name], reply=True, timeout=10, **options)
        if not replies:
            raise RuntimeError(f"{worker.name} did not answer {'add' if on else 'cancel'}"
                               f"_consumer {queue}")

    def send(self, task: str, order_ids: Sequence[str], queue: str) -> list[str]:
        """Send one charge per order id on one producer; return the task ids."""
        target: str | Queue = queue
        if self.broker_kind == "amqp":
            # Declared as the workers declare it: a quorum queue on a topic exchange (a queue
            # Celery makes up for a name it does not know gets a direct exchange).
            target = Queue(queue, Exchange(queue, type="topic"), routing_key=queue,
                           queue_arguments={"x-queue-type": "quorum"})
        with self.sender.producer_or_acquire() as producer:
            return [
                self.sender.send_task(task, kwargs=charge_kwargs(order_id), queue=target,
                                      producer=producer).id
                for order_id in order_ids
            ]

    def flush(self) -> None:
        """Forget every result, breaker, order and parked charge of the last run."""
        self.backend.flushdb()
        self.store.flushdb()


def charge_kwargs(order_id: str) -> dict[str, Any]:
    """Return the arguments of one card charge the sandbox accepts."""
    return {"order_id": order_id, "amount": 1999, "currency": "eur",
            "payment_token": "tok_bench_visa", "payment_method": "card"}


@contextmanager
def lab(broker_kind: BrokerKind) -> Iterator[Lab]:
    """Start the servers for one broker kind and the sandbox; stop them all on the way out."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pb-bench-")))
        redis_server = stack.enter_context(RedisServer())
        stack.callback(shutil.rmtree, redis_server.dir, ignore_errors=True)
        store_server = stack.enter_context(RedisServer())
        stack.callback(shutil.rmtree, store_server.dir, ignore_errors=True)
        sandbox = SandboxProcess()
        stack.callback(sandbox.stop)
        sandbox.start()
        backend_url = redis_server.url.rsplit("/", 1)[0] + "/1"
        if broker_kind == "amqp":
            broker_url = stack.enter_context(own_vhost("pb-bench"))
            (workdir / "bench_rabbitmq.py").write_text('task_default_queue_type = "quorum"\n')
        else:
            broker_url = redis_server.url
        sender = Celery("bench-sender", broker=broker_url, set_as_current=False)
        sender.conf.update(task_serializer="json", accept_content=["json"])
        if broker_kind == "amqp":
            # Declare the queues as the workers do: quorum, on topic exchanges.
            sender.conf.update(task_default_queue_type="quorum",
                               task_default_exchange_type="topic", broker_transport_options={
                                   "confirm_publish": True})
        stack.callback(sender.close)
        backend, store = (redis.Redis.from_url(url) for url in (backend_url, store_server.url))
        stack.callback(backend.close)
        stack.callback(store.close)
        yield Lab(broker_kind, broker_url, backend_url, store_server.url, sandbox.url,
                  backend, store, sender, workdir)


# --- Watching charges end -------------------------------------------------------------------


class Results:
    """The tasks of one batch, and which of them have a final result in the backend."""

    def __init__(self, backend: redis.Redis, task_ids: Sequence[str]) -> None:
        self.backend = backend
        self.pending = set(task_ids)
        self.total = len(task_ids)
        self.states: Counter[str] = Counter()
        self.last_done = 0.0

    @property
    def done(self) -> int:
        """Return how many tasks have a final result."""
        return self.total - len(self.pending)

    def poll(self) -> int:
        """Read the results of the tasks still pending; return how many are done."""
        pending = list(self.pending)
        for i in range(0, len(pending), 5000):
            batch = pending[i:i + 5000]
            raws = self.backend.mget([f"celery-task-meta-{t}" for t in batch])
            for task_id, raw in zip(batch, raws, strict=True):
                if raw is None:
                    continue
                state = _state(raw)
                if state in ("SUCCESS", "FAILURE"):
                    self.pending.discard(task_id)
                    self.states[state] += 1
                    self.last_done = time.monotonic()
        return self.done

    def wait(self, timeout: float, every: float = 0.1,
             tick: Callable[[int], None] | None = None) -> bool:
        """Wait until every task is done; False if the timeout ran out first."""
        deadline = time.monotonic() + timeout
        while self.poll() < self.total:
            if time.monotonic() > deadline:
                return False
            if tick is not None:
                tick(self.done)
            time.sleep(every)
        return True


def _state(raw: bytes) -> str:
    match = re.search(rb'"status": ?"(\w+)"', raw)
    return match.group(1).decode() if match else "?"


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             every: float = 0.1, tick: Callable[[], None] | None = None) -> float:
    """Wait until condition() holds; return the seconds it took. Raise if it never does."""
    started = time.monotonic()
    last = started
    while not condition():
        now = time.monotonic()
        if now - started > timeout:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        if tick is not None and now - last >= 10:
            last = now
            tick()
        time.sleep(every)
    return time.monotonic() - started


def kb(size: float) -> str:
    """Return a size in bytes as KB."""
    return f"{size / 1024:,.2f} KB"


def mb(size: float) -> str:
    """Return a size in bytes as MB."""
    return f"{size / 2**20:,.1f} MB"


def counts(counter: Counter[Any]) -> str:
    """Return a counter as 'key: n, ...', sorted by key."""
    shown = [f"{key}: {n:,}" for key, n in sorted(counter.items(), key=str) if n]
    return ", ".join(shown) or "none"
