#!/usr/bin/env bash
# Runs every test. pytest's exit code 5 ("no tests collected") is a failure here, so a run
# that silently collected nothing is never taken for green.
set -uo pipefail
cd "$(dirname "$0")/.."
export TASKFLOW_BIN_DIR="$(bash hack/build-tools.sh all | tail -n1)"
export PATH="$TASKFLOW_BIN_DIR:$PATH"
.venv/bin/python -m pytest -ra "$@"
code=$?
if [[ $code -eq 5 ]]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $code
