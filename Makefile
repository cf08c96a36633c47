# The two commands (README): `make run` and `make test`. Both set everything up first.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
SPIFFE_ID ?= spiffe://example.org/ns/prod/sa/billing

.PHONY: install system-deps run test test-fast lint dev-certs demo-upstream bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.12 is required (found %d.%d): set PYTHON=python3.12" % sys.version_info[:2] if sys.version_info < (3, 12) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

dev/ca/ca.pem: | install
	$(BIN)/secretless-proxy certs init --out dev/ca

dev/billing/svid.pem: dev/ca/ca.pem
	$(BIN)/secretless-proxy certs issue --ca dev/ca --spiffe-id $(SPIFFE_ID) --ttl 24h --out dev/billing

# A random demo key, readable by the proxy only: the app never sees it.
dev/demo-api-key: | install
	mkdir -p dev && umask 077 && $(BIN)/python -c 'import secrets; print("sk_demo_" + secrets.token_hex(16))' > $@

dev-certs: dev/ca/ca.pem dev/billing/svid.pem dev/demo-api-key

run: install dev-certs
	$(BIN)/secretless-proxy run --config config/example.yaml

demo-upstream: install dev-certs
	$(BIN)/secretless-proxy echo-server --ca dev/ca --listen 127.0.0.1:9443

# Debian packages the full test suite uses (real servers and tools, never mocks): installed when
# missing and running as root; otherwise the tests that need them say what to install and skip.
SYSTEM_DEPS := curl:curl redis-server:redis-server promtool:prometheus nginx:nginx-light dnsmasq:dnsmasq-base prlimit:util-linux
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do cmd=$${dep%%:*}; pkg=$${dep##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (install them for the full suite)"; fi; fi

# Every test, in parallel (pytest-xdist). More workers than cores: the e2e tests mostly wait on
# sockets and child processes. worksteal: a few modules hold minutes of tests, and an idle worker
# takes tests from a busy one instead of waiting (a module-scoped proxy may then start once per worker).
TEST_WORKERS ?= 4
test: install system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# The fast lane while editing: unit and in-process tests only, no proxy or server process (-m e2e)
# and nothing that takes seconds on its own (-m slow).
test-fast: install
	$(BIN)/python -m pytest -n auto -q -m "not e2e and not slow"

lint: install
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check secretless_proxy addons tests bench

bench: install
	bash bench/run.sh
