#!/usr/bin/env bash
# GPU check (issue 10): the paper profile end to end (CIFAR-10, ResNet-32, all five notebooks, notebook 02's
# stAdv settings and flow calibration included) with reduced epochs and counts, into a fresh run directory;
# then the reported-vs-reproduced tables (advkit.studies.published). Meant to take under 8 minutes on one H200.
# Output is appended to benchmarks/RESULTS.md with the device named.
#
#   benchmarks/gpu_check.sh               # refuses without a CUDA GPU
#   benchmarks/gpu_check.sh --cpu-smoke   # (or ADVKIT_CPU_SMOKE=1) the same path with tiny sizes on the CPU
#   benchmarks/gpu_check.sh --speed       # issue 12's speed table instead (benchmarks/speed_table.py, ~7 min on
#                                         # an H200; ADVKIT_SPEED_ARGS="--profile --checkpoint F" adds options)
#   benchmarks/gpu_check.sh --speed --cpu-smoke   # its smoke: tiny sizes on the CPU, random images
#   (docs/gpu.md: the speed table's rows, their correctness bounds and what to send to a bare GPU machine)
#
# CIFAR-10: $ADVKIT_CIFAR10_DIR, else shared-data/cifar10-jpeg, else data/; else the tarball
# $ADVKIT_CIFAR10_TGZ (default: shared-data/, shared/data/ or ../shared/data/cifar10-jpeg.tgz) is extracted to
# /tmp. For a machine that gets a copy of the working tree: `cp ../shared/data/cifar10-jpeg.tgz shared-data/`
# (19 MB; the decoded cifar10.npz is 185 MB) and send that ignored file along with the tree.
# Python: $PYTHON, else .venv/bin/python, else python3. Extra parameters: ADVKIT_GPU_CHECK_PARAMS="-p a=1 -p b=2".
# ADVKIT_RESULTS_FILE writes the entry elsewhere than benchmarks/RESULTS.md (e.g. for a rehearsal);
# ADVKIT_GPU_CHECK_OUT reuses an output folder (training resumes from its checkpoints) instead of a fresh one.
#
# A machine without papermill, ipykernel, ipywidgets or h5netcdf (e.g. one with only torch) and no network: put
# wheels in the git-ignored .whl/ folder beforehand; they are installed into /tmp/site (PYTHONPATH) first:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       papermill ipykernel ipywidgets h5netcdf h5py nbformat xarray pyyaml scikit-image seaborn tqdm -d .whl
# (match --python-version to the target's Python; leave torch/torchvision out: the target has them).
# The speed table's references, installed with --no-deps (torchattacks pins requests~=2.25.1; PyHessian-0.1,
# a pure-python wheel, asks for torch): without them their rows say "reference not installed":
#   pip download --only-binary=:all: --no-deps torchattacks==3.5.1 pyhessian==0.1 -d .whl
# The speed table alone needs numpy, pyyaml, xarray, pandas, scipy, tqdm (and torch; torchattacks imports scipy
# and tqdm): `--speed` checks only these.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SMOKE=${ADVKIT_CPU_SMOKE:-0}
SPEED=0
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    --speed) SPEED=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (allowed: --cpu-smoke, --speed, --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=${ADVKIT_SITE:-/tmp/site}
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  NODEPS=$(ls .whl/*.whl | grep -iE '/(torchattacks|pyhessian)-' || true)
  DEPS=$(ls .whl/*.whl | grep -viE '/(torchattacks|pyhessian)-' || true)
  if [ -n "$DEPS" ]; then "$PY" -m pip install --quiet --no-index --find-links .whl --target "$SITE" $DEPS; fi
  if [ -n "$NODEPS" ]; then "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" $NODEPS; fi
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
NEEDED="papermill, ipykernel, ipywidgets, nbformat, yaml, xarray, h5netcdf, skimage, seaborn, scipy, pandas, torchvision"
if [ "$SPEED" = 1 ]; then NEEDED="numpy, yaml, xarray, pandas, scipy, tqdm"; fi
if ! "$PY" -c "import $NEEDED" 2>/dev/null; then
  echo "gpu_check: $PY lacks advkit's dependencies; install them (pip install -e .) or prepare .whl/ (see the top of $0)" >&2
  exit 4
fi

if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
  if [ "$SMOKE" != 1 ]; then
    echo "gpu_check: no CUDA GPU here; this check is meant for one. Rehearse on the CPU with --cpu-smoke (or ADVKIT_CPU_SMOKE=1)." >&2
    exit 3
  fi
fi

speed_table() {  # issue 12's table: benchmarks/speed_table.py with the given options and ADVKIT_SPEED_ARGS
  for lib in torchattacks pyhessian; do
    "$PY" -c "import $lib" 2>/dev/null || echo "gpu_check: $lib is not installed: its rows will say 'reference not installed' (see the top of $0)" >&2
  done
  local extra=()
  if [ -n "${ADVKIT_SPEED_ARGS:-}" ]; then read -r -a extra <<< "$ADVKIT_SPEED_ARGS"; fi
  "$PY" benchmarks/speed_table.py "$@" --results "${ADVKIT_RESULTS_FILE:-benchmarks/RESULTS.md}" "${extra[@]}"
}
if [ "$SPEED" = 1 ] && [ "$SMOKE" = 1 ]; then
  speed_table --smoke --device cpu
  exit 0
fi

DATA=${ADVKIT_CIFAR10_DIR:-}
if [ -z "$DATA" ]; then
  for d in shared-data/cifar10-jpeg data; do
    if [ -d "$d/train" ] || [ -d "$d/cifar-10-batches-py" ]; then DATA=$ROOT/$d; break; fi
  done
fi
if [ -z "$DATA" ]; then
  TGZ=${ADVKIT_CIFAR10_TGZ:-}
  for t in shared-data/cifar10-jpeg.tgz shared/data/cifar10-jpeg.tgz ../shared/data/cifar10-jpeg.tgz; do
    if [ -z "$TGZ" ] && [ -f "$t" ]; then TGZ=$t; fi
  done
  if [ -z "$TGZ" ]; then
    echo "gpu_check: no CIFAR-10 found: set ADVKIT_CIFAR10_DIR (train/<class>/*.jpg, test/...) or ADVKIT_CIFAR10_TGZ" >&2
    exit 5
  fi
  mkdir -p /tmp/advkit-cifar10 && tar xzf "$TGZ" -C /tmp/advkit-cifar10
  DATA=$(dirname "$(find /tmp/advkit-cifar10 -maxdepth 3 -type d -name train | head -1)")
fi

if [ "$SPEED" = 1 ]; then
  speed_table --data-dir "$DATA"
  exit 0
fi

OUT=${ADVKIT_GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/advkit-gpu-check.XXXXXX")}  # set it to resume a run
export ADVKIT_RUNS_DIR=$OUT/runs ADVKIT_FIGURES_DIR=$OUT/figures
RUN=gpu_check
COMMON=(--profile paper -p run=$RUN -p dataset=cifar10 -p "data_dir=$DATA")
if [ "$SMOKE" = 1 ]; then
  MODE="CPU smoke (tiny sizes)"
  P01=(-p epochs=1 -p n_train=512 -p threads=2)
  # One variant per objective (awp, mart, fgsm_rs included): the modifiers (ls, ln, wd, swa, aa, eps) train
  # like pgd_at, and twelve ResNet-18s through notebooks 04-05 take far more than 10 minutes on 2 CPU cores.
  P25=(-p n_train=128 -p threads=2
       -p n_eval=32 -p n_autoattack=16 -p aa_steps=5 -p aa_targets=3 -p stadv_steps=3 -p "eps_grid=[0.0, 0.031372549]"
       -p finetune_epochs=1 -p at_epochs=1 -p at_steps=2 -p n_robust_train=32 -p n_robust_test=32 -p n_val=32
       -p "at_variants=[pgd_at, trades, mart, awp, fgsm_rs]"
       -p epoch_steps=2 -p early_stop_steps=2 -p "keep_epochs=[1]"
       -p n_images=16 -p resolution=7 -p line_resolution=9 -p radius=0.5 -p robust_n_images=8 -p robust_resolution=0
       -p sensitivity_resolution=5 -p "sensitivity_radii=[0.5]" -p "sensitivity_none_radii=[0.05]"
       -p n_subset=16 -p pgd_steps=2 -p pgd_restarts=1 -p flatness_samples=2 -p worst_steps=2 -p hessian_iters=3
       -p hessian_samples=4 -p n_resamples=100
       -p direction_replicates=2 -p replicate_resolution=5 -p replicate_n_images=16 -p curvature_images=16
       -p eigen_map_resolution=3 -p eigen_map_steps=3 -p invariance_images=16)
else
  MODE="paper profile, reduced epochs and counts"
  P01=(-p epochs=10)
  P25=(-p n_train=10000
       -p n_eval=2000 -p n_autoattack=500 -p aa_steps=20 -p stadv_steps=20
       -p finetune_epochs=2 -p at_epochs=3 -p n_robust_train=500 -p n_robust_test=500 -p n_val=500
       -p epoch_steps=10 -p "keep_epochs=[1, 2]"
       -p n_images=2000 -p resolution=21 -p line_resolution=21 -p robust_n_images=200 -p robust_resolution=0
       -p sensitivity_resolution=11
       -p n_subset=500 -p pgd_steps=10 -p flatness_samples=5 -p worst_steps=5 -p hessian_iters=10
       -p hessian_samples=20 -p n_resamples=1000 -p invariance_images=500)
fi
EXTRA=()
if [ -n "${ADVKIT_GPU_CHECK_PARAMS:-}" ]; then read -r -a EXTRA <<< "$ADVKIT_GPU_CHECK_PARAMS"; fi

LOG=$OUT/log.txt
DEVICE=$("$PY" -c 'import platform, torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)")')
echo "gpu_check: $MODE on $DEVICE; data $DATA; run $ADVKIT_RUNS_DIR/$RUN"
START=$(date +%s)
STATUS=0
# The base model trains on the whole training set; n_train limits notebook 03's fine-tunes and AT runs.
"$PY" -m advkit run "${COMMON[@]}" --only 01 "${P01[@]}" "${EXTRA[@]}" 2>&1 | tee "$LOG" || STATUS=$?
if [ "$STATUS" = 0 ]; then
  "$PY" -m advkit run "${COMMON[@]}" --only 02,03,04,05 "${P25[@]}" "${EXTRA[@]}" 2>&1 | tee -a "$LOG" || STATUS=$?
fi
WALL=$(( $(date +%s) - START ))

TABLES=$OUT/tables.txt
"$PY" -m advkit.studies.published "$ADVKIT_RUNS_DIR/$RUN" > "$TABLES" 2>&1 || true
for f in "$ADVKIT_RUNS_DIR/$RUN"/attacks/*flow*.csv; do  # notebook 02's stAdv flow calibration, when it has one
  if [ -f "$f" ]; then printf '\n## %s\n\n' "${f#"$ADVKIT_RUNS_DIR/$RUN/"}" >> "$TABLES"; cat "$f" >> "$TABLES"; fi
done
cat "$TABLES"

"$PY" - "$LOG" "$TABLES" "$MODE" "$DEVICE" "$WALL" "$STATUS" <<'EOF'
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from common import append_results  # noqa: E402

log, tables, mode, device, wall, status = sys.argv[1:]
times = re.findall(r"\[advkit\] (\S+?)(?:\.ipynb)? done in (\d+) s", Path(log).read_text())
rows = "\n".join(f"| {name} | {sec} |" for name, sec in times)
table = (f"| notebook | seconds |\n|---|---|\n{rows}\n| total (wall) | {wall} |\n\n"
         f"exit status {status}\n\n```\n{Path(tables).read_text().strip()}\n```")
target = os.environ.get("ADVKIT_RESULTS_FILE") or "benchmarks/RESULTS.md"
append_results(f"gpu_check.sh: {mode}", f"device: {device}", table, path=Path(target))
print(f"gpu_check: appended to {target}")
EOF
echo "gpu_check: $MODE finished in ${WALL}s with status $STATUS; run directory $ADVKIT_RUNS_DIR/$RUN"
exit "$STATUS"
