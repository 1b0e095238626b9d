# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use, from the lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every package that make test / make demo install, pinned and hash-checked: `make lock` regenerates it from
# setup.py's ranges and requirements/cpu.in (which pins torch + triton in the same resolution as everything that
# depends on them, so that pip never swaps in a multi-GB CUDA torch on a CPU machine); UPGRADE=1 moves every pin
# to the newest allowed release (try it first with `make test-latest`).
LOCK ?= requirements/cpu-py311.txt
LOCK_PYTHON := 3.11
LOCK_TOOLS ?= pip==26.3 pip-tools==7.7.0
TOFU_DIR ?= $(abspath ../shared/data/tofu)
export SIMNPO_FAST_TOFU_DIR ?= $(if $(wildcard $(TOFU_DIR)/forget10.json),$(TOFU_DIR),)

.PHONY: install lock test test-latest test-pythons test-wheel demo bench clean gpu-check gpu-wheels

# The venv is rebuilt from scratch whenever the lock or setup.py changes, so it holds exactly the lock.
$(VENV)/.installed: $(LOCK) setup.py
	@$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(LOCK_PYTHON)" else \
		"$(LOCK) is locked for Python $(LOCK_PYTHON) and $(PYTHON) is Python " + v + \
		": run make with PYTHON=python$(LOCK_PYTHON), or see make test-pythons")'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(LOCK_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --generate-hashes --allow-unsafe \
		--strip-extras --extra dev --no-emit-index-url --no-emit-find-links \
		$(if $(filter 1 yes true,$(UPGRADE)),--upgrade) -o $(LOCK) setup.py requirements/cpu.in
	rm -rf .venv-lock

# Drift canary and Python matrix (not in CI): throwaway venvs, results to bench/results/env-*.{json,md}
test-latest:
	$(PYTHON) tools/envcheck.py latest --python $(PYTHON)

test-pythons:
	$(PYTHON) tools/envcheck.py pythons

test-wheel:
	$(PYTHON) tools/envcheck.py wheel --python $(PYTHON)

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

demo: $(VENV)/.installed
	$(PY) -m simnpo_fast.cli demo

bench: $(VENV)/.installed
	$(PY) -m bench.loss

# The first thing to run on a GPU machine (README, Contributing): no venv, no pip install there, the machine's
# python3 with torch; its JSON + Markdown land in bench/results/. DRY_RUN=1: every stage on CPU (CI runs it).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m bench.gpu_check $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(GPU_CHECK_ARGS)

# Pure-Python peer wheels for stage 2 (Liger, CCE), fetched where a package registry is reachable; gpu-check
# unpacks bench/wheels/*.whl onto the path (git-ignored: carry the folder to the GPU machine).
gpu-wheels:
	$(GPU_PY) -m pip download -q --no-deps --only-binary=:all: -d bench/wheels liger-kernel==0.8.5 \
		cut-cross-entropy==25.1.1

clean:
	rm -rf $(VENV) .venv-lock *.egg-info .pytest_cache
