#!/usr/bin/env bash
# Set up .venv if needed, lint (ruff, configured in pyproject.toml), then run the test suite (again
# for the library under another CPU setting) and validate the notebooks, all in the smoke profile.
# Extra arguments go to the first pytest call (e.g. -k kernel, -x, -m "not slow").
# Exit status is non-zero if any step fails; every step always runs so one CI log shows all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

scripts/setup_env.sh
py=.venv/bin/python
export NETSIM_PROFILE=smoke MPLBACKEND=Agg

status=0
echo "== ruff check"
"$py" -m ruff check . || status=$?

echo "== pytest tests/ (profile smoke)"
"$py" -m pytest tests/ "$@" || status=$?

# The run above used this machine's own instruction set (AVX2 or AVX512) and all its cores. Two code
# paths agree to float rounding, not bitwise by luck of one setting: the library's tests and the
# sinusoid training run again without SIMD kernels and on one thread (the memory, process and
# packaging tests measure other things and are not repeated).
echo "== pytest tests/netsim and the sinusoid training again (ATEN_CPU_CAPABILITY=default, 1 thread)"
ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 "$py" -m pytest -q -m "not memory" tests/netsim \
    tests/paper/test_sinusoid_stacked.py --ignore=tests/netsim/test_distributed.py \
    --ignore=tests/netsim/test_packaging.py --ignore=tests/netsim/test_threads.py || status=$?

shopt -s nullglob
notebooks=(notebooks/*.ipynb)
if ((${#notebooks[@]} == 0)); then
    echo "== nbval: no notebooks/*.ipynb, skipped"
else
    # --nbval-lax: a cell fails on an exception; outputs are compared only in cells marked
    # "# NBVAL_CHECK_OUTPUT". --nbval-current-env: run in .venv's python, not whatever
    # kernel the notebook metadata names.
    echo "== nbval on ${#notebooks[@]} notebook(s) (profile smoke)"
    nb_status=0
    "$py" -m pytest --nbval-lax --nbval-current-env "${notebooks[@]}" || nb_status=$?
    ((nb_status == 0)) || status=$nb_status
fi
exit "$status"
