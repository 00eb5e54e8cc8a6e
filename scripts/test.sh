#!/usr/bin/env bash
# Quality gates and the whole test suite: ruff, mypy on the three packages, pytest (swarm tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ] && . .venv/bin/activate
ruff check node protocol crypto tests bench
mypy node protocol crypto
python -m pytest -q -p no:cacheprovider "$@"
