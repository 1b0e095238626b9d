# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned together in ONE pip command so pip never swaps in a multi-GB CUDA torch on a CPU machine.
TORCH_PIN ?= torch==2.13.0 triton==3.7.1
TOFU_DIR ?= $(abspath ../shared/data/tofu)
export SIMNPO_FAST_TOFU_DIR ?= $(if $(wildcard $(TOFU_DIR)/forget10.json),$(TOFU_DIR),)

.PHONY: install test demo bench clean gpu-check gpu-wheels

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

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
	rm -rf $(VENV) *.egg-info .pytest_cache
