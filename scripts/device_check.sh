#!/usr/bin/env bash
# Device-machine check of this tree: the head_dim sweep (D >= 160 first, the rest after), then the
# GPU suite and the host-overhead profile; logs under $OUT. Every step has its own time limit.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"
step() {  # step NAME SECONDS command...
  local name=$1 secs=$2; shift 2
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/$name.log" | tail -n 15
}
PYTEST="python3 -m pytest -n ${WORKERS:-8} --dist load -q -rf --tb=short -p no:cacheprovider -W ignore"
for s in ${STEPS:-bigdim suite profile}; do
  case $s in
    bigdim) step bigdim ${BIGDIM_S:-200} $PYTEST tests/test_kernels_gpu.py -k "sweep and (D160 or D192 or D256)";;
    sweep) step sweep ${SWEEP_S:-300} $PYTEST tests/test_kernels_gpu.py -k "sweep and not (D160 or D192 or D256)";;
    suite) step suite ${SUITE_S:-300} $PYTEST tests/test_kernels.py tests/test_kernels_split.py tests/test_kernels_gpu.py tests/test_ops.py tests/test_merged.py tests/test_kernel_bounds.py tests/test_model_gpu.py -k "not sweep";;
    profile) timeout ${PROFILE_S:-150} python3 scripts/profile_overhead.py --out "$OUT/profile.json" $PROFILE_ARGS > "$OUT/profile.log" 2>&1; echo "== profile rc=$?"; grep -v "^ " "$OUT/profile.log" | tail -n 30;;
    ops) timeout ${OPS_S:-120} python3 scripts/profile_overhead.py --ops --out "$OUT/ops.json" $OPS_ARGS > "$OUT/ops.log" 2>&1; echo "== ops rc=$?"; grep -A12 "^host us per op" "$OUT/ops.log";;
    decode) step decode ${DECODE_S:-240} $PYTEST tests/test_decode.py tests/test_model_gpu.py;;
    generate) timeout ${GENERATE_S:-420} python3 scripts/bench_generate.py --out "$OUT/generate" --budget ${GENERATE_BUDGET:-300} $GENERATE_ARGS > "$OUT/generate.log" 2>&1; echo "== generate rc=$?"; tail -n 45 "$OUT/generate.log";;
    fixes) step fixes ${FIXES_S:-120} $PYTEST tests/test_ops.py tests/test_kernels_gpu.py -k "compile or graphs";;
    session9) step session9 ${SESSION9_S:-240} $PYTEST tests/test_kernels.py tests/test_launch.py tests/test_decode.py tests/test_packed.py tests/test_model_gpu.py tests/test_kernels_gpu.py -k "not sweep and (retiled or tile_configs or prebound or grouped or decode or packed or document or strided)";;
    session10) step session10 ${SESSION10_S:-200} $PYTEST tests/test_packed.py tests/test_launch.py tests/test_kernels.py -k "document or packed or tile_configs or prebound";;
    session10b) step session10b ${SESSION10_S:-200} $PYTEST tests/test_packed.py tests/test_bidirectional.py tests/test_launch.py -k "per_document or runs_documents or work_lists or fused or loops or retiled or prebound";;
    session10c) step session10c ${SESSION10_S:-120} $PYTEST tests/test_packed.py tests/test_bidirectional.py -k "bhtd or runs_documents or compile";;
    session11) step session11 ${SESSION11_S:-420} $PYTEST tests/test_packed.py tests/test_bidirectional.py tests/test_launch.py -k "per_document or runs_documents or work_lists or fused or loops or retiled or prebound or bhtd or compile or remembered";;
    session12) step session12 ${SESSION12_S:-240} $PYTEST tests/test_packed.py tests/test_kernels.py -k "per_position or bounds_per_position or long_summary or remembered or bhtd or compile";
      timeout ${FEATBENCH_S:-200} python3 scripts/bench_features.py --modes all,local --sections packed --no-flex --out "$OUT/docs-ab" > "$OUT/docs-ab.log" 2>&1; echo "== docs-ab rc=$?"; grep "^\[" "$OUT/docs-ab.log" | cut -c1-160;;
    session13) step session13 ${SESSION13_S:-240} $PYTEST tests/test_packed.py tests/test_merged.py tests/test_kernels.py tests/test_nn.py -k "padded or per_position or bounds_per_position or (per_document and strided) or runs_documents or merged or long_summary or remembered or (test_kernels.py and strided and not sweep)";;
    session14) step session14 ${SESSION14_S:-200} $PYTEST tests/test_packed.py tests/test_model_gpu.py -k "group or bhtd or split_documents or strided or interleaved or heads";;
    session15) step session15 ${SESSION15_S:-240} $PYTEST tests/test_kernels_gpu.py tests/test_ops.py tests/test_launch.py tests/test_merged.py -k "become_kernel_launches or fit_the_device or records_a_config or compile or graphs or merged or traced or plan_holds";;
    inline) SPARSE_ATTENTION_INLINE_LAUNCHES=1 step inline ${INLINE_S:-200} $PYTEST tests/test_kernels_gpu.py tests/test_model_gpu.py tests/test_ops.py tests/test_merged.py tests/test_nn.py tests/test_packed.py tests/test_bidirectional.py -k "compile or graph or launches or fit_the or overhead";;
    train) for r in $(seq ${TRAIN_REPEATS:-2}); do for m in ${TRAIN_MODES:-eager default}; do  # host-bound steps vary: repeat
        c=$([ $m = eager ] && echo --no-compile || echo --compile)
        timeout ${TRAIN_S:-240} python3 scripts/bench_train.py --device cuda $c --budget ${TRAIN_BUDGET:-150} --out "$OUT/train-$m-r$r" \
          --variants ${TRAIN_VARIANTS:-sdpa:dense ours:fixed ours:strided-interleaved ours:local} --contexts ${TRAIN_CTX:-12288 65536} $TRAIN_ARGS > "$OUT/train-$m-r$r.log" 2>&1
        echo "== train-$m-r$r rc=$?"; grep -E "^T=" "$OUT/train-$m-r$r.log" | tail -n 12; done; done;;
    trainab) for r in $(seq ${TRAIN_REPEATS:-2}); do for o in ${TRAIN_INLINE:-0 1}; do  # compiled: opaque ops (0) or kernel launches in the graph (1)
        SPARSE_ATTENTION_INLINE_LAUNCHES=$o timeout ${TRAIN_S:-240} python3 scripts/bench_train.py --device cuda --compile --budget ${TRAIN_BUDGET:-150} --out "$OUT/trainab$TRAIN_TAG-inline$o-r$r" \
          --variants ${TRAIN_VARIANTS:-sdpa:dense ours:fixed ours:strided-interleaved ours:local} --contexts ${TRAIN_CTX:-12288} $TRAIN_ARGS > "$OUT/trainab$TRAIN_TAG-inline$o-r$r.log" 2>&1
        echo "== trainab$TRAIN_TAG-inline$o-r$r rc=$?"; grep -E "^T=" "$OUT/trainab$TRAIN_TAG-inline$o-r$r.log" | tail -n 12; done; done;;
    features) step features ${FEATURES_S:-240} $PYTEST tests/test_gqa.py tests/test_bidirectional.py tests/test_any_time.py tests/test_packed.py;;
    featbench) timeout ${FEATBENCH_S:-300} python3 scripts/bench_features.py --out "$OUT/features" $FEAT_ARGS > "$OUT/featbench.log" 2>&1; echo "== featbench rc=$?"; tail -n 24 "$OUT/featbench.log";;
    gqabench) timeout ${GQABENCH_S:-300} python3 scripts/bench_gqa.py --out "$OUT/gqa" $GQA_ARGS > "$OUT/gqabench.log" 2>&1; echo "== gqabench rc=$?"; tail -n 14 "$OUT/gqabench.log";;
    compare) timeout ${COMPARE_S:-300} python3 scripts/bench_compare.py --trees ${BASELINE:-baseline} . --out "$OUT/compare" $COMPARE_ARGS > "$OUT/compare.log" 2>&1; echo "== compare rc=$?"; tail -n 16 "$OUT/compare.log";;
    million) timeout ${MILLION_S:-400} python3 scripts/bench.py --million-only --out "$OUT/million" $MILLION_ARGS > "$OUT/million.log" 2>&1; echo "== million rc=$?"; grep -E "sweep .*chosen|ours|flex|gate.*FAIL" "$OUT/million.log" | tail -n 30;;
    bench) timeout ${BENCH_S:-300} python3 scripts/bench.py --out "$OUT" > "$OUT/bench.log" 2>&1; echo "== bench rc=$?"; tail -n 30 "$OUT/bench.log";;
  esac
done
