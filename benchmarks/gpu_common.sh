# Sourced by benchmarks/gpu_*.sh after they set OUT_DIR (their first argument, else $OUT, else their own folder):
# strict mode, the repository root as the working folder, PY (python3 unless $PYTHON), unbuffered output and no
# memory preallocation (the device peak is then what the run uses), and two functions.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

# gpu_header: the card, its driver and the framework versions, printed and written to $OUT_DIR/gpu.txt.
gpu_header() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
    "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())" \
        | tee -a "$OUT_DIR/gpu.txt"
}

# gpu_exit WHAT RC MD: the closing line of a benchmark run (appended to MD), then exit with its status RC.
gpu_exit() {
    echo "$1 exit $2 (124: cut at the time limit; the JSON keeps the rows measured)" | tee -a "$3"
    exit "$2"
}
