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

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,eval]'
	$(BIN)/pip install -q --no-deps $(LMMS_EVAL)
	touch $(STAMP)

demo: venv
	$(BIN)/python jobs/demo.py --config configs/demo.yaml

test: venv
	$(BIN)/python -m pytest -q tests

test-unit: venv
	$(BIN)/python -m pytest -q -m unit tests

clean:
	rm -rf $(VENV) runs .cache
