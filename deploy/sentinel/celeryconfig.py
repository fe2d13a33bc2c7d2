"""Celery settings for the Sentinel variant of the compose stack (docker-compose.sentinel.yml).

Celery takes a Sentinel master's name only from transport options, which no environment
variable sets; CELERY_CONFIG_MODULE=celeryconfig selects this module. The URLs stay in the
environment, which wins over this module; the breakers follow the broker onto this master.
"""

broker_transport_options = {"master_name": "payments"}
result_backend_transport_options = {"master_name": "payments"}
