# `make demo` (the main job), `make test` (the full suite) and `make lint` (ruff and mypy). Each builds .venv from
# nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on these machines; on a GPU machine pass e.g. TORCH_SPEC="torch" to get the CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint venv clean

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
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs
