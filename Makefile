# The two README commands: `make run` (the pipeline on the embedded corpus) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ctclab-installed

.PHONY: install run test ui clean
install: $(STAMP)

# torch first, so no dependency resolves it to another build. Without an NVIDIA GPU (no working
# nvidia-smi) the CPU build: PyTorch's CPU index is added, whose 2.13.0+cpu pip prefers to PyPI's
# CUDA build (several GB of nvidia wheels); where that index cannot be reached, a local wheel or
# PyPI's still serve. With a GPU, PyPI's CUDA build. TORCH_INDEX=<url> overrides (e.g. a cu12x
# index); TORCH_INDEX= (empty) takes pip's own configuration as it is.
TORCH_INDEX ?= $(if $(shell nvidia-smi -L 2>/dev/null | grep -m1 GPU),,https://download.pytorch.org/whl/cpu)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --retries 1 torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ctclab run

# two workers (pytest-xdist): the suite waits on subprocesses, servers and queues much of its
# time, so two tests side by side take ~1.4x less wall time on 2 cores than one after another
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

ui: $(STAMP)
	$(BIN)/ctclab ui

clean:
	rm -rf data models metrics submission mlflow.db mlartifacts
