# One image for every payment-breaker service in docker-compose.yml: worker, beat, Flower,
# the sandbox provider and the breaker exporter differ only in their command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

WORKDIR /src
# The project's metadata names README.md as its long description: the build needs it.
COPY pyproject.toml README.md ./
COPY breaker ./breaker
COPY workers ./workers
# A regular (not editable) install, plus Flower, which the project lists among its test
# extras only; the sources are not needed once installed.
RUN pip install . "flower>=2.0,<3" \
    && rm -rf /src

WORKDIR /home/app
USER app

CMD ["celery", "-A", "workers", "worker", "--loglevel=INFO"]
