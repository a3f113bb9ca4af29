#!/usr/bin/env bash
# parity.check for MRNet at the OFFICIAL size (the released widths: ActivityNet 77.5M parameters with a 9x9 x 4
# conv stack of 512 channels on 64 x 64 maps; TACoS 128 x 128 maps; Charades 17x17 kernels), float32 and
# float64, all three configs: issue 14's official-size parity, outside CI.
#
#   bash scripts/mrnet_official_parity.sh [OUT_DIR]                  # any machine; hours on 2 CPU cores
#   run(command="bash scripts/mrnet_official_parity.sh", timeout_s=600)   # the device tool (16 cores, GPU)
#
# JAX runs on its default backend (the GPU where there is one; true float32: --matmul-precision highest, the
# default), the twin on the CPU (MRNet's check keeps it there); a 16-core host runs the twin's convolutions fast.
# Each (config, dtype, group) writes OUT_DIR/<config>-<dtype>-<group>.json and .txt as it finishes (a rerun skips
# the finished ones); MRNET_CONFIGS / MRNET_DTYPES / MRNET_GROUPS select a subset, MRNET_VIDEOS the videos per batch
# (default 2 + 1 padding video), MRNET_TIMEOUT caps each check. On 2 CPU cores the ActivityNet float32 check ran
# 87 min and reached the training group (14.9 GB peak): budget hours per config there.
# Then: paste the summary lines into docs/parity.md ("MRNet", "Official size").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-mrnet_official_parity}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
# one group per process: a run cut short keeps every finished group's rows (the table prints at a check's end)
GROUPS=${MRNET_GROUPS:-convert block model loss grad train dropout metrics}
for cfg in ${MRNET_CONFIGS:-activitynet tacos charades}; do
  for dt in ${MRNET_DTYPES:-float32 float64}; do
    for g in $GROUPS; do
      [ -s "$OUT_DIR/$cfg-$dt-$g.json" ] && { echo "== $cfg $dt $g: done before"; continue; }
      echo "== $cfg $dt $g"
      /usr/bin/time -f "%e s wall, %M KB peak" timeout "${MRNET_TIMEOUT:-14400}" "$PY" -m parity.check --model mrnet \
          --config "$cfg" --dtype "$dt" --groups "$g" --videos "${MRNET_VIDEOS:-2}" \
          --json "$OUT_DIR/$cfg-$dt-$g.json" > "$OUT_DIR/$cfg-$dt-$g.txt" 2>&1
      rc=$?
      tail -n 2 "$OUT_DIR/$cfg-$dt-$g.txt"
      [ $rc -eq 0 ] || status=$rc
    done
  done
done
exit $status
