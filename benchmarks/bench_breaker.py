"""Compare a guarded call's cost with pybreaker's, interlock-cb's and a hand-written floor.

Sections, each measured side by side in one run: in process (MemoryStore, with each policy
on), on a private redis-server (RedisStore against pybreaker's CircuitRedisStorage and
interlock-cb's RedisStorage, with each policy on), a dependency that fails every other
call, processes sharing a circuit to a dead dependency, and four threads sharing one
breaker around a call that sleeps.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import interlock
import pybreaker
import redis
from interlock.integrations.redis import RedisStorage

from benchmarks.harness import Report, Row, Run, Target, best_per_call, calibrate, loop, statement
from breaker import CircuitBreaker, CircuitBreakerOpenError, MemoryStore, RedisStore
from tests.redis_server import RedisServer

P = ParamSpec("P")
R = TypeVar("R")

# Long enough that an opened circuit stays open for the whole run.
OPEN_FOR_SECONDS = 3600
# RedisStore's default: how long a process acts on what the server last told it.
STALENESS_SECONDS = 1.0
# After its cache runs out a process asks the server once before it admits: allow for
# that round trip, and for a busy scheduler, in the reset() bound.
ROUND_TRIP_ALLOWANCE = 0.05

# Each policy beyond ADR-003, on its own, as keyword arguments of CircuitBreaker. The
# thresholds are out of reach of a healthy call: what is timed is the rule's upkeep.
POLICIES: dict[str, dict[str, Any]] = {
    "backoff + Retry-After cap": {"open_backoff": 2.0, "max_timeout_seconds": 7200.0},
    "failure-rate window": {"failure_rate_threshold": 0.5, "minimum_calls": 20},
    "slow-call rule": {"slow_call_seconds": 5.0, "slow_call_rate_threshold": 0.5},
}


def interlock_config(wait_seconds: float) -> interlock.Config:
    """Return interlock-cb settings that trip after 3 failures in a row, like ADR-003's."""
    return interlock.Config(
        failure_rate_threshold=1.0, minimum_number_of_calls=3, window_size=3,
        wait_duration_in_open=wait_seconds,
    )


def trivial() -> None:
    """Stand for the dependency: nothing but the call itself."""


class LockFloor:
    """The least a thread-safe breaker does per call: a lock to admit, a lock to record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = True
        self._failures = 0

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Check the circuit is closed, call fn, reset the failure count."""
        with self._lock:
            if not self._closed:
                raise RuntimeError("circuit open")
        result = fn(*args, **kwargs)
        with self._lock:
            self._failures = 0
        return result


