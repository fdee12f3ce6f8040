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
export GX_ANALYTICS_ENABLED := False

.PHONY: setup model demo test test-fast serve stop-serve load-benchmarks quality clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e '.[all,test]'
	touch $@

setup: $(BIN)/.installed  ## create .venv and install the project

model: setup  ## fetch the embedded models (Qwen2.5-Coder-1.5B, SmolLM2-135M GGUF) into the user cache
	$(BIN)/python scripts/fetch_model.py

demo: setup model  ## load the benchmarks into DuckDB and match the Beer test pairs with the default model
	$(BIN)/python -m flows.demo

test: setup model  ## run the whole test suite
	$(BIN)/python -m pytest -q

test-fast: setup model  ## the suite without the real-server and slow tests
	$(BIN)/python -m pytest -q -m "not server and not slow"

serve: setup model  ## local Prefect server + worker on 127.0.0.1:4200 with prefect.yaml deployed
	scripts/serve.sh

stop-serve:  ## stop the worker and the server started by `make serve`
	scripts/stop_serve.sh

load-benchmarks: setup  ## load data/ benchmark tables into data/wrangle.duckdb
	$(BIN)/python -m flows.load_benchmarks

quality: setup model  ## measure the embedded models on every dataset -> docs/quality.md (about 1 h)
	$(BIN)/python scripts/fetch_model.py --all
	$(BIN)/python benchmarks/quality.py

clean:  ## remove caches, offload files and the local Prefect home (keeps .venv and the model cache)
	rm -rf .pytest_cache offload .prefect/*.db
