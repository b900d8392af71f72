#!/usr/bin/env bash
# Install the project and its known-good dependency set (CPU torch from local disk where available).
#   bash scripts/install.sh          # library + app
#   bash scripts/install.sh test     # + test tools (pytest, notebook runner, browser test: Debian chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-ci.txt
if [ "${1:-}" = "test" ]; then
  python -m pip install -q -e ".[test,app,browser-test]"
  # The browser test drives Debian's Chromium through Playwright (Playwright's own browser download is not used).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } >/dev/null \
      || echo "note: could not install chromium (apt-get); the browser tests will be skipped" >&2
  fi
else
  python -m pip install -q -e ".[app]"
fi