class AcquireReleaseFloor(LockFloor):
    """The same floor written with acquire()/release(), cheaper than a with-statement."""

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Check the circuit is closed, call fn, reset the failure count."""
        lock = self._lock
        lock.acquire()
        try:
            closed = self._closed
        finally:
            lock.release()
        if not closed:
            raise RuntimeError("circuit open")
        result = fn(*args, **kwargs)
        lock.acquire()
        try:
            self._failures = 0
        finally:
            lock.release()
        return result


def in_process(report: Report) -> None:
    """Time a guarded trivial call: ours on MemoryStore, pybreaker, the floor, no breaker."""
    ours = CircuitBreaker("bench.memory", store=MemoryStore())
    pb = pybreaker.CircuitBreaker()
    ours_open = CircuitBreaker(
        "bench.memory.open", store=MemoryStore(), timeout_seconds=OPEN_FOR_SECONDS
    )
    ours_open.force_open()
    pb_open = pybreaker.CircuitBreaker(reset_timeout=OPEN_FOR_SECONDS)
    pb_open.open()
    with_policy = {
        label: CircuitBreaker(f"bench.memory.{i}", store=MemoryStore(), **settings)
        for i, (label, settings) in enumerate(POLICIES.items())
    }
    namespace: dict[str, Any] = {
        **{f"policy_{i}": cb for i, cb in enumerate(with_policy.values())},
        "il": interlock.CircuitBreaker(name="bench.interlock", config=interlock_config(3600)),
        "trivial": trivial,
        "ours": ours,
        "pb": pb,
        "floor": LockFloor(),
        "floor_ar": AcquireReleaseFloor(),
        "ours_decorated": ours(trivial),
        "pb_decorated": pb(trivial),
        "ours_open": ours_open,
        "pb_open": pb_open,
        "OursOpen": CircuitBreakerOpenError,
        "PbOpen": pybreaker.CircuitBreakerError,
    }
    runs = {
        "ours": statement("ours.call(trivial)", namespace),
        **{label: statement(f"policy_{i}.call(trivial)", namespace)
           for i, label in enumerate(with_policy)},
        "interlock": statement("il.call(trivial)", namespace),
        "pybreaker": statement("pb.call(trivial)", namespace),
        "floor": statement("floor.call(trivial)", namespace),
        "floor_ar": statement("floor_ar.call(trivial)", namespace),
        "bare": statement("trivial()", namespace),
        "ours_decorated": statement("ours_decorated()", namespace),
        "pb_decorated": statement("pb_decorated()", namespace),
        "ours_two_step": statement("permit = ours.allow()\ntrivial()\npermit.done()", namespace),
        "pb_calling": statement("with pb.calling():\n    trivial()", namespace),
        "ours_rejected": statement(
            "try:\n    ours_open.call(trivial)\nexcept OursOpen:\n    pass", namespace
        ),
        "pb_rejected": statement(
            "try:\n    pb_open.call(trivial)\nexcept PbOpen:\n    pass", namespace
        ),
    }
    # Many short repeats: on a busy machine, more chances of a window nobody disturbs.
    best = best_per_call(runs, repeats=20, seconds=0.05)
    ns = {name: seconds * 1e9 for name, seconds in best.items()}
    report.table(
        "In process, ns per call (best of 20 repeats of ~0.05 s, interleaved)",
        [
            Row("call(), closed: vs pybreaker", ns["ours"], ns["pybreaker"], "pybreaker",
                target=Target(0.5)),
            Row("call(), closed: vs floor", ns["ours"], ns["floor"], "floor",
                target=Target(1.5)),
            Row("call(), closed: vs floor with acquire()/release()", ns["ours"],
                ns["floor_ar"], "floor a/r"),
            Row("call(), closed: vs interlock-cb (in process)", ns["ours"], ns["interlock"],
                "interlock-cb"),
            *(Row(f"call(), closed, {label} on: vs ADR-003 only", ns[label], ns["ours"],
                  "ADR-003") for label in with_policy),
            Row("the trivial function, called bare", ns["bare"]),
            Row("decorated function, closed", ns["ours_decorated"], ns["pb_decorated"],
                "pybreaker"),
            Row("allow()/done() vs pybreaker calling()", ns["ours_two_step"],
                ns["pb_calling"], "pybreaker"),
            Row("rejected call while open", ns["ours_rejected"], ns["pb_rejected"],
                "pybreaker"),
        ],
        notes=[
            "floor: `with lock` to check CLOSED, the call, `with lock` to reset a failure "
            "count; floor a/r: the same with lock.acquire()/release()",
        ],
    )


class CountingRedis(redis.Redis):
    """A Redis client that counts the commands it sends, by name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: Counter[str] = Counter()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """Count the command, then send it."""
        self.sent[str(args[0]).lower()] += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class RedisFigures:
    """What one guarded call costs on Redis, averaged over the timed loops."""

    calls_per_second: float
    sent: float
    executed: float
    server_us: float
    server_cpu_us: float
    executed_by_command: dict[str, float]


def command_stats(admin: redis.Redis) -> dict[str, tuple[int, int]]:
    """Return (calls, usec) per command from INFO commandstats, leaving out INFO itself."""
    stats: dict[str, dict[str, Any]] = admin.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(fields["calls"]), int(fields["usec"]))
        for name, fields in stats.items()
        if name != "cmdstat_info"
    }


def server_cpu_seconds(admin: redis.Redis) -> float:
    """Return the CPU time the Redis server has used, user and system, from INFO cpu."""
    cpu: dict[str, Any] = admin.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


@dataclass(frozen=True)
class Loops:
    """How long to time a loop on Redis: repeats of about seconds each."""

    repeats: int
    seconds: float


CLOSED_LOOPS = Loops(repeats=5, seconds=0.2)
# Two cache periods and more, so that the refreshes an open circuit costs are counted.
OPEN_LOOPS = Loops(repeats=4, seconds=0.5)


