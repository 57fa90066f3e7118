# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
PY_BOOT ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup system test demo bench clean

# Everything `make test` needs: the venv and the system tools some tests call (sox, espeak-ng).
setup: $(STAMP) system

# Installs sox/espeak-ng with apt-get where it can; otherwise stops, before any test, with the command to run.
system:
	bash scripts/system_packages.sh

# Idempotent: reruns only when the venv is missing or the pinned requirements/pyproject changed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# laion-clap is the parity reference only; --no-deps because it pins numpy<2 (jax needs numpy>=2).
	$(PY) -m pip install -q --no-deps laion-clap==1.1.7
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# the demo needs no system tools, only the venv
demo: $(STAMP)
	$(PY) -m clapjax.app.demo

# speed comparisons against the PyTorch reference (not part of the tests; see benchmarks/RESULTS.md);
# `make bench BENCH_ARGS=--quick` is a few-minute smoke run
bench: $(STAMP)
	$(PY) -m benchmarks.run_all --out benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
