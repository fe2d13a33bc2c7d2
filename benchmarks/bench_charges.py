"""Charges through a real prefork worker with and without the breaker, and a backlog deferred.

Two private redis-servers (one the broker and result backend, one the breaker store and order
book, so that each one's INFO commandstats tells its own story) and the sandbox provider in a
process of its own. First, charges per second with the breaker (payments.charge) and without
(bench.charge_unguarded), rounds alternating in one run. Then 10,000 charges deferred while
the circuit is open: what holding them costs the worker and Redis, the messages they take, and
how long the backlog drains once the circuit times out with the provider healthy. Last, the
same wake-up on more pool processes than probe slots, where re-deferrals can pile up.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from benchmarks.charges_support import UNGUARDED_TASK
from benchmarks.harness import Report, Row, Target
from breaker import BreakerRegistry, CircuitBreaker, RedisStore
from tests.redis_server import RedisServer
from workers.config import Settings, read_settings
from workers.sandbox import SandboxControl

ROOT = Path(__file__).resolve().parent.parent
GUARDED_TASK = "payments.charge"
QUEUE = "celery"
# Where charges wait until all are sent: no worker consumes from it (see release_staged).
STAGING = "bench.staging"
CONCURRENCY = 2
WORKER_NAME = f"bench-charges@{socket.gethostname()}"

# Section 1: rounds alternate guarded, unguarded, ...; each lasts about ROUND_SECONDS.
PAIRS = 4
ROUND_SECONDS = 4.0
ROUND_CHARGES = (500, 2000)
WARM_UP_CHARGES = 200
# The breaker may cost at most this share of the throughput.
THROUGHPUT_FLOOR = 0.95

# Section 2: the backlog, and the circuit's timeout: long enough for the worker to defer the
# whole backlog at the pace measured in section 1, and to take in the deferred copies.
BACKLOG = 10_000
OPEN_SECONDS = (30, 240)
OPEN_MARGIN = 1.3
# Messages per second the worker takes in once the backlog's deferred copies are all sent.
FETCH_RATE = 1000
DRAIN_TIMEOUT = 180.0
CARD = "payments.card"
# A second payment method whose breaker opens for a moment before the measurement, so that
# the deferral path is warm (a pool process's heap grows over its first few hundred retries).
WARM = "payments.warmup"
WARM_OPEN_SECONDS = 5
WARM_DEFERRALS = 200

# Section 3: a wake-up where the pool processes outnumber the probe slots (2 by default), as
# they do in any real deployment; with 2 processes and 2 slots no process is ever turned away.
WAKE_CONCURRENCY = 8
WAKE_BACKLOG = 1_000
WAKE_SHORTEST_OPEN = 10

# Commands the benchmark itself sends while it measures; not counted as the workers'.
OWN_COMMANDS = frozenset({"info", "exists", "llen", "hlen", "memory|usage", "mget", "ping",
                          "lrange"})
RELEASE_COMMANDS = Counter({"multi": 1, "del": 1, "lpush": 1, "exec": 1})

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFERRED = re.compile(r"Charge \S+ deferred \((?P<why>[^)]*)\)")


# --- The processes: redis-servers, the sandbox provider, a worker ----------------------------


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
            _terminate(self.process)
            self.process = None


@dataclass
class Worker:
    """`celery -A workers worker` (prefork) in a process group of its own, logging to a file."""

    env: dict[str, str]
    log: Path
    concurrency: int = CONCURRENCY
    process: subprocess.Popen[bytes] | None = None
    # Deferrals logged so far, by reason ("open", "half_open", "another task ..."), and when.
    deferrals: Counter[str] = field(default_factory=Counter)
    deferred_at: list[tuple[float, str, str]] = field(default_factory=list)
    # Runs that found their order already charged: a message delivered twice.
    already_succeeded: int = 0
    _offset: int = 0

    def start(self, timeout: float = 60.0) -> None:
        """Start the worker and wait until it says it is ready."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "worker",
             "--pool", "prefork", "--concurrency", str(self.concurrency), "-n", WORKER_NAME,
             "-I", "benchmarks.charges_support", "--loglevel", "INFO", "-f", str(self.log),
             "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while " ready." not in self._text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self._text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the worker and its pool processes."""
        if self.process is not None:
            _terminate(self.process, group=True)
            self.process = None

    def rss(self) -> tuple[int, int]:
        """Return the resident memory in bytes of the main process and of its pool processes."""
        assert self.process is not None
        main = self.process.pid
        children = [pid for pid in _pids() if _parent(pid) == main]
        return _rss(main), sum(_rss(pid) for pid in children)

    def cpu(self) -> tuple[float, float]:
        """Return the CPU seconds used so far by the main process and by its pool processes."""
        assert self.process is not None
        main = self.process.pid
        children = [pid for pid in _pids() if _parent(pid) == main]
        return _cpu(main), sum(_cpu(pid) for pid in children)

    def read_log(self) -> None:
        """Count the deferrals and the repeated charges logged since the last read."""
        with self.log.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            match = DEFERRED.search(line)
            if match:
                reason = _reason(match.group("why"))
                self.deferrals[reason] += 1
                self.deferred_at.append((_logged_at(line), reason, _process(line)))
            elif "already succeeded" in line:
                self.already_succeeded += 1

    @property
    def deferred(self) -> int:
        """Return the deferrals logged so far."""
        return self.deferrals.total()

    def _text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _logged_at(line: str) -> float:
    """Return when a worker log line was written ("[2026-01-02 03:04:05,678: ..."), in s."""
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _process(line: str) -> str:
    """Return the process that wrote a worker log line ("ForkPoolWorker-2")."""
    return line.split("/", 1)[1].split("]", 1)[0] if "/" in line else "?"


