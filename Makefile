# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned together in ONE pip command so pip never swaps in a multi-GB CUDA torch on a CPU machine.
TORCH_PIN ?= torch==2.13.0 triton==3.7.1
TOFU_DIR ?= $(abspath ../shared/data/tofu)
export SIMNPO_FAST_TOFU_DIR ?= $(if $(wildcard $(TOFU_DIR)/forget10.json),$(TOFU_DIR),)

.PHONY: install test demo bench clean

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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
