# One image for all four services; the command picks the service:
#   docker run IMAGE python -m services.registry   (the default)
#   docker run IMAGE python -m services.boot | services.stream | services.cache
# Every setting is an environment variable (STREAMBOOT_*, see shared/settings.py).
#
# Not built in this project's CI: its machines have no Docker engine. What the build stage
# runs (its COPY and `uv sync` steps, on a clean copy) is replayed by
# tests/deploy/test_deploy_files.py.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: resolve and install the locked dependencies, then the project, into /app/.venv
FROM ${PYTHON_IMAGE} AS build
# uv from PyPI, pinned: the same tool (and so the same lock semantics) as the developers'.
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first, in their own layer: a source change does not reinstall them.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project --no-editable
COPY README.md ./
COPY shared ./shared
COPY services ./services
COPY streamboot ./streamboot
# --no-editable: the project goes into site-packages, so the runtime stage needs no /src.
RUN uv sync --locked --no-dev --no-editable

# --- runtime: the venv, the iPXE binaries boot serves over TFTP, a non-root user
FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ipxe \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/streamboot streamboot \
    && install -d -o streamboot -g streamboot -m 0750 /var/lib/streamboot \
    && install -d -o streamboot -g streamboot -m 0755 /srv/streamboot/vdisks
COPY --from=build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STREAMBOOT_DATA_DIR=/var/lib/streamboot \
    STREAMBOOT_VDISK_DIR=/srv/streamboot/vdisks \
    STREAMBOOT_BIND_HOST=0.0.0.0 \
    STREAMBOOT_METRICS_PORT=9464
WORKDIR /var/lib/streamboot
# DATA_DIR is each instance's own state (write caches, mirrors, leases); VDISK_DIR is the
# vdisk store, shared: the registry writes it, stream and cache read it. A named volume
# mounted on either starts with this ownership.
VOLUME ["/var/lib/streamboot", "/srv/streamboot/vdisks"]
USER streamboot
# registry API, HTTP stream, NBD, boot HTTP, TFTP, DHCP (unprivileged defaults), metrics.
EXPOSE 18080 18081 10809 18082 16969/udp 16767/udp 9464
STOPSIGNAL SIGTERM
CMD ["python", "-m", "services.registry"]
