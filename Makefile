# Quick start (see README): `make up` runs the whole system, `make test` runs the tests.
# Each installs what it needs first: uv (via pip) if missing, the Python env (uv sync),
# and for the tests the Debian tools they drive as real peers (when root and missing).

SHELL := /bin/bash

# Debian packages the tests use as real protocol peers: qemu-img/qemu-nbd, nbdinfo/nbdcopy,
# nbdkit, curl (tftp://, http range), tftp-hpa (tftp), busybox (udhcpc), iproute2 (ip netns).
# Keep the whole list here.
TEST_DEB_PACKAGES := qemu-utils libnbd-bin nbdkit curl tftp-hpa busybox iproute2

DATA_DIR ?=
UP_ARGS ?=
PYTEST_ARGS ?=
# uv from PATH, else where `pip install --user` puts it (evaluated when a recipe runs).
UV = $(shell command -v uv 2>/dev/null || echo "$$HOME/.local/bin/uv")

.PHONY: up test sync uv test-deps lint

up: sync
	$(UV) run streamboot up $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(UP_ARGS)

# pytest exit code 5 means "no tests collected": a selection matched nothing, which must
# not pass silently in CI; say so and keep the failure.
test: test-deps sync
	@rc=0; $(UV) run pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

sync: uv
	$(UV) sync

uv:
	@command -v uv >/dev/null 2>&1 || [ -x "$$HOME/.local/bin/uv" ] || \
	  python3 -m pip install --user uv || \
	  python3 -m pip install --user --break-system-packages uv

test-deps:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
	  echo "make test: not Debian; make sure these are installed: $(TEST_DEB_PACKAGES)" >&2; exit 0; fi; \
	missing=$$(for p in $(TEST_DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	else \
	  echo "make test: missing Debian packages:" $$missing "- run as root or: sudo apt-get install" $$missing >&2; \
	  exit 1; \
	fi

lint: sync
	$(UV) run ruff check . && $(UV) run ruff format --check .