def _reason(why: str) -> str:
    """Return a deferral's reason without its details: the circuit's state, or the order's."""
    if why.startswith("circuit "):
        return why.rsplit(" ", 1)[-1]
    return why.split(" (", 1)[0]


def _terminate(process: subprocess.Popen[Any], *, group: bool = False) -> None:
    """Stop a process we started (and its group): SIGTERM, then SIGKILL after 15 s."""
    members = [pid for pid in _pids() if _group(pid) == process.pid] if group else []
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
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


@dataclass
class Lab:
    """The servers every section uses, and clients of them."""

    broker: redis.Redis
    backend: redis.Redis
    store: redis.Redis
    broker_url: str
    backend_url: str
    store_url: str
    sandbox_url: str
    # Sends tasks only: without a result backend it subscribes to no result channel.
    sender: Celery
    workdir: Path

    def worker_env(self, **settings: str) -> dict[str, str]:
        """Return a worker's environment: our servers and the settings given, none inherited."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BREAKER_", "PAYMENT_", "CELERY_"))}
        env.update(
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.backend_url,
            BREAKER_REDIS_URL=self.store_url,
            PAYMENT_PROVIDER_URL=self.sandbox_url,
            PYTHONPATH=str(ROOT),
            **settings,
        )
        return env

    @contextmanager
    def worker(self, name: str, settings: dict[str, str],
               concurrency: int = CONCURRENCY) -> Iterator[Worker]:
        """Run a worker with these settings for the length of the with-block."""
        worker = Worker(self.worker_env(**settings), self.workdir / f"{name}.log", concurrency)
        try:
            worker.start()
            yield worker
        finally:
            worker.stop()


@contextmanager
def lab() -> Iterator[Lab]:
    """Start two redis-servers and the sandbox; stop them all on the way out."""
    with ExitStack() as stack:
        broker_server = stack.enter_context(RedisServer())
        stack.callback(shutil.rmtree, broker_server.dir, ignore_errors=True)
        store_server = stack.enter_context(RedisServer())
        stack.callback(shutil.rmtree, store_server.dir, ignore_errors=True)
        sandbox = SandboxProcess()
        stack.callback(sandbox.stop)
        sandbox.start()
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pb-bench-")))
        broker_url = broker_server.url
        backend_url = broker_url.rsplit("/", 1)[0] + "/1"
        sender = Celery("bench-charges", broker=broker_url, set_as_current=False)
        sender.conf.update(task_serializer="json", accept_content=["json"])
        stack.callback(sender.close)
        broker, backend, store = (redis.Redis.from_url(url)
                                  for url in (broker_url, backend_url, store_server.url))
        for client in (broker, backend, store):
            stack.callback(client.close)
        yield Lab(broker, backend, store, broker_url, backend_url, store_server.url,
                  sandbox.url, sender, workdir)


# --- Sending charges and watching them ------------------------------------------------------


def charge_kwargs(order_id: str, method: str = "card") -> dict[str, Any]:
    """Return the arguments of one charge the sandbox accepts."""
    return {"order_id": order_id, "amount": 1999, "currency": "eur",
            "payment_token": "tok_bench_visa", "payment_method": method}


def enqueue(sender: Celery, task: str, order_ids: Sequence[str], *, queue: str = QUEUE,
            method: str = "card") -> list[str]:
    """Send one charge per order id on one producer; return the task ids."""
    with sender.producer_or_acquire() as producer:
        return [
            sender.send_task(task, kwargs=charge_kwargs(order_id, method), queue=queue,
                             producer=producer).id
            for order_id in order_ids
        ]


def release_staged(broker: redis.Redis) -> None:
    """Move the staged messages onto the worker's queue in one transaction, oldest first.

    Sending thousands of charges takes a while: the worker must see them all at once, and
    the sender must not compete with it for the CPU while it is timed.
    """
    messages = []
    for raw in reversed(broker.lrange(STAGING, 0, -1)):
        message = json.loads(raw)
        message["properties"]["delivery_info"]["routing_key"] = QUEUE
        messages.append(json.dumps(message))
    with broker.pipeline(transaction=True) as pipe:
        pipe.delete(STAGING)
        pipe.lpush(QUEUE, *messages)
        pipe.execute()


def settled(store: redis.Redis, order_ids: Sequence[str]) -> int:
    """Return how many of the orders have a succeeded result in the order book."""
    keys = [f"payments:order:{{{order_id}}}:result" for order_id in order_ids]
    return sum(int(store.exists(*keys[i:i + 5000])) for i in range(0, len(keys), 5000))


def wait_settled(store: redis.Redis, order_ids: Sequence[str], timeout: float,
                 every: float = 0.02, tick: Callable[[int], None] | None = None) -> bool:
    """Wait until every order has its result; False if the timeout ran out first."""
    deadline = time.monotonic() + timeout
    while (done := settled(store, order_ids)) < len(order_ids):
        if time.monotonic() > deadline:
            return False
        if tick is not None:
            tick(done)
        time.sleep(every)
    return True


def command_calls(client: redis.Redis) -> Counter[str]:
    """Return the calls of each command the server has run (scripts' own commands too)."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(value["calls"])
                    for name, value in stats.items()})