def measure_redis(
    candidates: Mapping[str, tuple[Run, CountingRedis]], admin: redis.Redis, loops: Loops
) -> dict[str, RedisFigures]:
    """Time loops of guarded calls and count the Redis commands they cause.

    The candidates' repeats are interleaved, each after one untimed call: a process that
    keeps calling would not have let its cache run out while the others took their turn.
    A lone candidate's repeats run back to back, so the refreshes its cache costs every
    staleness_seconds are counted. Commands are counted twice: as sent by the client (one
    round trip each), and as executed by the server from INFO commandstats deltas, which
    also counts every command a Lua script runs inside its one EVALSHA. The server's CPU
    time (INFO cpu) adds what commandstats leaves out: reading, parsing and answering.
    """
    counts = {name: calibrate(run, loops.seconds) for name, (run, _) in candidates.items()}
    best = dict.fromkeys(candidates, math.inf)
    sent = {name: Counter[str]() for name in candidates}
    executed = {name: Counter[str]() for name in candidates}
    usec = {name: Counter[str]() for name in candidates}
    cpu = dict.fromkeys(candidates, 0.0)
    for _ in range(loops.repeats):
        for name, (run, client) in candidates.items():
            run(1)
            sent_before = client.sent.copy()
            before = command_stats(admin)
            cpu_before = server_cpu_seconds(admin)
            elapsed = run(counts[name])
            cpu[name] += server_cpu_seconds(admin) - cpu_before
            after = command_stats(admin)
            sent[name].update(client.sent - sent_before)
            for command, (total, spent) in after.items():
                total_before, spent_before = before.get(command, (0, 0))
                executed[name][command] += total - total_before
                usec[name][command] += spent - spent_before
            best[name] = min(best[name], elapsed / counts[name])
    figures = {}
    for name in candidates:
        calls = counts[name] * loops.repeats
        figures[name] = RedisFigures(
            calls_per_second=1 / best[name],
            sent=sum(sent[name].values()) / calls,
            executed=sum(executed[name].values()) / calls,
            # Time of the commands sent: an EVALSHA's includes the commands its script ran.
            server_us=sum(usec[name][command] for command in sent[name]) / calls,
            server_cpu_us=cpu[name] * 1e6 / calls,
            executed_by_command={
                command: count / calls
                for command, count in executed[name].most_common() if count
            },
        )
    return figures


def guard(breaker: CircuitBreaker) -> Callable[[], None]:
    """Return a call of trivial through breaker that swallows a refusal."""

    def call() -> None:
        # Not contextlib.suppress: its with-statement would add its own cost to the loop.
        try:  # noqa: SIM105
            breaker.call(trivial)
        except CircuitBreakerOpenError:
            pass

    return call


def guard_pybreaker(breaker: pybreaker.CircuitBreaker) -> Callable[[], None]:
    """Return a call of trivial through a pybreaker that swallows a refusal."""

    def call() -> None:
        # Not contextlib.suppress: its with-statement would add its own cost to the loop.
        try:  # noqa: SIM105
            breaker.call(trivial)
        except pybreaker.CircuitBreakerError:
            pass

    return call


def seconds_until_admitted(
    guarded_call: Callable[[Callable[[], None]], object], refused: type[Exception]
) -> float:
    """Call through a breaker in a busy loop; return the seconds until a call got through."""
    admitted_at: list[float] = []

    def dependency() -> None:
        admitted_at.append(time.perf_counter())

    start = time.perf_counter()
    while not admitted_at:
        try:
            guarded_call(dependency)
        except refused:
            continue
    return admitted_at[0] - start


def ours_on_redis(name: str, client: redis.Redis, **settings: Any) -> CircuitBreaker:
    """Return our breaker called name, its circuit in Redis through client."""
    store = RedisStore(client, staleness_seconds=STALENESS_SECONDS)
    return CircuitBreaker(name, store=store, timeout_seconds=OPEN_FOR_SECONDS, **settings)


def interlock_on_redis(name: str, client: redis.Redis) -> interlock.CircuitBreaker:
    """Return an interlock-cb breaker sharing its state through RedisStorage (counts local)."""
    return interlock.CircuitBreaker(
        name=name, config=interlock_config(OPEN_FOR_SECONDS), storage=RedisStorage(client)
    )


def guard_interlock(breaker: interlock.CircuitBreaker) -> Callable[[], None]:
    """Return a call of trivial through an interlock-cb breaker that swallows a refusal."""

    def call() -> None:
        # Not contextlib.suppress: its with-statement would add its own cost to the loop.
        try:  # noqa: SIM105
            breaker.call(trivial)
        except interlock.CircuitOpenError:
            pass

    return call


