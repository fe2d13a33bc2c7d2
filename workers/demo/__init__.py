"""The flash-sale demo (`make demo`, `python -m workers.demo`): a real worker, Redis and provider.

It starts a private redis-server, the sandbox provider and a Celery worker with beat, plays a
flash sale through a provider outage, shows the breaker live, and proves from the provider's
ledger that every order was charged exactly once.
"""
