#!/usr/bin/env bash
# Several grid parts of reports/h100 in one device call (each part: scripts/device_report.sh, benchmark notebook only),
# then the harness's CUDA test if time is left.
#
#   device run, carry [".whl"], command:
#     bash scripts/device_parts.sh bf16_h8:bfloat16:8 fp32_h8:float32:8      # ~9 minutes: the two 8x16 parts
#     bash scripts/device_parts.sh bf16_h1:bfloat16:1 fp32_h1:float32:1      # the two 1x128 parts
#   each NAME:DTYPE:HEADS part's tarball comes back as $OUT/NAME/h100_report.tar.gz; here, for each:
#     tar xzf FILES_AT/NAME/h100_report.tar.gz -C /tmp && rm -rf reports/h100/parts/NAME \
#         && mv /tmp/h100_NAME reports/h100/parts/NAME
#     .venv/bin/jupyter nbconvert --to html reports/h100/parts/NAME/02_benchmark.ipynb
#   then rebuild the report as scripts/device_report.sh says.
# GRID_S bounds each part's grid (default 212 s: 200 s cut the bf16 8x16 part's last point in run 133); LIMIT_S the
# whole call (default 590 s, under the device's 10 minutes): a part that cannot finish is cut, the earlier ones are kept.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-/tmp/out}
LIMIT_S=${LIMIT_S:-590}
mkdir -p "$OUT"  # (the device tool makes it; a run elsewhere may not have it)
python3 -c "from iceaggr_lib import envinfo; print('iceaggr_lib digest', envinfo.source_digest())"
for part in "$@"; do
  IFS=: read -r name dtype heads <<< "$part"
  [ -n "$heads" ] || { echo "device_parts: '$part' is not NAME:DTYPE:HEADS"; exit 2; }
  OUT=$OUT/$name REPORT_DIR=reports/h100_$name timeout $(( LIMIT_S - 5 - (SECONDS - T0) )) bash scripts/device_report.sh \
    --dtypes "$dtype" --n-heads "$heads" --notebooks 02_benchmark --no-html --time-limit-s "${GRID_S:-212}" \
    > "$OUT/$name.log" 2>&1
  status=$?
  csv=reports/h100_$name/benchmark.csv
  if [ -f "$csv" ]; then
    echo "device_parts: $name exit status $status at $((SECONDS - T0)) s; $(grep -c ',ok,' "$csv") ok rows," \
         "$(grep -c 'time limit' "$csv") cut by the time limit"
  else
    echo "device_parts: $name exit status $status at $((SECONDS - T0)) s, no $csv: see $OUT/$name.log"
  fi
done
left=$(( LIMIT_S - 5 - (SECONDS - T0) ))
if [ "$left" -gt 40 ]; then
  PYTHONPATH=/tmp/site:$PWD timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda 2>&1 | tail -2
fi
