#!/usr/bin/env bash
# Reproduce every figure: set up .venv if needed, execute the notebooks headless with
# papermill, publish figures + metrics JSON, regenerate the README results table.
#
#   ./run_all.sh                          # paper profile, all notebooks -> figures/
#   ./run_all.sh --profile smoke          # minutes; -> figures/smoke/ (git-ignored)
#   ./run_all.sh 02_sinusoid_density notebooks/03_mnist_speedup.ipynb
#
# Stops at the first failing notebook and says why (its failing cell, a malformed notebook,
# a dead kernel); that notebook's previous figures stay untouched (lib/netsim_paper/runner.py).
# Executed notebooks go to build/notebooks/<profile>/; in the paper profile each one that
# passed is also published, slimmed (at most 5 MB), to figures/notebooks/<name>.ipynb.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

case "${1:-}" in
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

scripts/setup_env.sh
py=.venv/bin/python

status=0
"$py" -m netsim_paper.runner "$@" || status=$?
# Regenerate the table even after a failure: the notebooks that passed before it have
# already published new JSON, and the README must always match figures/*.json.
"$py" -m netsim_paper.report update-readme
exit "$status"
