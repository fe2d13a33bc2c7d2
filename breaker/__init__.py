"""A circuit breaker (ADR-003) whose state one process or every process on a Redis shares.

No Celery here: the breaker, its stores and its metrics, usable from any Python code.
"""

from breaker.circuit import CircuitBreaker, CircuitBreakerListener, Permit
from breaker.memory import MemoryStore
from breaker.redis_store import RedisStore
from breaker.registry import BreakerRegistry
from breaker.state import BreakerConfig, CircuitBreakerOpenError, CircuitState, Outcome
from breaker.store import StateView, Store

__all__ = [
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
