#!/usr/bin/env bash
# Run the workbook on the lent GPU machine (the device tool's `run`) and bring the report back.
#
#   device run, carry [".whl"], command:
#     bash scripts/device_report.sh                 # the GPU grid (iceaggr_lib/report.py), bounded to 390 s
#     bash scripts/device_report.sh --batch-sizes 4 1024 --repeats 5 --time-limit-s 60   # a smoke run
#   the full grid is too long for one 10-minute call: reports/h100 was made in 4 parts (~190 s each,
#   two parts per call), only the benchmark notebook on the GPU, the rest here (no GPU needed):
#     REPORT_DIR=reports/h100_bf16_h1 bash scripts/device_report.sh --dtypes bfloat16 --n-heads 1 \
#         --notebooks 02_benchmark --no-html --time-limit-s 250        # likewise bf16 8, float32 1, float32 8
#   here, for each part: mkdir -p reports/h100/parts && tar xzf FILES_AT/h100_report.tar.gz -C /tmp \
#         && mv /tmp/h100_bf16_h1 reports/h100/parts/bf16_h1
#     .venv/bin/python -m iceaggr_lib.report --notebooks 01_sparsity 03_report \
#         --results-dirs reports/h100/parts/* --out reports/h100
#
# .whl holds the notebook stack as wheels (papermill, ipykernel, nbconvert, nbval, ...):
#   cp -r ../shared/device-wheels .whl     (git-ignored; see /work/shared/device-wheels/README.md)
# The machine's python3 already has torch, triton, pandas, pyarrow, matplotlib and tqdm.
#
# It installs the wheels into /tmp/site, generates the embedded sample (data/sample), runs
# 01_sparsity, 02_benchmark and 03_report with papermill into reports/h100/ (executed notebooks,
# benchmark.csv, environment.json, sparsity_summary.json, figures/, summary.md, HTML), and packs that
# folder into $OUT/h100_report.tar.gz; the log goes to $OUT/report.log. Extra arguments go to
# `python -m iceaggr_lib.report`. Unpack here with: tar xzf h100_report.tar.gz -C reports/
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
REPORT_DIR=${REPORT_DIR:-reports/h100}

if python3 -c "import papermill, nbconvert, ipykernel" 2>/dev/null; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the notebook stack is already there
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_report: installing the wheels from .whl failed (was .whl carried?)"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH JUPYTER_PATH=/tmp/site/share/jupyter
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# One device command may run 10 minutes: unless the caller bounds the grid, stop starting new grid points
# after GRID_LIMIT_S seconds (later points become rows "skipped: ... time limit"), leaving time for the
# start, the sample, notebooks 01 and 03, the HTML and the tarball.
case " $* " in *" --time-limit-s "*) LIMIT=() ;; *) LIMIT=(--time-limit-s "${GRID_LIMIT_S:-390}") ;; esac
python3 -m iceaggr_lib.report --out "$REPORT_DIR" --kernel python3 "${LIMIT[@]}" "$@" 2>&1 | tee "$OUT/report.log"
status=${PIPESTATUS[0]}

tar czf "$OUT/h100_report.tar.gz" -C "$(dirname "$REPORT_DIR")" "$(basename "$REPORT_DIR")"
ls -la "$REPORT_DIR" "$REPORT_DIR/figures" 2>/dev/null
du -h "$OUT/h100_report.tar.gz"
[ -f "$REPORT_DIR/summary.md" ] && head -40 "$REPORT_DIR/summary.md"
echo "device_report: report exit status $status"
exit "$status"
