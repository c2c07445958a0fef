# Set-up and the two commands of the README. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# The CPU build of torch is installed first and pinned: a bare `torch` requirement would pull
# a multi-GB CUDA build. The editable install then finds torch satisfied and adds the rest.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/embtune demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
