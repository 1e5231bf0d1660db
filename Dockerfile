# syntax=docker/dockerfile:1
# pgcache-exporter container image.
#
#   docker build -t pgcache-exporter .
#   docker run --rm -p 19187:19187 \
#     -e PGCACHE_POSTGRES_DSN=postgresql://pgcache_exporter:...@db:5432/postgres \
#     -e PGCACHE_REDIS_URL=redis://cache:6379/0 pgcache-exporter
#
# Or mount a config file: -v ./config.yaml:/etc/pgcache-exporter/config.yaml:ro
#   -e PGCACHE_CONFIG_FILE=/etc/pgcache-exporter/config.yaml (secrets by ${VAR} or dsn_file/url_file).

ARG PYTHON_IMAGE=python:3.11-slim

# -- builder: the wheel, and a venv with the wheel and its dependencies --------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m pip install "build>=1.2"
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the tree out of the context).
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN python -m build --wheel --outdir /dist .
# Every dependency has binary wheels for CPython 3.11 (amd64 and arm64), so no compiler is needed.
RUN python -m venv /opt/pgcache-exporter \
 && /opt/pgcache-exporter/bin/pip install /dist/*.whl \
 && /opt/pgcache-exporter/bin/pip uninstall --yes pip

# -- final: the venv on a clean slim image, no build tools, non-root ------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pgcache-exporter" \
      org.opencontainers.image.description="Prometheus exporter for PostgreSQL and its Redis query-result cache" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid, so Kubernetes runAsUser/fsGroup and file modes on mounted secrets can name it.
RUN groupadd --system --gid 10001 pgcache \
 && useradd --system --uid 10001 --gid pgcache --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pgcache
COPY --from=builder /opt/pgcache-exporter /opt/pgcache-exporter
COPY config.example.yaml /etc/pgcache-exporter/config.example.yaml
# The root filesystem may be read-only: nothing writes bytecode at run time (pip compiled it).
ENV PATH=/opt/pgcache-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PGCACHE_HEALTHCHECK_URL=http://127.0.0.1:19187/healthz
USER 10001:10001
EXPOSE 19187
# The slim image has no curl: ask Python. Change PGCACHE_HEALTHCHECK_URL when the listen address
# moves (with TLS or basic auth on, point it at an URL that works or disable with --no-healthcheck).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['PGCACHE_HEALTHCHECK_URL'], timeout=4)"]
# The daemon handles SIGTERM itself (clean stop) and SIGHUP (reload), so it can run as PID 1.
ENTRYPOINT ["pgcache-exporter"]
CMD ["run"]
