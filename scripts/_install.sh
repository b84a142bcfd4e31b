# Shared by quickstart.sh and test.sh: create .venv if missing and install spartune into it.
# Keeps a torch that is already importable (by the venv or by the python that makes it);
# otherwise installs torch==2.13.0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[spartune] creating .venv (reusing the torch of $PY)"
        "$PY" -m venv --system-site-packages .venv
    else
        echo "[spartune] creating .venv"
        "$PY" -m venv .venv
    fi
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[spartune] installing torch==2.13.0"
    "$VPY" -m pip install --quiet "torch==2.13.0"
fi
# SPARTUNE_EXTRAS: a comma list of extras, e.g. "test,postgres" -> pip install -e ".[test,postgres]"
EXTRAS="${SPARTUNE_EXTRAS:-}"
EXTRAS="${EXTRAS//[[:space:]]/}"  # "test, postgres" works too
EXTRAS="${EXTRAS#,}"
EXTRAS="${EXTRAS%,}"
echo "[spartune] installing spartune${EXTRAS:+[$EXTRAS]} (editable)"
"$VPY" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
