# Two set-up commands on a fresh clone: `make demo` (the main job end to end on the bundled sample)
# and `make test` (the test suite). Both create/use the virtual environment in $(VENV) themselves.
PYTHON ?= python3
VENV ?= .venv
# CPU machines get the CPU build of torch; with `nvidia-smi` present pip's default (CUDA) build is used.
# Elsewhere add e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: venv demo test lint contracts
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(VENV)/bin/pip install -q "torch>=2.4,<2.15"; \
	else $(VENV)/bin/pip install -q $(TORCH_INDEX) "$(TORCH)"; fi
	$(VENV)/bin/pip install -q -e ".[dev]"
	# CPU machines: build DeepSpeed's JIT-compiled CPU op now, not inside the first (interruptible) run.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	$(VENV)/bin/python -c "import trainer.distributed as d; d.prebuild_cpu_ops()"; fi
	touch $@

demo: venv
	$(VENV)/bin/python -m launcher.demo

test: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: contracts
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Layer contracts (pyproject.toml [tool.importlinter]): imports point down only, ray/argparse in launcher.
contracts: venv
	$(VENV)/bin/lint-imports
