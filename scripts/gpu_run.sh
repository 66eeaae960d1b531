#!/usr/bin/env bash
# Device-machine script: the benchmark, then the GPU tests; logs and results under $OUT (default ./gpu_out).
# Usage: scripts/gpu_run.sh [tests|bench|all|memcheck|attention|full] [extra bench args...]
#   full: the --full grid for one time (FULL_TIME, default 4096) per call, so each fits one device
#         command (FULL_MILLION=1 adds the 1,048,576-token cases); then `python scripts/bench.py --merge benchmarks/bench-full-*.json --tag full`
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# the package from this tree without `pip install -e .` (the device machine gets a bare copy)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"
if [[ $what == bench || $what == all ]]; then
  timeout ${BENCH_TIMEOUT:-420} python3 scripts/bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest tests/test_kernels.py tests/test_kernels_split.py tests/test_kernels_gpu.py tests/test_ops.py tests/test_merged.py tests/test_kernel_bounds.py tests/test_model_gpu.py \
    -n 12 --dist load -v -rf --tb=short -p no:cacheprovider -W ignore > "$OUT/gpu_tests.log" 2>&1; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -n 30
fi
if [[ $what == attention ]]; then
  timeout ${ATTN_TIMEOUT:-300} python3 attention.py fp16 2>&1 | tee "$OUT/attention_fp16.log"
fi
if [[ $what == full ]]; then
  T=${FULL_TIME:-4096}
  million=--no-million; [[ ${FULL_MILLION:-0} == 1 ]] && million=
  timeout ${BENCH_TIMEOUT:-540} python3 scripts/bench.py --out "$OUT" --full --times "$T" $million --tag "full-$T" "$@" 2>&1 | tee "$OUT/bench-full-$T.log"
fi
if [[ $what == memcheck ]]; then
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  [[ -z $CS ]] && CS=$(find /usr /opt -name compute-sanitizer -type f 2>/dev/null | head -n 1)
  echo "compute-sanitizer: ${CS:-not found}"
  if [[ -n $CS ]]; then
    timeout ${MEMCHECK_TIMEOUT:-150} "$CS" --tool memcheck --error-exitcode 1 python3 scripts/gpu_memcheck.py 2>&1 | tail -n 25 | tee "$OUT/memcheck.log"
  fi
fi
