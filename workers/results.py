"""Celery's Redis result backend, storing a task's state in one round trip instead of two.

Celery's backend reads a task's stored meta before every write (a GET), so that a late
state never overwrites a SUCCESS (a second copy of a task, a lost worker), and then writes
it (SET and PUBLISH, pipelined). A charge stores STARTED and then SUCCESS, or RETRY when it is
parked, so that is two round trips per state. OneTripRedisBackend does the same check and
writes in one Lua script. The meta it stores, its expiry and the message published are
Celery's own. store_retries stores the RETRY states of many parked charges in one round trip
(the gate's, batched).

STARTED, stored by Celery before the task runs, is sent from a thread of the process's own
while the charge goes on (its BEGIN, its provider call): the charge no longer waits a round
trip for a state that is only shown. Every later state stored by the process first waits for
that STARTED, so states still land in the order Celery stores them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

# KEYS[1] a task's result key; ARGV[1] its meta (JSON), ARGV[2] expiry in s (0: none).
# Reply: 1 if stored, 0 if a SUCCESS already there was kept.
STORE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta.status == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


log = logging.getLogger("workers.results")


class _StartedStores:
    """This process's thread that stores STARTED states, and the last one it was given."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="started-states")
        self.last: Future[None] | None = None
        self.failing = False


_started: _StartedStores | None = None


def _started_stores() -> _StartedStores:
    """Return this process's STARTED thread, made again in a process forked from another."""
    global _started
    if _started is None or _started.pid != os.getpid():
        _started = _StartedStores()
    return _started


class OneTripRedisBackend(RedisBackend):  # type: ignore[misc]
    """RedisBackend whose task state stores are one script each (JSON results only)."""

    def _store_result(
        self, task_id: Any, result: Any, state: str, traceback: Any = None,
        request: Any = None, **kwargs: Any,
    ) -> Any:
        if self.serializer != "json":
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        stored = self._stored(task_id, result, state, traceback, request)
        stores = _started_stores()
        if state == states.STARTED:
            stores.last = stores.thread.submit(self._store_started, stores, stored)
            return result
        self._wait_for_started(stores)
        self.ensure(self._store, stored)
        return result

    def _store_started(self, stores: _StartedStores, stored: tuple[bytes, str, int]) -> None:
        try:
            self.ensure(self._store, stored)
        except Exception as exc:  # shown only: the charge goes on without it
            if not stores.failing:
                log.warning("STARTED state not stored (%s)", type(exc).__name__)
            stores.failing = True
        else:
            stores.failing = False

    @staticmethod
    def _wait_for_started(stores: _StartedStores) -> None:
        # Never cleared: in a threads pool another task's STARTED may be the last one now,
        # and one thread runs them in order, so waiting for the last waits for all before it.
        last = stores.last
        if last is not None:
            last.result()  # _store_started raises nothing

    def store_retries(self, retries: Sequence[tuple[str, BaseException, Any]]) -> None:
        """Store RETRY for each (task id, reason, request) in one round trip, or raise.

        No retry on a connection error, unlike Celery's stores (up to 20 s of them): the
        caller is the worker's event loop, which must not wait on a state meant for display.
        """
        if self.serializer != "json":
            for task_id, reason, request in retries:
                self.mark_as_retry(task_id, reason, request=request)
            return
        self._wait_for_started(_started_stores())
        pipe = self.client.pipeline(transaction=False)
        for task_id, reason, request in retries:
            result = self.encode_result(reason, states.RETRY)
            pipe.eval(STORE, 1, *self._stored(task_id, result, states.RETRY, None, request))
        pipe.execute()

    def _stored(
        self, task_id: Any, result: Any, state: str, traceback: Any, request: Any
    ) -> tuple[bytes, str, int]:
        """Return the key, Celery's meta (JSON) and the expiry in s (0: none) of a state."""
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        return self.get_key_for_task(task_id), value, int(expires or 0)

    def _store(self, key: bytes, value: str, expires: int) -> Any:
        return self.client.eval(STORE, 1, key, value, expires)


def store_retries(backend: Any, retries: Sequence[tuple[str, BaseException, Any]]) -> None:
    """Store RETRY for each (task id, reason, request): in one round trip where it can."""
    if isinstance(backend, OneTripRedisBackend):
        backend.store_retries(retries)
        return
    for task_id, reason, request in retries:
        backend.mark_as_retry(task_id, reason, request=request)


def one_trip(backend: Any) -> Any:
    """Return backend, made a OneTripRedisBackend if it is Celery's plain RedisBackend.

    The instance itself changes class: Celery keeps one backend per app and thread, with its
    connections and result consumer, and only how it stores a state changes. Any other
    backend (Sentinel, a database, one of the user's) is returned as it is.
    """
    if type(backend) is RedisBackend:
        backend.__class__ = OneTripRedisBackend
    return backend
