# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup lint clean

$(BIN)/nlc: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,ref]'
	touch $(BIN)/nlc

setup: $(BIN)/nlc

DEMO := runs/demo

# The main job: check, format-check and compile the catalogue, show Hope's levels, train Hope on the
# built-in corpus for a few minutes (progress bar, metrics.jsonl, loss.png, checkpoint) and sample from it.
demo: setup
	$(BIN)/nlc check specs/
	$(BIN)/nlc fmt --check specs/
	$(BIN)/nlc build specs/
	$(BIN)/nlc diff
	$(BIN)/nlc info specs/hope.nl
	rm -rf $(DEMO)
	$(BIN)/nlc train specs/hope.nl --steps 60 --batch 8 --context 256 --eval-every 20 --out $(DEMO)
	$(BIN)/nlc generate specs/hope.nl --checkpoint $(DEMO) --prompt "def " --tokens 64

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check nlc tests bench
	$(BIN)/ruff format --check nlc tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info
