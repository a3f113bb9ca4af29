#!/usr/bin/env bash
# benchmarks.vmr on one GPU (H100/H200), as one prepared command inside a device lease:
#
#   run(command="bash benchmarks/gpu_vmr.sh", timeout_s=600)          # the device tool; JSON + table under $OUT
#   bash benchmarks/gpu_vmr.sh [OUT_DIR]                               # any CUDA machine with jax[cuda] + torch
#
# The device image's python3 holds jax (CUDA), torch, flax, optax and h5py: nothing is installed. ActivityNet at
# the official size (77.5M parameters, B = 12), true float32 in both frameworks (JAX
# jax_default_matmul_precision=highest, torch allow_tf32=False; printed in the header), bf16 JAX rows, 10 timed
# calls per row, 240 of the 4,917 test videos (the official per-query Python NMS of the twin takes ~30 ms per
# query: the full split's 17,031 queries would take ~9 min per pass on their own), torch.compile with 150 s per
# compiled column. The whole run is capped at VMR_GPU_TIMEOUT seconds (default 540, inside the tool's 600);
# results are saved after every measurement, so a run that is cut short keeps what it measured
# (OUT_DIR/vmr_gpu.json has "partial": true then). Then: copy the JSON to docs/results/ and the tables into
# docs/benchmarks.md ("Moment retrieval (MRNet)"), naming the card.
#
# MESM (benchmarks.vmr --models mesm, benchmarks/vmr_detr.py): a separate call, VMR_MODELS=mesm (MRNet's and MESM's
# runs do not both fit in one 600-s call, nor in a 15-min device budget):
#
#   run(command="VMR_MODELS=mesm bash benchmarks/gpu_vmr.sh", timeout_s=600)
#
# Charades-STA C+SF_C at the official size (12 videos per step), true float32 in both, bf16 JAX rows
# (model.compute_dtype=bfloat16), both train variants (text features cached; the CLIP tower in the step, float32),
# MESM_EVAL_VIDEOS (default 400) synthetic test videos (the real split: 1,334), torch.compile with 120 s per
# compiled column; OUT_DIR/mesm_gpu.{json,md}. Then copy the tables into docs/benchmarks.md ("Moment retrieval
# (MESM)").
OUT_DIR=${1:-${OUT:-gpu_vmr_out}}
source "$(dirname "$0")/gpu_common.sh"
gpu_header
if [ "${VMR_MODELS:-mrnet}" = mesm ]; then
    timeout "${VMR_GPU_TIMEOUT:-540}" "$PY" -m benchmarks.vmr --models mesm --device gpu --size official \
        --sections "${VMR_SECTIONS:-train,eval,memory}" --bf16 --repeats "${VMR_REPEATS:-10}" \
        --eval-videos "${MESM_EVAL_VIDEOS:-400}" --compile-timeout "${VMR_COMPILE_TIMEOUT:-120}" --timeout 240 \
        --out "$OUT_DIR/mesm_gpu.json" --log "$OUT_DIR/mesm_gpu_workers.log" 2>&1 | tee "$OUT_DIR/mesm_gpu.md"
    gpu_exit "benchmarks.vmr --models mesm" "${PIPESTATUS[0]}" "$OUT_DIR/mesm_gpu.md"
fi
timeout "${VMR_GPU_TIMEOUT:-540}" "$PY" -m benchmarks.vmr --device gpu --size official --config "${VMR_CONFIG:-activitynet}" \
    --sections "${VMR_SECTIONS:-train,eval,forward,retention,memory,conv}" --bf16 --repeats "${VMR_REPEATS:-10}" \
    --eval-videos "${VMR_EVAL_VIDEOS:-240}" --compile-timeout "${VMR_COMPILE_TIMEOUT:-150}" --timeout 300 \
    --out "$OUT_DIR/vmr_gpu.json" --log "$OUT_DIR/vmr_gpu_workers.log" 2>&1 | tee "$OUT_DIR/vmr_gpu.md"
gpu_exit benchmarks.vmr "${PIPESTATUS[0]}" "$OUT_DIR/vmr_gpu.md"
