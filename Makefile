# The two commands of this project:
#   make up     set up (first time) and run the whole service with embedded defaults and demo models
#   make test   set up (first time) and run the whole test suite (checks, unit layer, integration suite)
#   make unit   the unit layer only (no services), for a quick check while changing code
#   make check  ruff, mypy and the import contracts (make test runs them first)
#   make deploy-test  build the container images (docker, debootstrap) and run them; CI runs it after make test
# Setup needs only Python 3.11+: it creates .venv and installs the project into it, again
# only when pyproject.toml changes (the stamp file records the last install).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
PYTEST_ARGS ?=
# Processes for the integration suite's parallel pass: each gets its own database, Redis index,
# S3 server and workers (tests/integration/conftest.py), and most tests wait on those processes.
TEST_PROCESSES ?= 3
TORCH  ?= torch==2.13.0

CHROMIUM ?= /usr/bin/chromium

.PHONY: up test unit check install clean chromium faketime nftables prometheus deploy-test deploy-lint

up: $(STAMP)
	$(BIN)/gpujobs up --demo --port $(PORT)

# The checks, then the unit layer (no services, seconds), then the integration suite (real services and
# processes): most of it in parallel (TEST_PROCESSES, whole modules per process), then the modules that
# measure timing under faults one at a time (`serial`, SERIAL_MODULES in tests/integration/conftest.py).
# Every pass runs even when an earlier one fails; the target fails if any did.
test: $(STAMP) chromium faketime nftables prometheus check
	@status=0; \
	$(BIN)/pytest tests/unit $(PYTEST_ARGS) || status=1; \
	$(BIN)/pytest tests/integration -m "not serial" -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) || status=1; \
	$(BIN)/pytest tests/integration -m serial $(PYTEST_ARGS) || status=1; \
	exit $$status

# Lint and format (ruff), types (mypy, on the modules pyproject.toml names), import boundaries (import-linter).
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The unit layer alone: no database, broker, S3 or subprocess; under a minute on 2 cores.
unit: $(STAMP)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# The container images (docs/deployment.md, "Images"): installs Debian's docker.io and debootstrap when
# missing, starts dockerd for the run, lints the Dockerfile (hadolint), builds the debootstrap base, the
# wheelhouses and both images (cached artefacts reused), then runs migrate, api, a worker and beat as
# containers with two model jobs (tests/deploy). Not part of `make test`; .ci/run runs both.
deploy-test: $(STAMP)
	BIN=$(BIN) PYTEST_ARGS="$(PYTEST_ARGS)" deploy/docker/deploy-test.sh

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
# --- ML stack: torch goes here, BEFORE anything that depends on it -------------------------
# torch==2.13.0 is a CPU wheel on this machine's disk; installing it first keeps other
# packages from pulling a multi-GB CUDA build. On a GPU machine, install the torch build you
# want first (e.g. `make TORCH=torch==2.9.1 install`).
	$(BIN)/pip install $(TORCH)
# -------------------------------------------------------------------------------------------
	$(BIN)/pip install -e '.[all,test]'
	touch $(STAMP)

# The admin-dashboard browser tests drive Debian's Chromium through Playwright (Playwright's own
# browser download is not used). A system package: installed with apt-get when it is missing and
# apt-get is here (as root, or through sudo); otherwise the browser tests fail and say how to get one.
chromium:
	@if [ -x "$(CHROMIUM)" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		echo "installing Debian's chromium for the browser tests"; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium \
			|| echo "could not install chromium: the admin browser tests will fail"; \
	else echo "no chromium and no apt-get: the admin browser tests will fail (set GPUJOBS_TEST_CHROMIUM)"; fi

# The lease-clock tests run a worker under Debian's faketime (libfaketime) with its wall clock shifted.
# A system package, installed like chromium above; without it those tests fail and say how to get it.
faketime:
	@if command -v faketime >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		echo "installing Debian's faketime for the lease-clock tests"; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq faketime \
			|| echo "could not install faketime: the lease-clock tests will fail"; \
	else echo "no faketime and no apt-get: the lease-clock tests will fail"; fi

# The metrics tests (tests/integration/test_prometheus.py) run Debian's prometheus (a server on loopback with its
# own config and TSDB in a temporary folder) and promtool. A system package, installed like chromium above; the
# package's own service is not started in a container without an init. Without it those tests fail and say so.
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		echo "installing Debian's prometheus for the metrics tests"; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq prometheus \
			|| echo "could not install prometheus: the metrics tests will fail"; \
	else echo "no prometheus and no apt-get: the metrics tests will fail"; fi

# The multi-host tests (tests/integration/test_multihost.py) put hosts in network namespaces joined by veths
# (iproute2's `ip`) and partition them with nftables rules (`nft`). System packages, installed like chromium
# above (the tests also need root); without them those tests fail and say what is missing.
nftables:
	@if command -v ip >/dev/null 2>&1 && command -v nft >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		echo "installing Debian's iproute2 and nftables for the multi-host tests"; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq iproute2 nftables \
			|| echo "could not install iproute2 and nftables: the multi-host tests will fail"; \
	else echo "no ip or nft and no apt-get: the multi-host tests will fail"; fi

# The deployment files (deploy/: compose, Kubernetes, alert rules, dashboard) checked by the tools that
# run them, and the dashboard's and alerts' expressions evaluated by a real Prometheus scraping a real
# API (tests/deploy/test_manifests.py; not part of `make test`). Debian's kubernetes-client (kubectl,
# kustomize 2.0) and prometheus (prometheus, promtool) are unpacked under var/deploy-tools rather than
# installed, so no Prometheus service starts on the machine; docker-compose (Debian) is installed;
# kubernetes-validate (PyPI) goes into the venv.
DEPLOY_TOOLS := var/deploy-tools
DEPLOY_DEBS  := prometheus kubernetes-client

deploy-lint: $(STAMP) $(VENV)/.deploy-lint $(DEPLOY_TOOLS)/.unpacked
	@command -v docker-compose >/dev/null 2>&1 || { \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		echo "installing Debian's docker-compose for make deploy-lint"; \
		$$SUDO apt-get install -y -qq --no-install-recommends docker-compose >/dev/null \
		|| { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; } \
		|| echo "could not install docker-compose: its check will fail"; }
	GPUJOBS_DEPLOY_TOOLS=$(CURDIR)/$(DEPLOY_TOOLS)/root/usr/bin $(BIN)/pytest tests/deploy/test_manifests.py $(PYTEST_ARGS)

$(VENV)/.deploy-lint: $(STAMP)
	$(BIN)/pip install -q 'kubernetes-validate>=1.31' 'jsonschema>=4.18'
	touch $@

$(DEPLOY_TOOLS)/.unpacked:
	rm -rf $(DEPLOY_TOOLS) && mkdir -p $(DEPLOY_TOOLS)/debs
	cd $(DEPLOY_TOOLS)/debs && { apt-get download $(DEPLOY_DEBS) || { apt-get update -qq && apt-get download $(DEPLOY_DEBS); }; }
	for deb in $(DEPLOY_TOOLS)/debs/*.deb; do dpkg-deb -x "$$deb" $(DEPLOY_TOOLS)/root; done
	touch $@

clean:
	rm -rf $(VENV) var test-artifacts .pytest_cache
