"""The Celery side of payment-breaker: app, payment tasks, provider client, sandbox, CLI."""
