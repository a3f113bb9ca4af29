#!/usr/bin/env bash
# MTM parity on a GPU: the official CUDA Mamba (mamba_ssm + causal_conv1d built from their sdists) against JAX.
#
# Two steps, because the GPU machine has no internet:
#
#   bash scripts/gpu_mtm_parity.sh fetch            # here (PyPI reachable): the two sdists -> .sdist/
#   bash scripts/gpu_mtm_parity.sh run [OUT_DIR]    # there (H100/H200, torch 2.11 + CUDA 13, jax[cuda] installed)
#
# `run` is `build` (the two CUDA packages into MAMBA_PREFIX, default .gpu_site/, with build.log and
# build_seconds.txt) then `check OUT_DIR` (parity.check on the GPU) and the selective-scan benchmark; the steps
# can be run one by one. Afterwards `PYTHONPATH=.gpu_site python -m benchmarks.prvr --device gpu` runs MTM's
# torch side on the official kernels.
#
# `run` unpacks the sdists, keeps only the target GPU architecture in their setup.py (they hard-code a list and
# ignore TORCH_CUDA_ARCH_LIST; MTM_CUDA_ARCH, default 90 = H100/H200), builds both with --no-build-isolation and
# FORCE_BUILD into a private prefix, then runs `python -m parity.check --model mtm --config tvr --device cuda`
# (the twin on the CUDA kernels, JAX on its GPU backend) and the selective-scan benchmark, printing the tables and
# writing OUT_DIR/{build.log,build_seconds.txt,mtm_parity_gpu.json,mtm_parity_gpu.md,selective_scan_gpu.json}.
# Record the table and the build time in docs/parity.md.
set -euo pipefail
cd "$(dirname "$0")/.."

MAMBA_VERSION=2.3.2.post1
CONV_VERSION=1.7.0
SDIST_DIR=${SDIST_DIR:-.sdist}

fetch() {
    mkdir -p "$SDIST_DIR"
    # The sdists' setup.py needs CUDA to even compute metadata; the skip flags let pip download them on CPU.
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE python -m pip download --no-binary :all: --no-deps --no-build-isolation \
        "mamba_ssm==$MAMBA_VERSION" "causal_conv1d==$CONV_VERSION" -d "$SDIST_DIR"
    grep -qx "/$SDIST_DIR/" .git/info/exclude 2>/dev/null || echo "/$SDIST_DIR/" >> .git/info/exclude
    ls -l "$SDIST_DIR"
}

keep_one_arch() {  # setup.py -> only `-gencode arch=compute_$1,code=sm_$1` (the other appends become `pass`)
    python - "$1" "$2" <<'EOF'
import re, sys
arch, path = sys.argv[1], sys.argv[2]
src = open(path).read()
pat = re.compile(r'^(\s*)cc_flag\.append\("-gencode"\)\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_(\d+)"\)$', re.M)
def keep(m):
    return m.group(0) if m.group(2) == arch else f"{m.group(1)}pass\n{m.group(1)}pass"
new, n = pat.subn(keep, src)
if n == 0 or f'arch=compute_{arch},code=sm_{arch}' not in new:
    sys.exit(f"{path}: no -gencode list with sm_{arch} found (setup.py changed?)")
open(path, "w").write(new)
print(f"{path}: kept sm_{arch} of {n} architectures")
EOF
}

build() {  # causal_conv1d + mamba_ssm for one GPU architecture into PREFIX (default .gpu_site)
    local prefix=${1:-${MAMBA_PREFIX:-.gpu_site}} arch=${MTM_CUDA_ARCH:-90} py=${PYTHON:-python3} work t0 log
    prefix=$(mkdir -p "$prefix" && cd "$prefix" && pwd)
    log=$prefix/build.log
    work=$(mktemp -d)
    t0=$(date +%s)
    for pkg in "causal_conv1d-$CONV_VERSION" "mamba_ssm-$MAMBA_VERSION"; do
        tar xzf "$SDIST_DIR/$pkg.tar.gz" -C "$work"
        keep_one_arch "$arch" "$work/$pkg/setup.py"
        ( cd "$work/$pkg" && MAX_JOBS=${MAX_JOBS:-$(nproc)} MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
            "$py" -m pip install --no-build-isolation --no-deps --no-index --target "$prefix" . ) \
            >> "$log" 2>&1 || { tail -40 "$log"; return 1; }
        echo "built $pkg ($(( $(date +%s) - t0 )) s so far)"
    done
    echo "$(( $(date +%s) - t0 ))" > "$prefix/build_seconds.txt"
    echo "build: $(cat "$prefix/build_seconds.txt") s for causal_conv1d + mamba_ssm (sm_$arch, MAX_JOBS=${MAX_JOBS:-$(nproc)}) -> $prefix"
}

check() {  # parity.check --model mtm on the GPU with the kernels built into PREFIX
    local out=${1:-${OUT:-gpu_out}} prefix=${MAMBA_PREFIX:-.gpu_site} py=${PYTHON:-python3}
    mkdir -p "$out"
    prefix=$(cd "$prefix" && pwd)
    export PYTHONPATH="$prefix:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c "import mamba_ssm, selective_scan_cuda, causal_conv1d_cuda; print('mamba_ssm', mamba_ssm.__version__, 'CUDA kernels loaded')"
    "$py" -m parity.check --model mtm --config tvr --device cuda --json "$out/mtm_parity_gpu.json" "$@" \
        | tee "$out/mtm_parity_gpu.md" || echo "parity.check exit status $?"
}

run() {
    local out=${1:-${OUT:-gpu_out}}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
    ${PYTHON:-python3} -c "import torch, jax; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| jax', jax.__version__, jax.devices())"
    build
    cp "${MAMBA_PREFIX:-.gpu_site}/build_seconds.txt" "$out/" 2>/dev/null || true
    check "$out"
    PYTHONPATH="$(cd "${MAMBA_PREFIX:-.gpu_site}" && pwd):$PWD" ${PYTHON:-python3} -m benchmarks.selective_scan \
        --out "$out/selective_scan_gpu.json" || true
}

case "${1:-}" in
    fetch) fetch ;;
    build) shift; build "$@" ;;
    check) shift; check "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/gpu_mtm_parity.sh fetch | build [PREFIX] | check [OUT_DIR] | run [OUT_DIR]" >&2; exit 2 ;;
esac
