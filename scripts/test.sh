#!/usr/bin/env bash
# Install spartune with its test extras into .venv and run the whole test suite (slow included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# tests/test_postgres.py needs a PostgreSQL server binary (initdb): when it is missing and this
# runs as root with apt-get, Debian's `postgresql` package is installed first (skip that with
# SPARTUNE_NO_PG_INSTALL=1); without it that test skips and says why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

install_postgresql() {
    if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then
        return 0
    fi
    if [ -n "${SPARTUNE_NO_PG_INSTALL:-}" ]; then
        echo "[spartune] PostgreSQL not installed (SPARTUNE_NO_PG_INSTALL set):" \
             "tests/test_postgres.py will skip"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "[spartune] PostgreSQL not installed and cannot install it here (needs root and" \
             "apt-get): tests/test_postgres.py will skip"
        return 0
    fi
    echo "[spartune] installing PostgreSQL (apt-get install postgresql) for tests/test_postgres.py"
    local log
    log="$(mktemp)"
    if { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                postgresql; } >"$log" 2>&1; then
        echo "[spartune] installed $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1)"
    else
        echo "[spartune] warning: installing PostgreSQL failed (tests/test_postgres.py will" \
             "skip); the end of apt-get's output:" >&2
        tail -n 5 "$log" >&2 || true
    fi
    rm -f "$log"
    return 0
}

install_postgresql || true
SPARTUNE_EXTRAS=test,postgres,all source scripts/_install.sh
export MPLBACKEND=Agg
set +e
# --durations: the slowest tests, printed at the end, keep the 30-minute budget in view
.venv/bin/python -m pytest --durations=25 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[spartune] pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