def workers_calls(after: Counter[str], before: Counter[str],
                  own: Counter[str] | None = None) -> Counter[str]:
    """Return the calls between two snapshots, less the benchmark's own."""
    delta = after - before - (own or Counter())
    for name in OWN_COMMANDS:
        delta.pop(name, None)
    return delta


# The breaker and the order book send nothing but Lua scripts to the breaker store (and the
# breaker one ZADD when a process first uses it): these are its clients' round trips.
ROUND_TRIPS = ("evalsha", "eval", "script|load", "zadd")


def round_trips(calls: Counter[str]) -> int:
    """Return the round trips in a commandstats delta of the breaker store."""
    return sum(calls[name] for name in ROUND_TRIPS)


def breaker_records(calls: Counter[str]) -> int:
    """Return the outcomes the breaker recorded: in a closed circuit, its only HINCRBY."""
    return calls["hincrby"]


def breaker_admissions(calls: Counter[str]) -> int:
    """Return the admissions the breaker asked Redis for: its script runs less its records.

    Every breaker script reads the circuit with one HMGET, and the order book's never do.
    """
    return calls["hmget"] - calls["hincrby"]


def progress(message: str) -> None:
    """Print a progress line at once."""
    print(f"  .. {message}", flush=True)


def load() -> str:
    """Return the machine's load averages, for the record: the figures depend on them."""
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- Section 1: throughput ------------------------------------------------------------------


@dataclass
class Round:
    """One timed batch of charges through the worker."""

    task: str
    charges: int
    seconds: float
    worker_cpu: float
    store_cpu: float
    store_calls: Counter[str]
    broker_calls: Counter[str]

    @property
    def rate(self) -> float:
        """Return charges per second."""
        return self.charges / self.seconds


def run_round(lab: Lab, worker: Worker, task: str, order_ids: Sequence[str]) -> Round:
    """Stage the charges where the worker does not look, then time it eating them all."""
    enqueue(lab.sender, task, order_ids, queue=STAGING)
    store_before, broker_before = command_calls(lab.store), command_calls(lab.broker)
    cpu_before, store_cpu_before = sum(worker.cpu()), _server_cpu(lab.store)
    started = time.perf_counter()
    release_staged(lab.broker)
    if not wait_settled(lab.store, order_ids, timeout=300):
        raise RuntimeError(f"{task}: {len(order_ids)} charges not done in 300 s")
    seconds = time.perf_counter() - started
    return Round(
        task, len(order_ids), seconds,
        sum(worker.cpu()) - cpu_before, _server_cpu(lab.store) - store_cpu_before,
        workers_calls(command_calls(lab.store), store_before),
        workers_calls(command_calls(lab.broker), broker_before, RELEASE_COMMANDS),
    )


