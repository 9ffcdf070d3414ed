# The README's two commands: `make run` (the job end to end on the embedded default, CPU) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TINY   := build/tiny-llama

.PHONY: run test install tiny docs lock clean

## Create the virtualenv with the locked dependencies (requirements-dev.lock: the image's versions with torch's CPU
## build, plus the test tools; every file checked against its hash) and the job itself, built with the locked setuptools.
$(STAMP): requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

## Build the tiny Llama and its tokenizer once (no downloads).
$(TINY)/config.json: $(STAMP) scripts/build_tiny_model.py examples/data/sample-text.jsonl
	$(PY) scripts/build_tiny_model.py $(TINY) --force

tiny: $(TINY)/config.json

## Fine-tune the tiny model on the sample data with 4-bit quantization on the CPU.
run: tiny
	set -a && . ./examples/tiny.env && set +a && $(VENV)/bin/finetune-job run

test: install
	$(VENV)/bin/pytest

## Regenerate the README's variable and exit-code tables from job/config.py and job/errors.py.
docs: install
	$(PY) scripts/update_readme.py

## Re-pin requirements.lock (the image) and requirements-dev.lock (CPU development and CI) from pyproject.toml with uv.
lock:
	scripts/lock.sh

clean:
	rm -rf $(VENV) build runs

# >>> packaging (issue 4): the chart's generated values and k8s/, from job/config.py and helm/finetune-job
.PHONY: k8s k8s-check

## Regenerate the chart's config values and schema from job/config.py, then k8s/ from the chart (helm-python-sdk).
k8s: install
	$(PY) scripts/render_k8s.py

## Fail when they are stale (tests/packaging checks the same).
k8s-check: install
	$(PY) scripts/render_k8s.py --check
# <<< packaging
