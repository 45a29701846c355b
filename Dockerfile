# syntax=docker/dockerfile:1
# resilience-proxy as a small image: a wheel is built in one stage and installed into a venv in the next,
# so the final image carries no build tools, sources or pip caches.
#   docker build -t resilience-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 --stop-timeout 15 resilience-proxy:0.1.0

# Both stages use this one image: wheels and environment markers are resolved for the builder's Python.
# Not pinned by digest yet: Docker Hub could not be reached where this was written, and a digest must be
# read from the registry, never made up. Pin it where you build:
#   docker buildx imagetools inspect python:3.11-slim   ->  PYTHON_IMAGE=python:3.11-slim@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject names README.md as the package's long description, so the build needs it.
COPY pyproject.toml README.md requirements.lock ./
COPY proxy ./proxy
# A wheel of every dependency at its locked version (hashes checked), then the project's own wheel
# without resolving anything: the final stage installs offline from these, so only locked versions exist.
RUN python -m pip wheel --wheel-dir /wheels --require-hashes -r requirements.lock \
    && python -m pip wheel --wheel-dir /wheels --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/resilience-proxy \
    PATH=/opt/resilience-proxy/bin:$PATH \
    LOG_LEVEL=info \
    LOG_FORMAT=json
# The wheels are bind-mounted, not copied, so they never become a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-index --find-links /wheels resilience-proxy \
    && "$VIRTUAL_ENV/bin/pip" uninstall --yes pip setuptools \
    && groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin proxy
# The default route table; mount your own over /etc/resilience-proxy (a Kubernetes ConfigMap does).
COPY routes.yaml /etc/resilience-proxy/routes.yaml
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9090
# The process is alive when its event loop answers; slim has no curl, so Python's urllib asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=2).status == 200 else 1)"]
# SIGTERM: stop accepting, finish in-flight requests for up to server.drain_timeout (10 s), exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["resilience-proxy"]
CMD ["run", "--config", "/etc/resilience-proxy/routes.yaml"]