def pybreaker_on_redis(namespace: str, client: redis.Redis) -> pybreaker.CircuitBreaker:
    """Return a pybreaker on CircuitRedisStorage; client must not decode responses."""
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace=namespace)
    return pybreaker.CircuitBreaker(reset_timeout=OPEN_FOR_SECONDS, state_storage=storage)


def reset_seen_after(url: str) -> tuple[float, float]:
    """Return how long after one process's reset() another process's calls go through.

    The other process learns the open state from the server just before the reset, the
    worst case for its cache: ours keeps it for staleness_seconds, pybreaker never caches.
    """
    operator = ours_on_redis("bench.redis.reset", redis.Redis.from_url(url))
    worker = ours_on_redis("bench.redis.reset", redis.Redis.from_url(url))
    operator.force_open()
    with contextlib.suppress(CircuitBreakerOpenError):
        worker.call(trivial)
    operator.reset()
    ours_delay = seconds_until_admitted(worker.call, CircuitBreakerOpenError)

    pb_operator = pybreaker_on_redis("bench-reset", redis.Redis.from_url(url))
    pb_worker = pybreaker_on_redis("bench-reset", redis.Redis.from_url(url))
    pb_operator.open()
    with contextlib.suppress(pybreaker.CircuitBreakerError):
        pb_worker.call(trivial)
    pb_operator.close()
    pb_delay = seconds_until_admitted(pb_worker.call, pybreaker.CircuitBreakerError)
    return ours_delay, pb_delay


def on_redis(report: Report) -> None:
    """Count commands and calls/s on a private redis-server: ours, pybreaker's, interlock-cb's."""
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        # Clients without decode_responses, which CircuitRedisStorage needs; one each, so
        # that each candidate's commands are counted apart.
        def client() -> CountingRedis:
            return CountingRedis(host="127.0.0.1", port=server.port)

        ours_client, pb_client, il_client = client(), client(), client()
        ours_open = ours_on_redis("bench.redis.open", ours_client)
        ours_open.force_open()
        pb_open = pybreaker_on_redis("bench-open", pb_client)
        pb_open.open()
        ours = ours_on_redis("bench.redis", ours_client)
        pb = pybreaker_on_redis("bench-closed", pb_client)
        il = interlock_on_redis("bench-interlock", il_client)
        policy_clients = {label: client() for label in POLICIES}
        candidates: dict[str, tuple[Run, CountingRedis]] = {
            "ours": (loop(guard(ours)), ours_client),
            "pybreaker": (loop(guard_pybreaker(pb)), pb_client),
            "interlock": (loop(guard_interlock(il)), il_client),
        }
        for i, (label, settings) in enumerate(POLICIES.items()):
            policy = ours_on_redis(f"bench.redis.{i}", policy_clients[label], **settings)
            candidates[label] = (loop(guard(policy)), policy_clients[label])
        closed_figures = measure_redis(candidates, admin, CLOSED_LOOPS)
        refused = measure_redis({"ours": (loop(guard(ours_open)), ours_client)}, admin,
                                OPEN_LOOPS)["ours"]
        pb_refused = measure_redis({"pybreaker": (loop(guard_pybreaker(pb_open)), pb_client)},
                                   admin, OPEN_LOOPS)["pybreaker"]
        ours_delay, pb_delay = reset_seen_after(server.url)
        for each in (admin, ours_client, pb_client, il_client, *policy_clients.values()):
            each.close()
    closed, pb_closed = closed_figures["ours"], closed_figures["pybreaker"]
    il_closed = closed_figures["interlock"]
    report.table(
        f"Redis (private redis-server; RedisStore staleness_seconds={STALENESS_SECONDS:g}), "
        "per guarded call",
        [
            Row("closed: commands sent (round trips)", closed.sent, pb_closed.sent,
                "pybreaker", "cmd", Target(0.01, "ours")),
            Row("  interlock-cb: commands sent", il_closed.sent, unit="cmd"),
            Row("closed: commands Redis ran, Lua's included", closed.executed,
                pb_closed.executed, "pybreaker", "cmd"),
            Row("closed: time in those commands (commandstats)", closed.server_us,
                pb_closed.server_us, "pybreaker", "us"),
            Row("closed: Redis server CPU (INFO cpu)", closed.server_cpu_us,
                pb_closed.server_cpu_us, "pybreaker", "us"),
            Row("closed: calls/s (higher is better)", closed.calls_per_second,
                pb_closed.calls_per_second, "pybreaker", "/s"),
            Row("closed: calls/s vs interlock-cb (higher is better)", closed.calls_per_second,
                il_closed.calls_per_second, "interlock-cb", "/s"),
            Row("closed: time per call vs interlock-cb", 1e6 / closed.calls_per_second,
                1e6 / il_closed.calls_per_second, "interlock-cb", "us", Target(2.0)),
            *(Row(f"closed, {label} on: time per call vs ADR-003 only",
                  1e6 / closed_figures[label].calls_per_second, 1e6 / closed.calls_per_second,
                  "ADR-003", "us") for label in POLICIES),
            *(Row(f"closed, {label} on: commands sent", closed_figures[label].sent,
                  unit="cmd") for label in POLICIES),
            Row("open, rejected: commands sent", refused.sent, pb_refused.sent,
                "pybreaker", "cmd", Target(0.01, "ours")),
            Row("open, rejected: commands Redis ran", refused.executed,
                pb_refused.executed, "pybreaker", "cmd"),
            Row("open, rejected: calls/s (higher is better)", refused.calls_per_second,
                pb_refused.calls_per_second, "pybreaker", "/s"),
            Row("reset() by another process seen after", ours_delay, unit="s",
                target=Target(STALENESS_SECONDS + ROUND_TRIP_ALLOWANCE, "ours")),
            Row("  pybreaker: reads the state on every call", pb_delay, unit="s"),
        ],
        notes=[
            f"commands Redis ran per closed call, ours: {_breakdown(closed)}",
            f"commands Redis ran per closed call, pybreaker: {_breakdown(pb_closed)}",
            f"commands Redis ran per closed call, interlock-cb: {_breakdown(il_closed)}",
            f"commands Redis ran per rejected call, pybreaker: {_breakdown(pb_refused)}",
            "interlock-cb counts outcomes in each process and shares only the state; "
            "ours counts every failure on the server",
        ],
    )


