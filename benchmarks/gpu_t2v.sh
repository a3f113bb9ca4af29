#!/usr/bin/env bash
# benchmarks.t2v on one GPU (H100/H200), as one prepared command inside a device lease:
#
#   run(command="bash benchmarks/gpu_t2v.sh", timeout_s=600)          # the device tool; JSON + table under $OUT
#   bash benchmarks/gpu_t2v.sh [OUT_DIR]                               # any CUDA machine with jax[cuda] + torch
#
# clip_wti at the official size: ViT-B/32 (151M parameters with the seqTransf head), 12 frames at 224, 32 words,
# B = 64 pairs per step (768 frames), the 1k-A-like split of N = 1,000 captions x 1,000 videos; true float32 in
# both frameworks (JAX jax_default_matmul_precision=highest, torch allow_tf32=False; printed in the header), bf16
# JAX rows (model.precision=bf16), 10 timed calls per row, torch.compile with T2V_COMPILE_TIMEOUT (150 s) per
# compiled column (they run last: a cut-short run keeps every other row). The input section measures the host
# pipeline at batch 64 with as many threads as the host has cores (16 on the lent machines): the frames/s such a
# host feeds, against the JAX step's need. It needs PyAV (and decord for its comparison row) in the device
# image's python; without them the input cell says so and the rest runs. The whole run is capped at
# T2V_GPU_TIMEOUT seconds (default 540, inside the tool's 600); results are saved after every measurement
# (OUT_DIR/t2v_gpu.json has "partial": true when cut, and its tables are printed from it). Then: copy the JSON to docs/results/ and the tables into
# docs/benchmarks.md ("Text-video retrieval (clip_wti)"), naming the card.
OUT_DIR=${1:-${OUT:-gpu_t2v_out}}
source "$(dirname "$0")/gpu_common.sh"
gpu_header
"$PY" -c "import av; print('PyAV', av.__version__)" 2>&1 | tail -1 | tee -a "$OUT_DIR/gpu.txt"
"$PY" -c "import decord; print('decord', decord.__version__)" 2>&1 | tail -1 | tee -a "$OUT_DIR/gpu.txt"
echo "host cores: $(nproc)" | tee -a "$OUT_DIR/gpu.txt"
timeout "${T2V_GPU_TIMEOUT:-540}" "$PY" -m benchmarks.t2v --device gpu --size official --bf16 \
    --sections "${T2V_SECTIONS:-forward,train,eval,input,memory}" --repeats "${T2V_REPEATS:-10}" \
    --eval-n "${T2V_EVAL_N:-1000}" --workers "${T2V_WORKERS:-$(nproc)}" \
    --compile-timeout "${T2V_COMPILE_TIMEOUT:-150}" --timeout 300 \
    --out "$OUT_DIR/t2v_gpu.json" --log "$OUT_DIR/t2v_gpu_workers.log" 2>&1 | tee "$OUT_DIR/t2v_gpu.md"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ -f "$OUT_DIR/t2v_gpu.json" ]; then  # cut short: the tables of what was measured
    "$PY" -m benchmarks.t2v --report "$OUT_DIR/t2v_gpu.json" | tee -a "$OUT_DIR/t2v_gpu.md"
fi
gpu_exit benchmarks.t2v "$rc" "$OUT_DIR/t2v_gpu.md"