def throughput(lab: Lab, report: Report) -> tuple[float, float]:
    """Time guarded and unguarded rounds alternately, then deferrals.

    Return the median guarded charges per second and the deferrals per second.
    """
    names = {GUARDED_TASK: "guarded", UNGUARDED_TASK: "unguarded"}
    rounds: dict[str, list[Round]] = {task: [] for task in names}
    settings = {"BREAKER_OVERRIDES": json.dumps({WARM: {"timeout": WARM_OPEN_SECONDS}})}
    _, registry = _registry(lab, settings)
    with lab.worker("throughput", settings) as worker:
        progress(f"worker up ({CONCURRENCY} prefork processes); warming up; {load()}")
        warm = [run_round(lab, worker, task, [f"warm-{name}-{i}" for i in range(WARM_UP_CHARGES)])
                for task, name in names.items()]
        slowest = min(r.rate for r in warm)
        charges = int(min(max(slowest * ROUND_SECONDS, ROUND_CHARGES[0]), ROUND_CHARGES[1]))
        progress(f"warm-up {slowest:,.0f} charges/s; {2 * PAIRS} rounds of {charges:,}")
        order = list(names)
        for pair in range(1, PAIRS + 1):
            for task in order:
                name = names[task]
                done = run_round(lab, worker, task,
                                 [f"r{pair}-{name}-{i}" for i in range(charges)])
                rounds[task].append(done)
                progress(f"round {pair}/{PAIRS} {name:9}: {done.charges:,} charges in "
                         f"{done.seconds:.2f} s = {done.rate:,.0f}/s; {load()}")
            # Alternate who goes first, so that a drift of the machine favours neither.
            order.reverse()
        # Enough charges to keep the worker deferring until the circuit closes.
        deferrals = measure_deferrals(lab, worker, registry.get(WARM), "rate",
                                      int(slowest * WARM_OPEN_SECONDS))
        progress(f"deferrals: {deferrals:,.0f}/s for a few seconds of open circuit; {load()}")
    guarded, unguarded = rounds[GUARDED_TASK], rounds[UNGUARDED_TASK]

    def per_charge(rs: list[Round], count: Callable[[Round], float]) -> float:
        return sum(count(r) for r in rs) / sum(r.charges for r in rs)

    def store(count: Callable[[Counter[str]], int]) -> Callable[[Round], float]:
        return lambda r: count(r.store_calls)

    def row(what: str, count: Callable[[Round], float], unit: str = "cmd",
            scale: float = 1.0, target: Target | None = None) -> Row:
        return Row(what, scale * per_charge(guarded, count), scale * per_charge(unguarded, count),
                   "unguarded", unit, target)

    best = {task: max(r.rate for r in rs) for task, rs in rounds.items()}
    median = {task: statistics.median(r.rate for r in rs) for task, rs in rounds.items()}
    us = 1e6
    report.table(
        f"Charges through a prefork worker ({CONCURRENCY} processes) against the sandbox: "
        f"{PAIRS} rounds each of {charges:,}, alternating",
        [
            Row("time per charge, best round", us / best[GUARDED_TASK],
                us / best[UNGUARDED_TASK], "unguarded", "us",
                Target(round(1 / THROUGHPUT_FLOOR, 3))),
            Row("time per charge, median round", us / median[GUARDED_TASK],
                us / median[UNGUARDED_TASK], "unguarded", "us"),
            row("worker CPU per charge (main + pool)", lambda r: r.worker_cpu, "us", us),
            row("breaker store Redis CPU per charge", lambda r: r.store_cpu, "us", us),
            row("breaker store round trips per charge", store(round_trips)),
            row("breaker round trips per charge: outcome", store(breaker_records),
                target=Target(1.0, "ours")),
            row("breaker round trips per charge: admission", store(breaker_admissions)),
            row("broker commands per charge", lambda r: r.broker_calls.total()),
        ],
        notes=[
            f"charges/s, guarded: best {best[GUARDED_TASK]:,.0f}, median "
            f"{median[GUARDED_TASK]:,.0f}; unguarded: best {best[UNGUARDED_TASK]:,.0f}, "
            f"median {median[UNGUARDED_TASK]:,.0f}; guarded/unguarded "
            f"{best[GUARDED_TASK] / best[UNGUARDED_TASK]:.3f}x best, "
            f"{median[GUARDED_TASK] / median[UNGUARDED_TASK]:.3f}x median "
            f"(target >= {THROUGHPUT_FLOOR}x: time per charge <= {1 / THROUGHPUT_FLOOR:.3f}x)",
            "rounds: " + ", ".join(
                f"{names[r.task]} {r.rate:,.0f}/s"
                for pair in zip(guarded, unguarded, strict=True) for r in pair
            ),
            "breaker store round trips: the breaker's scripts and the order book's (begin, "
            "finish); the breaker's admissions: a pool process asks Redis only when its 1 s "
            "cache has run out (after an idle gap), else admits on what the last outcome said",
            "broker commands: broker and result backend (task messages, acks, results, "
            "events), each command of a MULTI block counted",
        ],
    )
    return median[GUARDED_TASK], deferrals


