"""A circuit breaker (ADR-003) whose state one process or every process on a Redis shares.

No Celery here: the breaker (sync and asyncio), its stores and its metrics, usable from
any Python code.
"""

from breaker.async_circuit import AsyncCircuitBreaker, AsyncPermit
from breaker.async_redis_store import AsyncRedisStore
from breaker.circuit import CircuitBreaker, CircuitBreakerListener, Permit
from breaker.memory import MemoryStore
from breaker.redis_store import RedisStore
from breaker.registry import BreakerRegistry
from breaker.state import BreakerConfig, CircuitBreakerOpenError, CircuitState, Outcome
from breaker.store import StateView, Store

__all__ = [
    "AsyncCircuitBreaker",
    "AsyncPermit",
    "AsyncRedisStore",
    "BreakerConfig",
    "BreakerRegistry",
    "CircuitBreaker",
    "CircuitBreakerListener",
    "CircuitBreakerOpenError",
    "CircuitState",
    "MemoryStore",
    "Outcome",
    "Permit",
    "RedisStore",
    "StateView",
    "Store",
]
