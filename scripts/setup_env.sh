#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv.
#
# Called by run_all.sh and run_tests.sh (it may also be sourced: it only defines
# NETSIM_VENV and the private helpers it uses). Needs nothing but python3 (>= 3.11) and
# access to the package registry.
#
# .venv is "stale" when .venv/.netsim-stamp does not hold the sha256 of
# requirements.lock + both pyproject.toml files + scripts/constraints.txt, i.e. whenever any pin
# changed. A stale venv is rebuilt from scratch (upgrading in place would keep packages
# that left the lock). The stamp is written last, so an interrupted or failed install
# leaves no stamp and the next run starts over.
#
# Nothing global is touched: the Jupyter kernel "python3" that papermill and nbval use
# is registered inside the venv (--sys-prefix), pointing at the venv's interpreter.

_netsim_setup_env() {
    set -euo pipefail
    local root venv stamp want py
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    stamp="$venv/.netsim-stamp"
    want="$(cat "$root/requirements.lock" "$root/pyproject.toml" "$root/lib/pyproject.toml" "$root/scripts/constraints.txt" \
            | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"

    # Serialise concurrent set-ups (run_tests.sh and run_all.sh started together).
    if command -v flock >/dev/null 2>&1; then
        mkdir -p "$root/build"
        exec 9>"$root/build/.setup_env.lock"
        flock 9
    fi

    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c '' 2>/dev/null; then
        NETSIM_VENV="$venv"
        return 0
    fi

    echo "setup_env: building $venv (takes a minute or two) ..." >&2
    local t0=$SECONDS
    rm -rf "$venv"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "setup_env: python3 >= 3.11 required, found $(python3 --version)" >&2; return 1; }
    python3 -m venv "$venv"
    py="$venv/bin/python"
    # -qq: hide pip's progress and warnings (the machine's pip config emits one warning per
    # package about an absent mirror directory); errors are still printed.
    "$py" -m pip install -qq -r "$root/requirements.lock" -c "$root/scripts/constraints.txt"
    # setuptools comes from the lock (torch needs >= 77), so no isolated build env is needed.
    # Two distributions, both editable: the library (lib/) and the reproduction (the root).
    "$py" -m pip install -qq --no-deps --no-build-isolation -e "$root/lib" -e "$root"
    "$py" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (netsim)" >/dev/null
    "$py" -m pip check >/dev/null || { "$py" -m pip check >&2; return 1; }
    echo "$want" > "$stamp"
    echo "setup_env: ready in $((SECONDS - t0)) s" >&2
    NETSIM_VENV="$venv"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    _netsim_setup_env
else
    # Sourced: run in a subshell so set -e and the lock fd do not leak into the caller.
    ( _netsim_setup_env ) && NETSIM_VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv"
fi