def measure_deferrals(lab: Lab, worker: Worker, circuit: CircuitBreaker, name: str,
                      count: int) -> float:
    """Send count charges of circuit's payment method while it is open; return deferrals/s.

    The circuit opens for WARM_OPEN_SECONDS: what is not deferred by then is charged, and
    the deferred charges are charged soon after; both are done when this returns.
    """
    order_ids = [f"{name}-deferred-{i}" for i in range(count)]
    enqueue(lab.sender, GUARDED_TASK, order_ids, queue=STAGING,
            method=circuit.name.removeprefix("payments."))
    worker.read_log()
    deferred_before = worker.deferred
    circuit.force_open()
    closes_at = time.perf_counter() + WARM_OPEN_SECONDS
    time.sleep(1.1)  # so that no pool process admits a charge on its cached 'closed'
    started = time.perf_counter()
    release_staged(lab.broker)
    while worker.deferred - deferred_before < count and time.perf_counter() < closes_at - 0.3:
        time.sleep(0.05)
        worker.read_log()
    rate = (worker.deferred - deferred_before) / (time.perf_counter() - started)
    if not wait_settled(lab.store, order_ids, timeout=120):
        raise RuntimeError(f"{count} charges not charged in 120 s")
    return rate


def _registry(lab: Lab, settings: dict[str, str]) -> tuple[Settings, BreakerRegistry]:
    """Return a worker's settings and a registry of breakers configured as its are."""
    config = read_settings({"broker_url": lab.broker_url}, environ=lab.worker_env(**settings))
    registry = BreakerRegistry(RedisStore.from_url(lab.store_url),
                               defaults=config.breaker_defaults,
                               overrides=config.breaker_overrides)
    return config, registry


# --- Section 2: the backlog -----------------------------------------------------------------


@dataclass
class Snapshot:
    """What the worker and the servers hold at one moment."""

    rss: tuple[int, int]
    cpu: tuple[float, float]
    broker_memory: int
    store_memory: int
    broker_calls: Counter[str]

    @classmethod
    def take(cls, lab: Lab, worker: Worker) -> Snapshot:
        """Read the worker's RSS and CPU, the servers' memory and command counts now."""
        return cls(worker.rss(), worker.cpu(), _used_memory(lab.broker),
                   _used_memory(lab.store), command_calls(lab.broker))

    def cpu_since(self, earlier: Snapshot, count: int) -> str:
        """Return the worker's CPU time per item between two snapshots, main and pool."""
        main, pool = (now - then for now, then in zip(self.cpu, earlier.cpu, strict=True))
        return (f"{(main + pool) / count * 1e3:.2f} ms (main {main / count * 1e3:.2f}, "
                f"pool {pool / count * 1e3:.2f})")


def open_seconds(deferral_rate: float, count: int, shortest: int = OPEN_SECONDS[0]) -> int:
    """Return a circuit timeout long enough for the worker to defer and fetch count charges."""
    wanted = math.ceil(OPEN_MARGIN * count / deferral_rate + count / FETCH_RATE + 5)
    return min(max(wanted, shortest), OPEN_SECONDS[1])


@dataclass
class Backlog:
    """What one run of the backlog measured."""

    timeout: int
    before: Snapshot
    held: Snapshot
    after: Snapshot
    # Seconds from opening the circuit until the worker held every deferred charge; -1: never.
    all_held: float
    # Seconds from the circuit's timeout to the last charge, and whether all were charged.
    drain: float
    complete: bool
    deferred_open: int
    redeferrals: Counter[str]
    already_succeeded: int
    # Broker memory of the staged charges, counted in before.broker_memory: not the backlog's.
    staged_memory: int
    unacked_memory: int
    result_memory: float
    results: list[dict[str, Any]]
    charges_by_order: Counter[str]
    circuit: dict[str, Any]


