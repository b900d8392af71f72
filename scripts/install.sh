#!/usr/bin/env bash
# Install the project and its known-good dependency set (CPU torch from local disk where available).
#   bash scripts/install.sh          # library + app
#   bash scripts/install.sh test     # + test tools (pytest, notebook runner, browser test: Debian chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-ci.txt
if [ "${1:-}" = "test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
