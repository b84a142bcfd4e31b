#!/usr/bin/env bash
# Install spartune with its test extras into .venv and run the whole test suite (slow included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SPARTUNE_EXTRAS=test source scripts/_install.sh
export MPLBACKEND=Agg
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[spartune] pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
