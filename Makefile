# Quick start (see README): `make up` runs the whole system, `make test` runs the tests.
# Each installs what it needs first: uv (via pip) if missing, the Python env (uv sync),
# and for the tests the Debian tools they drive as real peers (when root and missing).

SHELL := /bin/bash

# Debian packages the tests use as real protocol peers: qemu-img/qemu-io/qemu-nbd,
# nbdinfo/nbdcopy, nbdkit, curl (tftp://, http range), tftp-hpa (tftp), atftp (a windowsize
# TFTP client), busybox-static
# (udhcpc; also the demo vdisk's initramfs, which needs the static build: not `busybox`,
# which conflicts with it), iproute2 (ip netns); QEMU with its iPXE NIC ROMs and Debian's
# iPXE builds for the VM tests; syslinux, mtools, dosfstools, e2fsprogs and nbd-client to
# build the demo vdisk; fdisk (sfdisk) for the partitioned images of the kernel discovery
# tests. Keep the whole list here.
TEST_DEB_PACKAGES := qemu-utils libnbd-bin nbdkit curl tftp-hpa atftp busybox-static iproute2 \
	qemu-system-x86 ipxe-qemu ipxe syslinux syslinux-common mtools dosfstools e2fsprogs \
	nbd-client fdisk debootstrap dracut-core dracut-network ovmf libiscsi-bin qemu-block-extra tgt \
	chromium stunnel4 liblzma-dev
# (stunnel4, liblzma-dev: the TLS front of the HTTPS iPXE test and what building iPXE needs
# besides gcc, make, perl and git; debootstrap: `vdisk build-debian`; dracut-core, dracut-network: the client's dracut
# module is built into an initramfs; ovmf: the UEFI VM of the real-OS tests; libiscsi-bin:
# the iSCSI initiators, qemu-block-extra: QEMU's iscsi:// driver, tgt: the reference target;
# chromium: the web console's browser tests, driven by Playwright, never its own download.)
# The benchmarks' peers besides: fio (NBD load), tftpd-hpa (TFTP peer), dnsmasq-base (the
# reference PXE chain's DHCP in bench/pxechain.py and bench/realboot.py).
BENCH_DEB_PACKAGES := $(TEST_DEB_PACKAGES) fio tftpd-hpa dnsmasq-base

DATA_DIR ?=
UP_ARGS ?=
PYTEST_ARGS ?=
# uv from PATH, else where `pip install --user` puts it (evaluated when a recipe runs).
UV = $(shell command -v uv 2>/dev/null || echo "$$HOME/.local/bin/uv")

.PHONY: up cli test test-vm test-realos sync uv test-deps bench-deps deb-install lint soak fuzz faults

up: cli
	$(UV) run streamboot up $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(UP_ARGS)

# pytest exit code 5 means "no tests collected": a selection matched nothing, which must
# not pass silently in CI; say so and keep the failure.
# The real-OS boots (a Debian to multi-user under TCG, a minute or two each) are left to
# `make test-realos` and the VM boots marked `vm` to `make test-vm`, which keeps `make test`
# (and CI) within half an hour; the demo's PXE boot and iPXE's sanboots stay in it.
test: test-deps sync
	@rc=0; $(UV) run pytest -m "not realos and not vm" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

# VMs that boot the demo through the initramfs hand-off, from NBD, and through a stream
# node's death (NBD and HTTP-range multipath), under TCG.
test-vm: test-deps sync
	$(UV) run pytest -m vm $(PYTEST_ARGS)

# A real Debian built with `vdisk build-debian` (debootstrap cached in
# ~/.cache/streamboot-test), PXE-booted by VMs one at a time (two at once in one test).
test-realos: test-deps sync
	$(UV) run pytest -m realos $(PYTEST_ARGS)

sync: uv
	$(UV) sync

# `streamboot` on PATH after `make up`: ~/.local/bin/streamboot is this checkout's entry
# point (a link into .venv, so it always runs the synced code).
cli: sync
	@mkdir -p "$$HOME/.local/bin" && ln -sfn "$(CURDIR)/.venv/bin/streamboot" "$$HOME/.local/bin/streamboot"
	@case ":$$PATH:" in *":$$HOME/.local/bin:"*) ;; \
	  *) echo "make: ~/.local/bin is not on PATH: add it, or run 'uv run streamboot ...'" >&2 ;; esac

uv:
	@command -v uv >/dev/null 2>&1 || [ -x "$$HOME/.local/bin/uv" ] || \
	  python3 -m pip install --user uv || \
	  python3 -m pip install --user --break-system-packages uv

test-deps:
	@$(MAKE) --no-print-directory deb-install DEB_PACKAGES="$(TEST_DEB_PACKAGES)"

bench-deps:
	@$(MAKE) --no-print-directory deb-install DEB_PACKAGES="$(BENCH_DEB_PACKAGES)"

deb-install:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
	  echo "make: not Debian; make sure these are installed: $(DEB_PACKAGES)" >&2; exit 0; fi; \
	missing=$$(for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	else \
	  echo "make: missing Debian packages:" $$missing "- run as root or: sudo apt-get install" $$missing >&2; \
	  exit 1; \
	fi

lint: sync
	$(UV) run ruff check . && $(UV) run ruff format --check .

# The model test of the write path, long (tests/model; docs/reliability.md). The normal
# suite runs it with the short `ci` profile.
soak: test-deps sync
	HYPOTHESIS_PROFILE=soak $(UV) run pytest tests/model -q $(PYTEST_ARGS)

# Every fuzz target under atheris for FUZZ_RUNS inputs each, one after the other (a crash or
# an input slower than 1 s stops the run and lands in tests/fuzz/findings/). Each target's
# time is printed; docs/reliability.md has the last numbers.
FUZZ_RUNS ?= 1000000
FUZZ_TARGETS ?= http_head tftp dhcp event vdisk_layout partitions nbd nbd_options iscsi
fuzz: sync
	@for t in $(FUZZ_TARGETS); do \
	  start=$$(date +%s); \
	  $(UV) run python -m tests.fuzz.run $$t -runs=$(FUZZ_RUNS) -print_final_stats=1 2>&1 \
	    | grep -E "^Done|ERROR|SUMMARY|stat::number_of_executed_units" ; \
	  rc=$${PIPESTATUS[0]}; \
	  echo "fuzz $$t: exit $$rc after $$(( $$(date +%s) - start )) s (runs done: the stat line above)"; \
	  [ $$rc -eq 0 ] || exit $$rc; \
	done

# Fault injection with a live client (tests/faults; docs/reliability.md): every fault, then
# the table in docs/reliability.md is written from the results. Needs root (a network
# namespace, a tmpfs). The normal suite runs the quick ones.
FAULTS_RESULTS ?= build/faults.jsonl
faults: test-deps sync
	@mkdir -p $(dir $(FAULTS_RESULTS)) && rm -f $(FAULTS_RESULTS)
	@rc=0; STREAMBOOT_FAULTS=all STREAMBOOT_FAULTS_RESULTS=$(abspath $(FAULTS_RESULTS)) \
	  $(UV) run pytest tests/faults -q $(PYTEST_ARGS) || rc=$$?; \
	$(UV) run python -m tests.faults.table $(FAULTS_RESULTS) docs/reliability.md; exit $$rc