def backlog(lab: Lab, deferral_rate: float) -> Backlog:
    """Defer BACKLOG charges while the circuit is open, then time the drain."""
    for client in (lab.broker, lab.backend, lab.store):
        client.flushdb()
    with SandboxControl(lab.sandbox_url) as sandbox:
        sandbox.reset()
    timeout = open_seconds(deferral_rate, BACKLOG)
    settings = {
        "BREAKER_TIMEOUT": str(timeout),
        "BREAKER_OVERRIDES": json.dumps({WARM: {"timeout": WARM_OPEN_SECONDS}}),
    }
    config, registry = _registry(lab, settings)
    card = registry.get(CARD)
    order_ids = [f"backlog-{i}" for i in range(BACKLOG)]
    with lab.worker("backlog", settings) as worker:
        progress(f"worker up for the backlog: breaker_timeout {timeout} s, broker "
                 f"visibility_timeout {config.visibility_timeout:g} s; {load()}")
        _warm_up(lab, worker, registry.get(WARM))
        task_ids = enqueue(lab.sender, GUARDED_TASK, order_ids, queue=STAGING)
        time.sleep(1.5)  # the pool processes' cached view of the circuit runs out
        worker.read_log()
        counted_before = worker.deferrals.copy()
        before = Snapshot.take(lab, worker)
        staged_memory = _memory_usage(lab.broker, STAGING)

        card.force_open()
        opened = time.monotonic()
        closes_at = opened + timeout
        time.sleep(1.1)  # so that no pool process admits a charge on its cached 'closed'
        release_staged(lab.broker)
        progress(f"circuit {CARD} forced open for {timeout} s; {BACKLOG:,} charges released")
        all_held = _wait_held(lab, worker, BACKLOG, opened, closes_at, counted_before.total())
        held = Snapshot.take(lab, worker)
        counted_held = worker.deferrals.copy()
        unacked = (_memory_usage(lab.broker, "unacked")
                   + _memory_usage(lab.broker, "unacked_index"))
        result_memory = _mean_memory(lab.backend,
                                     [f"celery-task-meta-{t}" for t in task_ids[:200]])

        progress(f"waiting for the timeout ({closes_at - time.monotonic():.0f} s) and the drain")
        last_line = [time.monotonic()]

        def tick(done: int) -> None:
            now = time.monotonic()
            if now - last_line[0] >= 5 and now > closes_at:
                last_line[0] = now
                worker.read_log()
                progress(f"draining: {done:,}/{BACKLOG:,} charged, "
                         f"{worker.deferred - counted_held.total():,} re-deferrals, "
                         f"{now - closes_at:.0f} s after the timeout; {load()}")

        complete = wait_settled(lab.store, order_ids, every=0.05, tick=tick,
                                timeout=max(0.0, closes_at - time.monotonic()) + DRAIN_TIMEOUT)
        drain = time.monotonic() - closes_at
        time.sleep(1.0)  # the last acks and results land
        worker.read_log()
        after = Snapshot.take(lab, worker)
        results = _results(lab.backend, task_ids)
        with SandboxControl(lab.sandbox_url) as sandbox:
            ledger = sandbox.ledger()
    return Backlog(
        timeout=timeout, before=before, held=held, after=after, all_held=all_held,
        drain=drain, complete=complete,
        deferred_open=(counted_held - counted_before).total(),
        redeferrals=worker.deferrals - counted_held,
        already_succeeded=worker.already_succeeded,
        staged_memory=staged_memory, unacked_memory=unacked, result_memory=result_memory,
        results=results,
        charges_by_order=Counter(c["order_id"] for c in ledger["charges"]
                                 if c["order_id"].startswith("backlog-")),
        circuit=card.snapshot(),
    )


