# syntax=docker/dockerfile:1
# One image for all four course-signup services. The code is installed as a package
# (`pip install .`) into /opt/venv; each service is a console script:
# coursesignup-registration (the CMD), coursesignup-enrollment, coursesignup-stats,
# coursesignup-notifier, and coursesignup-operator for the operator command.
# docker-compose.yml and deploy/kubernetes/ pick the service with `command`.
#
# Every dependency version comes from pyproject.toml (the one place pins live). The
# builder stage has the code generators (the dev extra, in /opt/codegen, never copied
# out); the runtime stage gets only /opt/venv, which holds the runtime dependencies and
# the project, and the health-check script with Debian's curl.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------
# builder: generate gen/ from protos/, install the project into /opt/venv
# ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# pyproject.toml alone first, so the dependency layers stay cached until the pins change:
# the code generators (dev extra) in one virtualenv, the runtime dependencies alone in
# the one the image ships.
COPY pyproject.toml ./
RUN python -m venv /opt/codegen && /opt/codegen/bin/pip install '.[dev]'
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

COPY protos ./protos
COPY scripts ./scripts
RUN /opt/codegen/bin/python scripts/gen_protos.py

# The code (.dockerignore keeps gen/, .venv and var/ out), then the project itself,
# without touching the dependencies installed above.
COPY . .
RUN /opt/venv/bin/pip install --no-deps --force-reinstall . \
    && /opt/venv/bin/python -c "import coursesignup.registration.v1.registration_pb2, libs.operator, services.registration.supervisor"

# ---------------------------------------------------------------------------------
# runtime: /opt/venv and the health check; runs as non-root
# ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# curl for HEALTHCHECK (deploy/grpc-health-check: one gRPC health call over HTTP/2).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app \
       --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
COPY deploy/grpc-health-check /usr/local/bin/grpc-health-check

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BIND_HOST=0.0.0.0 \
    GRPC_HEALTH_PORT=50051

# The code stays owned by root (read-only for the service user); only /app/var (where
# the SQLite defaults would live) is writable.
WORKDIR /app
RUN chmod 0755 /usr/local/bin/grpc-health-check && mkdir -p /app/var && chown app:app /app/var

USER 10001:10001

# gRPC (registration, enrollment, stats, notifier), then their /metrics.
EXPOSE 50051 50052 50053 50054 9451 9452 9453 9454

# GRPC_HEALTH_PORT: the gRPC port of the service this container runs.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["grpc-health-check"]

CMD ["coursesignup-registration"]
