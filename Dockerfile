# syntax=docker/dockerfile:1
#
# The tokensync operator image.
#
#   docker build -t ghcr.io/tokensync/tokensync:0.1.0 \
#     --build-arg VCS_REF="$(git rev-parse HEAD)" \
#     --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#
# Two stages on the same base image (the venv's interpreter symlink and its
# scripts' shebangs point at /usr/local/bin/python3.11 and /opt/tokensync, so both
# stages must agree on both; pin PYTHON_IMAGE by digest for reproducible builds):
#
# * builder: builds the tokensync wheel and installs it, with its dependencies,
#   into a venv at /opt/tokensync. Every dependency ships manylinux wheels, so no
#   compiler is installed even here.
# * final: python:3.11-slim plus that venv. No pip in the venv, no compilers, no
#   build tools, no shell customisation.
#
# Runtime contract (what manifests/operator/deployment.yaml sets):
#
# * runs as UID/GID 65532 (non-root, numeric so `runAsNonRoot` can be verified);
# * works with `readOnlyRootFilesystem: true`: bytecode is compiled at build time
#   (unchecked-hash .pyc files stay valid whatever the files' mtimes) and never
#   written at run time (PYTHONDONTWRITEBYTECODE=1); logs go to stderr;
# * HOME and TMPDIR are /tmp, which MUST be a writable emptyDir: the kubernetes
#   client writes temporary CA/client-certificate files there when a kubeconfig
#   embeds them, and Python's tempfile needs one writable directory;
# * port 8080 serves the kopf liveness endpoint (/healthz), and later the metrics.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The venv has no pip of its own: the builder's pip installs into it (--python),
# so the final image carries no package manager.
RUN python -m venv --without-pip /opt/tokensync

# Only what the wheel is built from (see .dockerignore): a change to tests,
# manifests or docs does not invalidate this layer.
COPY pyproject.toml README.md ./
COPY operator/ operator/

RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m pip --python /opt/tokensync/bin/python install --no-compile /wheels/tokensync-*.whl \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/tokensync/lib \
 && /opt/tokensync/bin/tokensync --version

# ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown

LABEL org.opencontainers.image.title="tokensync" \
      org.opencontainers.image.description="A Kubernetes operator that keeps OAuth2 access tokens fresh in Secrets." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/tokensync/tokensync" \
      org.opencontainers.image.url="https://github.com/tokensync/tokensync" \
      org.opencontainers.image.documentation="https://github.com/tokensync/tokensync#readme" \
      org.opencontainers.image.vendor="tokensync" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

ENV PATH=/opt/tokensync/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp

# Owned by root and read-only for the runtime user: the operator cannot change its own code.
COPY --from=builder /opt/tokensync /opt/tokensync

USER 65532:65532
WORKDIR /tmp

# Kopf liveness endpoint (/healthz, `--liveness`), and the metrics to come.
EXPOSE 8080 9090

ENTRYPOINT ["tokensync", "run"]
