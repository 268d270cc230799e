# syntax=docker/dockerfile:1
# One image for all four course-signup services. It has no service-specific CMD:
# docker-compose.yml runs `python -m services.<name>` for each one.
#
# Every dependency version comes from pyproject.toml (the one place pins live):
# the builder stage installs `.[dev]` (grpcio-tools, mypy-protobuf) to generate the
# protobuf code, and the runtime stage installs only the runtime dependencies (`.`).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------
# builder: generate gen/ from protos/ with the pinned code generators
# ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/codegen \
    PATH=/opt/codegen/bin:$PATH

WORKDIR /app
RUN python -m venv /opt/codegen

# pyproject.toml alone first, so the dependency layer is cached until the pins change.
COPY pyproject.toml ./
RUN pip install '.[dev]'

COPY protos ./protos
COPY scripts ./scripts
RUN python scripts/gen_protos.py

# ---------------------------------------------------------------------------------
# runtime: runtime dependencies, the code and the generated protos; runs as non-root
# ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN python -m venv /opt/venv

COPY pyproject.toml ./
RUN pip install .

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app \
       --shell /usr/sbin/nologin app

# The code stays owned by root (read-only for the service user); only var/ (where the
# SQLite defaults would live) is writable.
COPY . /app
COPY --from=builder /app/gen /app/gen
RUN mkdir -p /app/var && chown app:app /app/var

# The repository root and the generated package, as `make` does with its .pth file.
ENV PYTHONPATH=/app:/app/gen \
    BIND_HOST=0.0.0.0

USER 10001:10001

EXPOSE 50051 50052 50053 50054