class Flaky:
    """A dependency that fails every other call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls % 2:
            raise ProviderDown


class ProviderDown(Exception):
    """The dependency failed."""


def guard_flaky(call: Callable[[Callable[[], None]], object], flaky: Flaky) -> Callable[[], None]:
    """Return a call of flaky through a breaker's call that swallows its failures."""

    def guarded() -> None:
        # Not contextlib.suppress: its with-statement would add its own cost to the loop.
        try:  # noqa: SIM105
            call(flaky)
        except ProviderDown:
            pass

    return guarded


def flaky_dependency(report: Report) -> None:
    """Time a dependency that fails one call in two: every failure is a command for ours."""
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)

        def client() -> CountingRedis:
            return CountingRedis(host="127.0.0.1", port=server.port)

        clients = {name: client() for name in ("ours", "window", "pybreaker", "interlock")}
        # Thresholds a one-in-two failure share never reaches: what is timed is the upkeep.
        ours = ours_on_redis("bench.flaky", clients["ours"])
        window = ours_on_redis("bench.flaky.window", clients["window"],
                               failure_rate_threshold=0.9, minimum_calls=10)
        pb = pybreaker_on_redis("bench-flaky", clients["pybreaker"])
        il = interlock_on_redis("bench-flaky-interlock", clients["interlock"])
        figures = measure_redis(
            {
                "ours": (loop(guard_flaky(ours.call, Flaky())), clients["ours"]),
                "window": (loop(guard_flaky(window.call, Flaky())), clients["window"]),
                "pybreaker": (loop(guard_flaky(pb.call, Flaky())), clients["pybreaker"]),
                "interlock": (loop(guard_flaky(il.call, Flaky())), clients["interlock"]),
            },
            admin, CLOSED_LOOPS,
        )
        for each in (admin, *clients.values()):
            each.close()
    ours_f, window_f = figures["ours"], figures["window"]
    report.table(
        "Redis, a dependency that fails every other call (the circuit stays closed)",
        [
            Row("commands sent per call", ours_f.sent, figures["pybreaker"].sent, "pybreaker",
                "cmd"),
            Row("  interlock-cb: commands sent per call", figures["interlock"].sent, unit="cmd"),
            Row("calls/s (higher is better)", ours_f.calls_per_second,
                figures["interlock"].calls_per_second, "interlock-cb", "/s"),
            Row("failure-rate window on: time in commands per call", window_f.server_us,
                ours_f.server_us, "ADR-003", "us"),
            Row("failure-rate window on: commands Redis ran per call", window_f.executed,
                ours_f.executed, "ADR-003", "cmd"),
            Row("failure-rate window on: calls/s (higher is better)", window_f.calls_per_second,
                ours_f.calls_per_second, "ADR-003", "/s"),
        ],
        notes=[
            f"commands Redis ran per call, ADR-003: {_breakdown(ours_f)}",
            f"commands Redis ran per call, failure-rate window: {_breakdown(window_f)}",
        ],
    )


