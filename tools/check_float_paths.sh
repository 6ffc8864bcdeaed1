#!/usr/bin/env bash
# Do the notebooks' nbval checks hold on another CPU? Re-execute them under other float paths (SIMD
# kernels of ATen, oneDNN, MKL and OpenBLAS; thread counts) and compare with nbval, its sanitizers and
# the tolerance for decimals (tools/nbval_tolerance.py; a notebook folder outside the repository does
# not see conftest.py, hence -p).
#
#   tools/check_float_paths.sh                   # committed notebooks vs. every setting below
#   tools/check_float_paths.sh generic           # one setting
#   tools/check_float_paths.sh --tests generic   # the README's whole test command (unit tests too) there
#   tools/check_float_paths.sh --reference all   # first execute the notebooks here (quick profile, temp
#                                                # dir) and compare against those executions instead
#   NBDIR=runs/x/quick/notebooks tools/check_float_paths.sh   # compare against executed notebooks there
#
# Each setting re-executes all five notebooks (8 min on a shared 2-core machine). Nothing is written to runs/,
# figures/ or notebooks/. Exit status: non-zero when any setting fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CFG=$PWD/nbval_sanitize.cfg

declare -A SETTINGS=(
  [generic]="ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Haswell ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
  [avx2]="ATEN_CPU_CAPABILITY=avx2 OPENBLAS_CORETYPE=SkylakeX OMP_NUM_THREADS=1"
)
ORDER=(generic avx2)

reference=0
tests=()
while [ $# -gt 0 ]; do
  case "$1" in
    --reference) reference=1; shift ;;
    --tests) tests=(tests); shift ;;
    *) break ;;
  esac
done
names=("$@")
# With the unit tests, side by side in workers as `make test` runs them (tests/conftest.py keeps the notebooks
# in one worker, in order).
xdist=()
if [ ${#tests[@]} -gt 0 ]; then xdist=(-n auto --maxprocesses 4 --dist loadfile); fi
if [ ${#names[@]} -eq 0 ] || [ "${names[0]}" = "all" ]; then names=("${ORDER[@]}"); fi
for n in "${names[@]}"; do
  [ -n "${SETTINGS[$n]+x}" ] || { echo "unknown setting '$n'; choose from: ${ORDER[*]} all" >&2; exit 2; }
done

work=$(mktemp -d -t advkit-floatpaths-XXXX)
nbdir=$(realpath "${NBDIR:-notebooks}")
if [ $reference = 1 ]; then
  echo "== reference: executing the notebooks with this machine's defaults into $work/ref"
  ADVKIT_RUNS_DIR=$work/ref ADVKIT_FIGURES_DIR=$work/ref-figures "$PY" -m advkit run --profile quick
  nbdir=$work/ref/quick/notebooks
fi

status=0
for n in "${names[@]}"; do
  echo "== $n: ${SETTINGS[$n]}"
  # shellcheck disable=SC2086
  if env ${SETTINGS[$n]} ADVKIT_RUNS_DIR="$work/$n" ADVKIT_FIGURES_DIR="$work/$n-figures" \
      "$PY" -m pytest -c pyproject.toml --rootdir "$PWD" -p no:cacheprovider -p tools.nbval_tolerance -q --nbval \
      --nbval-sanitize-with "$CFG" "${xdist[@]}" "$nbdir"/0*.ipynb "${tests[@]}"; then
    echo "== $n: PASS"
  else
    echo "== $n: FAIL"; status=1
  fi
done
echo "(work files in $work)"
exit $status
