# `make demo` and `make test` set everything up on a machine with only Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Without a GPU, pin the CPU-friendly torch this project tests on (a local file
# on our CI machines); with one, let pip pick a CUDA build. Override: make TORCH=...
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.13,torch==2.13.0)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

# The main job: the sentiment recipe, LoRA on the embedded MiniLM, trained, evaluated and exported.
demo: setup
	$(VENV)/bin/peftkit train recipes/sentiment-lora.yaml

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