def dead_calls(
    breakers: list[Any], refused: type[Exception], rounds: int = 25
) -> int:
    """Return the calls that reach a dead dependency, the processes taking turns."""
    reached = 0

    def dead() -> None:
        nonlocal reached
        reached += 1
        raise ProviderDown

    for _ in range(rounds):
        for breaker in breakers:
            with contextlib.suppress(refused, ProviderDown):
                breaker.call(dead)
    return reached


def dead_dependency(report: Report, processes: int = 4) -> None:
    """Count the calls that reach a dead dependency when processes share one circuit."""
    with RedisServer() as server:
        clients = [redis.Redis.from_url(server.url) for _ in range(3 * processes)]
        ours = [ours_on_redis("bench.dead", clients[i]) for i in range(processes)]
        il = [interlock_on_redis("bench-dead", clients[processes + i])
              for i in range(processes)]
        pb = [pybreaker_on_redis("bench-dead", clients[2 * processes + i])
              for i in range(processes)]
        for breaker in (*ours, *il, *pb):
            # Each process has called once while the dependency was up: it knows CLOSED.
            breaker.call(trivial)
        ours_reached = dead_calls(ours, CircuitBreakerOpenError)
        il_reached = dead_calls(il, interlock.CircuitOpenError)
        pb_reached = dead_calls(pb, pybreaker.CircuitBreakerError)
        for breaker in ours:
            breaker.store.flush()
        for each in clients:
            each.close()
    report.table(
        f"{processes} processes share one circuit (3 failures open it); the dependency dies",
        [
            Row("calls that reach the dead dependency", ours_reached, il_reached,
                "interlock-cb", "", Target(1.0)),
            Row("  pybreaker (state and count in Redis, no atomicity)", pb_reached, unit=""),
        ],
        notes=["the processes take turns, each with its own Redis connection and store"],
    )


def _breakdown(figures: RedisFigures) -> str:
    return ", ".join(
        f"{command} {per_call:.2f}" for command, per_call in figures.executed_by_command.items()
        if per_call >= 0.005
    )


def concurrency(call: Callable[[Callable[[], None]], None], threads: int, calls_each: int
                ) -> tuple[float, int]:
    """Return calls/s and the most calls in flight at once, threads calling a 1 ms sleep."""
    lock = threading.Lock()
    in_flight = most = 0

    def sleeper() -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.001)
        with lock:
            in_flight -= 1

    start_together = threading.Barrier(threads + 1)

    def worker() -> None:
        start_together.wait()
        for _ in range(calls_each):
            call(sleeper)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    start_together.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    return threads * calls_each / (time.perf_counter() - start), most


def threaded(report: Report, threads: int = 4, calls_each: int = 200) -> None:
    """Share one breaker between threads: ours holds no lock around the guarded call."""
    ours = CircuitBreaker("bench.threads", store=MemoryStore())
    pb = pybreaker.CircuitBreaker()
    ours_rate, ours_most = concurrency(ours.call, threads, calls_each)
    pb_rate, pb_most = concurrency(pb.call, threads, calls_each)
    report.table(
        f"{threads} threads sharing one in-process breaker, guarded function sleeps 1 ms",
        [
            Row("calls/s (higher is better)", ours_rate, pb_rate, "pybreaker", "/s"),
            Row("most guarded calls in flight at once", ours_most, pb_most, "pybreaker", ""),
        ],
    )


def main() -> None:
    """Measure and print the three sections, then the verdict on each target."""
    report = Report()
    in_process(report)
    on_redis(report)
    flaky_dependency(report)
    dead_dependency(report)
    threaded(report)
    report.verdicts()
