"""Charges refused by their breaker wait here, in Redis, until it lets calls through again.

A charge rescheduled with a countdown is a message that a worker receives at once and holds in
memory until it is due, and that wakes, is refused and is rescheduled again every open period.
A charge refused by its breaker is parked instead, with the same countdown: its next message
goes into the sorted sets of that breaker, and the workers' releasers send it when the breaker
lets it through: in CLOSED at once, due or not (the circuit recovered, or an operator reset
it); in HALF_OPEN once due, as many as there are probe slots; in OPEN never; and whatever the
state when its deadline comes.

Keys (one cluster hash slot per breaker):
  payments:parked:{<breaker>}            sorted set: member = the charge's next message (a
                                         Celery signature as JSON), score = when it is due
  payments:parked:{<breaker>}:deadlines  the same members, score = the charge's deadline
  payments:parked:{<breaker>}:lock       the releaser sending that breaker's charges now
  payments:parked:index                  set: the breakers that have parked charges

Release is at least once: a message is removed from the set only after it was published, so
a releaser that dies in between leaves it to be sent again (the order book makes a second
copy of a charge harmless).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.cluster

from breaker import CircuitState

log = logging.getLogger("workers.parking")

INDEX_KEY = "payments:parked:index"
# How long one releaser may work on a breaker's charges before another may take over.
LOCK_SECONDS = 10.0
# Charges sent per breaker and pass while it is closed: a backlog drains over passes run back
# to back, each well within the lock's lease, instead of one burst that would outlast it.
RELEASE_BATCH = 500

# KEYS[1] due set, KEYS[2] deadlines set, KEYS[3] the index (where all keys may go in one
# script: not on a Cluster); ARGV[1] member, ARGV[2] due, ARGV[3] deadline, ARGV[4] breaker.
PARK = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if KEYS[3] then redis.call('SADD', KEYS[3], ARGV[4]) end
return 1
"""

# KEYS[1] due set, KEYS[2] deadlines set, KEYS[3] lock; ARGV[1] releaser id, ARGV[2] lock ms,
# ARGV[3] now (unix s), ARGV[4] how many charges the breaker's state lets through, ARGV[5]
# '1' if they may go before they are due (CLOSED).
# Reply: the members to send, those past their deadline first; {} while another releaser
# holds the lock.
TAKE = """
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) == false then
  if redis.call('GET', KEYS[3]) ~= ARGV[1] then return {} end
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
local taken = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
local more = tonumber(ARGV[4])
if more > 0 then
  local seen = {}
  for _, member in ipairs(taken) do seen[member] = true end
  local upto = ARGV[5] == '1' and '+inf' or ARGV[3]
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', upto, 'LIMIT', 0, more + #taken)
  for _, member in ipairs(due) do
    if more == 0 then break end
    if not seen[member] then
      table.insert(taken, member)
      more = more - 1
    end
  end
end
return taken
"""

# KEYS[1] due set, KEYS[2] deadlines set; ARGV the members. Forgets charges that were sent.
FORGET = """
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('ZREM', KEYS[2], unpack(ARGV))
return 1
"""
# Members published before they are removed in one round trip: a releaser that dies sends
# at most this many of them again.
FORGET_CHUNK = 50

# KEYS[1] lock; ARGV[1] releaser id. Frees the lock if the caller still holds it.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Released:
    """What one pass did for one breaker."""

    breaker: str
    sent: int
    left: int


