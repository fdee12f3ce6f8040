# FlexWrangle: `make demo` and `make test` set everything up on a fresh machine.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
# the machine's CPU build of torch 2.13.0, when a wheel folder holds it (an unpinned torch pulls CUDA)
FIND_LINKS := $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model demo test serve stop bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e '.[test]'
	touch $@

setup: $(BIN)/.installed  ## create .venv and install the project

model: setup  ## fetch the embedded model (SmolLM2-135M-Instruct GGUF) into models/
	bash scripts/fetch_model.sh

demo: setup model  ## run the main job on the embedded model
	$(BIN)/python scripts/demo.py

test: setup model  ## run the whole test suite
	$(BIN)/python -m pytest -q

clean:  ## remove caches, offload files and the local Prefect home (keeps .venv and models/)
	rm -rf .pytest_cache offload .prefect/*.db
