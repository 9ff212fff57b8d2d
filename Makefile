# `make demo` and `make test` each set up their own virtual environment first.
VENV ?= .venv
PIP := $(VENV)/bin/pip

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# On a machine without a GPU, pin the CPU build (an unpinned torch pulls a multi-GB CUDA build).
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch>=2.4"; else $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/matvlm convert --ratio 0.25 --placement even --output runs/tiny-hybrid-0.25 --overwrite
	$(VENV)/bin/python examples/convert_and_generate.py --output runs/example-hybrid

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

.PHONY: demo test
