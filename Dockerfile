# syntax=docker/dockerfile:1
#
# Almanac container image.
#
#   docker build -t almanac:latest .
#   docker run --rm -p 8000:8000 almanac:latest                  # every role, embedded engines
#   docker run --rm almanac:latest serve --roles worker ...      # any other `almanac` subcommand
#
# The builder stage installs the project and its dependencies into a virtualenv at /opt/venv;
# the runtime stage copies only that virtualenv onto a clean python:3.11-slim.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A compiler, in case a dependency has no binary wheel for the target platform. It stays in this
# stage and never reaches the runtime image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, read straight from pyproject.toml: this layer is rebuilt only when
# pyproject.toml changes, not on every source edit.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project itself (hatchling packages src/almanac and the top-level packages).
# README.md is part of the package metadata (pyproject's `readme`), so the build needs it.
COPY README.md ./
COPY src ./src
COPY commands ./commands
COPY queries ./queries
COPY projections ./projections
COPY streams ./streams
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && almanac --help > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="almanac" \
      org.opencontainers.image.description="Event-sourced astrology readings backend" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ALMANAC_DATA_DIR=/app/var

# An unprivileged user with fixed ids, so volume ownership and `runAsNonRoot` policies are
# predictable.
RUN groupadd --system --gid 10001 almanac \
    && useradd --system --uid 10001 --gid almanac --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin almanac \
    && install -d -o almanac -g almanac -m 0755 /app \
    && install -d -o almanac -g almanac -m 0750 /app/var

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 8000

# `almanac serve` shuts down cleanly on SIGTERM (stop accepting, drain, close engines).
STOPSIGNAL SIGTERM

# Liveness only: the process answers HTTP. Readiness (/health/ready) is checked by compose or
# the orchestrator, since an engine being down is not a reason to restart this container.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["almanac"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
