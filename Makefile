# dspex-tasks developer entry points. `make` alone prints the target list.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
PYTEST_ARGS ?=
# Python sources only: ruff would also format the code blocks of Markdown files.
PY_DIRS     := dspex_tasks workers tests benchmarks

# Prefix for apt-get: empty when root (CI) or when sudo is not installed.
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null 2>&1 || echo sudo)

.PHONY: help venv redis chromium test lint fmt bench demo clean reliability-report

help:
	@echo "dspex-tasks make targets:"
	@echo "  venv   create $(VENV) and pip install -e '.[dev,worker,local-lm]' (re-runs when pyproject.toml changes)"
	@echo "  redis  apt-get install redis-server/redis-tools if not on PATH"
	@echo "  chromium  apt-get install chromium if not on PATH (the Flower UI test drives it headless)"
	@echo "  test   run pytest against a throwaway redis-server (PYTEST_ARGS=... to pass args)"
	@echo "  lint   ruff check, ruff format --check, mypy"
	@echo "  fmt    ruff format + ruff check --fix"
	@echo "  bench  run every benchmark (benchmarks/README.md), each on its own throwaway redis-server (BENCH=store,tasks: only those)"
	@echo "  reliability-report  run the fault, bad-input and security tests; copy their report to docs/reliability.md"
	@echo "  demo   start the stack (dspex-tasks dev: redis, worker, beat, flower), run the demo, stop"
	@echo "  clean  remove build artefacts and tool caches (keeps $(VENV); rm -rf it yourself)"

venv: $(VENV)/.installed

# Stamp file: reinstall only when pyproject.toml is newer than the last install.
$(VENV)/.installed: pyproject.toml
	@# A bare Debian python3 lacks ensurepip (python3-venv); that leaves a venv without
	@# pip, so check for pip, and install python3-venv once if the first attempt fails.
	@if [ ! -x $(BIN)/pip ]; then \
		echo "creating $(VENV)"; \
		$(PYTHON) -m venv $(VENV) || { \
			rm -rf $(VENV); \
			$(SUDO) apt-get update && \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv && \
			$(PYTHON) -m venv $(VENV); \
		}; \
	fi
	@# local-lm builds llama-cpp-python from source the first time (a few minutes on 2
	@# cores; pip caches the wheel afterwards). GGML_NATIVE=OFF keeps that wheel portable.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -e '.[dev,worker,local-lm]'
	@touch $@

redis:
	@if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then \
		echo "redis-server: $$(command -v redis-server)"; \
	else \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools; \
	fi

# Debian's chromium package; tests/test_flower_ui.py skips without it.
chromium:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "chromium: $$(command -v chromium)"; \
	else \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	fi

# Screenshots of UI tests land in test-artifacts/ (gitignored; CI keeps it as an artifact).
test: venv redis chromium
	./scripts/with-redis.sh $(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff format $(PY_DIRS)
	$(BIN)/ruff check --fix $(PY_DIRS)

# Each benchmark gets its own throwaway redis-server; benchmarks/_*.py are their helpers.
# BENCH=store,tasks runs only those; each script reads its own BENCH_* sizes (see
# benchmarks/README.md).
bench: venv redis
	@shopt -s nullglob; files=(benchmarks/[!_]*.py); \
	if [ -n "$(BENCH)" ]; then files=(); for b in $$(tr , ' ' <<< "$(BENCH)"); do \
		files+=("benchmarks/$$b.py"); done; fi; \
	if [ $${#files[@]} -eq 0 ]; then echo "no benchmarks/*.py yet"; exit 0; fi; \
	for f in "$${files[@]}"; do \
		echo "== $$f"; \
		./scripts/with-redis.sh $(BIN)/python "$$f" || exit $$?; \
	done

# The reliability tests write their report to $(REPORT_DIR) on every run (never into the
# tree); this target is the one place docs/reliability.md is refreshed from it. The report
# is copied whatever the outcome (failing rows show as FAILED), and the target then fails
# if the tests did.
REPORT_DIR ?= build/reports
reliability-report: venv redis
	@rm -f $(REPORT_DIR)/reliability.md
	DSPEX_REPORT_DIR=$(abspath $(REPORT_DIR)) ./scripts/with-redis.sh $(BIN)/pytest \
		tests/test_faults.py tests/test_bad_input.py tests/test_security.py \
		-q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	if [ -f $(REPORT_DIR)/reliability.md ]; then \
		cp $(REPORT_DIR)/reliability.md docs/reliability.md && echo "docs/reliability.md refreshed"; \
	else echo "no report written"; rc=1; fi; \
	exit $$rc

demo: venv redis
	$(BIN)/dspex-tasks dev --demo

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