def report_backlog(report: Report, run: Backlog, steady_rate: float) -> None:
    """Print the backlog's table: the drain against the steady throughput, and the costs."""
    before, held, after = run.before, run.held, run.after
    calls_open = workers_calls(held.broker_calls, before.broker_calls, RELEASE_COMMANDS)
    calls_drain = workers_calls(after.broker_calls, held.broker_calls)
    redeferred = run.redeferrals.total()
    # After the open period every LPUSH is a re-deferral or a message the broker restored.
    restored = calls_drain["lpush"] - redeferred
    deferrals = Counter(
        (r.get("result") or {}).get("deferrals", "?") if r.get("status") == "SUCCESS" else "?"
        for r in run.results
    )
    statuses = Counter(r.get("status", "none") for r in run.results)
    rss_main = held.rss[0] - before.rss[0]
    rss_pool = held.rss[1] - before.rss[1]
    report.table(
        f"{BACKLOG:,} charges deferred while {CARD} is open ({run.timeout} s), then drained "
        "with the provider healthy",
        [Row("drain: the open timeout to the last charge", run.drain, BACKLOG / steady_rate,
             "N/steady throughput", "s")],
        notes=[
            f"drain {'complete' if run.complete else 'NOT complete'}: "
            f"{BACKLOG / run.drain:,.0f} charges/s against {steady_rate:,.0f}/s steady; "
            f"worker CPU per charge {after.cpu_since(held, BACKLOG)}",
            f"all {BACKLOG:,} deferred and held by the worker {run.all_held:.1f} s after the "
            f"circuit opened ({BACKLOG / run.all_held:,.0f}/s)" if run.all_held > 0 else
            f"NOT all deferred and held before the timeout: {run.deferred_open:,} deferred",
            f"worker CPU per deferral {held.cpu_since(before, BACKLOG)}",
            f"worker memory (RSS) per deferred charge: {_kb((rss_main + rss_pool) / BACKLOG)}: "
            f"main process {_kb(rss_main / BACKLOG)} (it holds the countdowns), pool processes "
            f"{_kb(rss_pool / BACKLOG)} ({_mb(rss_pool)} in all: they hold no deferred charge; "
            f"Celery's retry path grows their heap once, to a plateau); RSS "
            f"{_mb(sum(before.rss))} before, {_mb(sum(held.rss))} holding the backlog, "
            f"{_mb(sum(after.rss))} after the drain",
            f"Redis memory per deferred charge: broker and result backend "
            f"{_kb((held.broker_memory - before.broker_memory + run.staged_memory) / BACKLOG)} "
            f"(unacked message "
            f"{_kb(run.unacked_memory / BACKLOG)}, RETRY result {_kb(run.result_memory)}), "
            f"breaker store {_kb((held.store_memory - before.store_memory) / BACKLOG)}",
            f"messages per charge in the open period: {calls_open['lpush'] / BACKLOG:.3f} "
            f"deferred copies (LPUSH; the charge's own send not counted), "
            f"{calls_open['publish'] / BACKLOG:.2f} events and result notices (PUBLISH)",
            f"re-deferrals after the timeout: {redeferred:,} ({_counts(run.redeferrals)}); "
            f"deferrals per charge in the results: {_counts(deferrals)}",
            f"messages restored by the broker (visibility timeout): {max(0, restored):,}; "
            f"runs that found their order already charged: {run.already_succeeded:,}",
            f"results: {_counts(statuses)}; sandbox: {len(run.charges_by_order):,} of the "
            f"{BACKLOG:,} orders charged, "
            f"{sum(n > 1 for n in run.charges_by_order.values())} more than once",
            f"circuit {CARD} now {run.circuit['state']}; transitions "
            f"{_counts(Counter(run.circuit['transitions']))}; {load()}",
        ],
    )


# --- Section 3: the half-open wake-up ------------------------------------------------------


