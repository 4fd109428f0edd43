# `make demo` (the main job), `make test` (the full suite) and `make lint` (ruff and mypy). Each builds .venv from
# nothing. `make interop` (not part of `make test`) checks the dataset format against the real LeRobot, in an
# environment of its own (.venv-interop): LeRobot 0.6 needs Python >= 3.12 and torch < 2.12.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on these machines; on a GPU machine pass e.g. TORCH_SPEC="torch" to get the CUDA build.
TORCH_SPEC ?= torch==2.13.0

# LeRobot's environment: a Python >= 3.12 (e.g. INTEROP_PYTHON=~/.pyenv/versions/3.12.1/bin/python3.12) and LeRobot
# from PyPI, which brings its own torch 2.11 (PyPI's Linux build is the CUDA one: about 5 GB on disk).
INTEROP_VENV ?= .venv-interop
INTEROP_PYTHON ?= python3.12
INTEROP_DIR ?= runs/interop
LEROBOT_SPEC ?= lerobot[dataset]==0.6.1

.PHONY: demo test lint venv clean interop

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/capvector reproduce --preset quick

test: venv
	$(PY) -m pytest -q

# ruff (lint and format) on everything; mypy per pyproject's [tool.mypy] (strict on params, training, files, errors)
lint: venv
	$(VENV)/bin/ruff check src tests benchmarks interop docs
	$(VENV)/bin/ruff format --check src tests benchmarks interop docs
	$(VENV)/bin/mypy

$(INTEROP_VENV)/.installed:
	test -x $(INTEROP_VENV)/bin/python || $(INTEROP_PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q "$(LEROBOT_SPEC)"
	touch $@

# capvector demos -> LeRobotDataset (same frames, no warning); LeRobotDataset.create -> capvector's training reader
interop: venv $(INTEROP_VENV)/.installed
	$(PY) interop/lerobot_interop.py ours $(INTEROP_DIR)
	$(INTEROP_VENV)/bin/python interop/lerobot_interop.py lerobot $(INTEROP_DIR)
	$(PY) interop/lerobot_interop.py theirs $(INTEROP_DIR)

clean:
	rm -rf $(VENV) $(INTEROP_VENV) runs
