# The two README commands: `make run` (the pipeline on the embedded corpus) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ctclab-installed

.PHONY: install run test ui clean
install: $(STAMP)

# torch first, from the CPU build pinned here, so no dependency resolves it to a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ctclab run

test: $(STAMP)
	$(BIN)/python -m pytest -q

ui: $(STAMP)
	$(BIN)/ctclab ui

clean:
	rm -rf data models metrics submission mlflow.db mlartifacts
