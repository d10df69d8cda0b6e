#!/usr/bin/env bash
# Runs every test. pytest's exit code 5 ("no tests collected") is a failure here, so a run
# that silently collected nothing is never taken for green.
set -uo pipefail
cd "$(dirname "$0")/.."
export TASKFLOW_BIN_DIR="$(bash hack/build-tools.sh all | tail -n1)"
export PATH="$TASKFLOW_BIN_DIR:$PATH"
# The web view's tests (tests/integration/test_ui.py) drive headless Chromium: the Debian
# package (Playwright comes from the dev extra and never downloads a browser of its own).
if [[ ! -x "${TASKFLOW_CHROMIUM:-/usr/bin/chromium}" ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "[tests] installing chromium (apt-get) for the web view's tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/dev/null || echo "[tests] could not install chromium: the web view's tests will fail" >&2
  else
    echo "[tests] no chromium: install the Debian package (the web view's tests need it)" >&2
  fi
fi
.venv/bin/python -m pytest -ra "$@"
code=$?
if [[ $code -eq 5 ]]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $code
