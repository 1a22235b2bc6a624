#!/usr/bin/env bash
# Set everything up (Python >= 3.12, .venv with the test extras) and run the whole test suite, then ruff.
# Arguments go to pytest (e.g. scripts/test.sh -k stream -x).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
cd "$ROOT"
"$VENV/bin/python" -m pytest "$@"
"$VENV/bin/ruff" check .