def wake_up(lab: Lab, report: Report, steady_rate: float, deferral_rate: float) -> None:
    """Defer a backlog on more pool processes than probe slots; count the wake-up's re-deferrals."""
    for client in (lab.broker, lab.backend, lab.store):
        client.flushdb()
    timeout = open_seconds(deferral_rate, WAKE_BACKLOG, WAKE_SHORTEST_OPEN)
    settings = {"BREAKER_TIMEOUT": str(timeout)}
    config, registry = _registry(lab, settings)
    card = registry.get(CARD)
    order_ids = [f"wake-{i}" for i in range(WAKE_BACKLOG)]
    with lab.worker("wake-up", settings, WAKE_CONCURRENCY) as worker:
        progress(f"worker up with {WAKE_CONCURRENCY} pool processes, breaker_timeout "
                 f"{timeout} s; {load()}")
        warm = [f"wake-warm-{i}" for i in range(20 * WAKE_CONCURRENCY)]
        enqueue(lab.sender, GUARDED_TASK, warm)
        wait_settled(lab.store, warm, timeout=60)
        enqueue(lab.sender, GUARDED_TASK, order_ids, queue=STAGING)
        time.sleep(1.1)  # the pool processes' cached view of the circuit runs out
        worker.read_log()
        before = worker.deferred
        card.force_open()
        opened = time.monotonic()
        closes_at = opened + timeout
        time.sleep(1.1)
        release_staged(lab.broker)
        all_held = _wait_held(lab, worker, WAKE_BACKLOG, opened, closes_at, before)
        worker.read_log()
        held = worker.deferrals.copy()
        held_at = len(worker.deferred_at)
        progress(f"{WAKE_BACKLOG:,} deferred and held; waiting for the timeout and the drain")
        complete = wait_settled(lab.store, order_ids, every=0.05,
                                timeout=max(0.0, closes_at - time.monotonic()) + DRAIN_TIMEOUT)
        drain = time.monotonic() - closes_at
        time.sleep(1.0)
        worker.read_log()
    again = worker.deferred_at[held_at:]
    redeferred = len(again)
    burst = max(t for t, _, _ in again) - min(t for t, _, _ in again) if again else 0.0
    report.table(
        f"Half-open wake-up: {WAKE_BACKLOG:,} charges deferred ({timeout} s open), "
        f"{WAKE_CONCURRENCY} pool processes against {config.breaker_half_open_max_calls} "
        "probe slots",
        [Row("drain: the open timeout to the last charge", drain,
             WAKE_BACKLOG / steady_rate, "N/steady throughput", "s")],
        notes=[
            f"re-deferrals after the timeout: {redeferred:,} "
            f"({redeferred / WAKE_BACKLOG:.1%} of the backlog; "
            f"{_counts(worker.deferrals - held)}), by "
            f"{len({p for _, _, p in again})} of {WAKE_CONCURRENCY} processes over "
            f"{burst:.2f} s",
            f"drain {'complete' if complete else 'NOT complete'}; "
            + (f"all deferred and held {all_held:.1f} s after opening" if all_held > 0
               else "NOT all deferred and held before the timeout"),
        ],
    )


def _warm_up(lab: Lab, worker: Worker, warm: CircuitBreaker) -> None:
    """Charge and defer a few hundred charges, so that the baseline is of a warm worker."""
    charged = [f"warm-{i}" for i in range(40)]
    enqueue(lab.sender, GUARDED_TASK, charged)
    wait_settled(lab.store, charged, timeout=60)
    measure_deferrals(lab, worker, warm, "warm", WARM_DEFERRALS)
    progress(f"warmed up: {len(charged)} charged, {WARM_DEFERRALS} deferred and charged")


def _wait_held(lab: Lab, worker: Worker, count: int, opened: float, closes_at: float,
               deferred_before: int) -> float:
    """Wait until the worker holds count deferred charges; return when (s after opening), or -1."""
    last = time.monotonic()
    while time.monotonic() < closes_at - 0.5:
        worker.read_log()
        deferred = worker.deferred - deferred_before
        held = int(lab.broker.hlen("unacked"))
        if deferred >= count and held == count and int(lab.broker.llen(QUEUE)) == 0:
            return time.monotonic() - opened
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            progress(f"deferred {deferred:,}/{count:,}, held by the worker {held:,}, "
                     f"{last - opened:.0f} s after opening; {load()}")
        time.sleep(0.1)
    return -1.0


def _server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _memory_usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def _mean_memory(client: redis.Redis, keys: Sequence[str]) -> float:
    """Return the mean memory of the keys that exist, 0 if none does."""
    sizes = [size for size in (_memory_usage(client, key) for key in keys) if size]
    return sum(sizes) / len(sizes) if sizes else 0.0


def _results(client: redis.Redis, task_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Return the stored result of each task ({} where there is none)."""
    results: list[dict[str, Any]] = []
    for i in range(0, len(task_ids), 2000):
        keys = [f"celery-task-meta-{t}" for t in task_ids[i:i + 2000]]
        results.extend(json.loads(raw) if raw else {} for raw in client.mget(keys))
    return results


def _counts(counter: Counter[Any]) -> str:
    shown = [f"{key}: {n:,}" for key, n in sorted(counter.items(), key=str) if n]
    return ", ".join(shown) or "none"


def _kb(size: float) -> str:
    return f"{size / 1024:,.2f} KB"


def _mb(size: float) -> str:
    return f"{size / 2**20:,.1f} MB"


def main() -> None:
    """Run the three sections and print their tables."""
    # A SIGTERM (a timeout, CI) unwinds through the finally blocks that stop our processes.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    report = Report()
    try:
        with lab() as servers:
            progress(f"redis-servers up (broker {servers.broker_url}, breaker store "
                     f"{servers.store_url}); sandbox at {servers.sandbox_url}; {load()}")
            rate, deferrals = throughput(servers, report)
            report_backlog(report, backlog(servers, deferrals), rate)
            wake_up(servers, report, rate, deferrals)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.verdicts()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
