# The Payment Service image: one image for every process (`serve` by default; `relay`, `migrate`,
# `notification-sink` as the command). Multi-stage: the build stage makes a virtualenv with the
# package and its dependencies; the runtime stage copies only that venv onto a clean base.
#
#   docker build -t payment-service .
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim -t payment-service .
#
# PYTHON_IMAGE must provide `python3` with the venv module (the official python images do).
ARG PYTHON_IMAGE=python:3.12-slim

# --- build ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
WORKDIR /src

# Dependencies first, from the runtime lock alone (every package pinned with its hashes: two
# builds of one commit run the same code), so a code change does not reinstall them. Only the
# runtime's: the embedded PostgreSQL of `payment-service run` is an extra (`embedded`) that a
# container never needs, since its database is always a real server (DATABASE_URL or DB_*).
COPY requirements/runtime.txt ./requirements.txt
RUN /opt/venv/bin/pip install --require-hashes --requirement requirements.txt

# The package itself, as a wheel (not editable) and without resolving anything again: db/migrations
# goes in as payment_service/sql_migrations (see pyproject), which is where migrations.py finds it.
COPY pyproject.toml README.md LICENSE ./
COPY db/migrations ./db/migrations
COPY payment_service ./payment_service
COPY payment_cli ./payment_cli
COPY app ./app
COPY outbox_relay ./outbox_relay
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "from payment_service.migrations import load_migrations; load_migrations()"

# --- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app \
 && mkdir /app && chown app:app /app
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVICE_PORT=8082
WORKDIR /app
USER 10001:10001

EXPOSE 8082
# No curl in slim images: the venv's Python asks /health; a 503 (database down) is unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SERVICE_PORT', '8082'), timeout=4)"

# Uvicorn (serve's default) with two workers: what docs/benchmarks.md measured as fastest.
CMD ["payment-service", "serve", "--workers", "2"]