class Parking:
    """The parked charges of every breaker, in the breaker store's Redis."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._park = client.register_script(PARK)
        self._take = client.register_script(TAKE)
        self._forget = client.register_script(FORGET)
        self._unlock = client.register_script(UNLOCK)
        self._releaser = f"{os.getpid()}:{threading.get_ident()}:{id(self)}"
        # One round trip per park, index included, where a script may touch every key.
        self._one_script = not isinstance(client, redis.cluster.RedisCluster)

    @staticmethod
    def keys(breaker: str) -> list[str]:
        """Return the due set, deadlines set and lock keys of a breaker."""
        base = f"payments:parked:{{{breaker}}}"
        return [base, f"{base}:deadlines", f"{base}:lock"]

    def park(self, breaker: str, message: dict[str, Any], due: float, deadline: float) -> None:
        """Park a charge's next message: sent once due and let through, or at its deadline."""
        member = json.dumps(message, sort_keys=True)
        args = [member, due, max(due, deadline), breaker]
        if self._one_script:
            self._park(keys=[*self.keys(breaker)[:2], INDEX_KEY], args=args)
            return
        self._park(keys=self.keys(breaker)[:2], args=args)
        # On a Cluster, another slot than the sets': a command of its own.
        self._client.sadd(INDEX_KEY, breaker)

    def breakers(self) -> list[str]:
        """Return the breakers with parked charges."""
        return sorted(_text(name) for name in self._client.smembers(INDEX_KEY))

    def count(self, breaker: str) -> int:
        """Return how many charges wait on breaker."""
        return int(self._client.zcard(self.keys(breaker)[0]))

    def release(
        self,
        breaker: str,
        state: CircuitState,
        probes: int,
        publish: Callable[[dict[str, Any]], None],
        now: float | None = None,
    ) -> Released:
        """Send the due charges breaker's state lets through, and those past their deadline."""
        due, deadlines, lock = self.keys(breaker)
        more = {CircuitState.CLOSED: RELEASE_BATCH, CircuitState.HALF_OPEN: probes}.get(state, 0)
        members = self._take(
            keys=[due, deadlines, lock],
            args=[self._releaser, int(LOCK_SECONDS * 1000), now or time.time(), more,
                  "1" if state is CircuitState.CLOSED else "0"],
        )
        sent = 0
        published: list[Any] = []
        try:
            for member in members:
                publish(json.loads(member))
                sent += 1
                # Only once sent: a releaser that dies before they are forgotten sends them
                # again (the order book makes a second copy harmless).
                published.append(member)
                if len(published) >= FORGET_CHUNK:
                    self._forget(keys=[due, deadlines], args=published)
                    published = []
        finally:
            try:
                if published:
                    self._forget(keys=[due, deadlines], args=published)
            finally:
                if members:
                    self._unlock(keys=[lock], args=[self._releaser])
        left = self.count(breaker)
        if not left:
            self._client.srem(INDEX_KEY, breaker)
            # A charge parked between the count and the SREM puts the breaker back.
            if self.count(breaker):
                self._client.sadd(INDEX_KEY, breaker)
        return Released(breaker, sent, left)


class Releaser:
    """A thread that sends parked charges as their breakers let them through."""

    def __init__(
        self,
        parking: Callable[[], Parking],
        state_of: Callable[[str], tuple[CircuitState, int]],
        publish: Callable[[dict[str, Any]], None],
        interval: float = 0.5,
        refusing: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self._parking = parking
        self._state_of = state_of
        self._publish = publish
        # Told after every pass which breakers were not CLOSED (OPEN or HALF_OPEN: the
        # worker's gate asks them about each charge before the pool), and told none when a
        # pass fails.
        self._refusing = refusing
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        """Start releasing in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="charge-releaser", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the pass under way."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_once(self) -> list[Released]:
        """Release what every breaker lets through now."""
        parking = self._parking()
        done = []
        refusing = set()
        for name in parking.breakers():
            state, probes = self._state_of(name)
            if state is not CircuitState.CLOSED:
                refusing.add(name)
            released = parking.release(name, state, probes, self._publish)
            if released.sent:
                log.info(
                    "Released %d parked charge(s) of %s (%s); %d still wait",
                    released.sent, name, state.value, released.left,
                )
            done.append(released)
        if self._refusing is not None:
            self._refusing(frozenset(refusing))
        return done

    def _loop(self) -> None:
        wait = 0.0  # the first pass at once: what was due while no worker ran goes now
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                done = self.run_once()
            except Exception as exc:  # Redis or the broker away: the charges wait, not lost
                if self._refusing is not None:
                    self._refusing(frozenset())
                if not self._failing:
                    log.warning(
                        "Parked charges cannot be released now (%s: %s); trying again every "
                        "%gs", type(exc).__name__, " ".join(str(exc).split())[:120], self.interval,
                    )
                self._failing = True
            else:
                if self._failing:
                    log.warning("Parked charges are released again")
                self._failing = False
                if any(r.sent >= RELEASE_BATCH and r.left for r in done):
                    wait = 0.0  # a closed breaker's backlog: the next batch at once


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
