# capsearch: `make run` and `make test` do all the set-up on a fresh machine (python3 >= 3.10, pip).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow lint format venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu,test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/capsearch run search_spaces/tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check capsearch tests experiments
	$(BIN)/ruff format --check capsearch tests experiments

format: $(STAMP)
	$(BIN)/ruff format capsearch tests experiments
	$(BIN)/ruff check --fix capsearch tests experiments

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
