#!/usr/bin/env bash
# FP8 on the H200 in one device call (~7 min once the machine is up): the FP8 GPU tests, then fp8_bench's tune
# section (W8A8 and weight-only FP8, each configuration with and without TMA weight loads) on the Qwen3-8B
# products, then the rounds at B = 1 for
# every kind (bf16, FP8 weight-only, FP8 dynamic, each FP8 again with LM head and draft quantized: target step
# vs floor, replay-b tok/s, speculative == target-only) and the gemm section. Files in $OUT (flat):
# pytest_gpu_fp8.txt, fp8_tune.json, fp8_bench.json, fp8_bench.png, fp8_bench.log
# Usage (repository root): OUT=$OUT [BATCH=1] [KINDS=...] bash benchmarks/device_fp8.sh
set -u
OUT=${OUT:?set OUT to the output directory}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
mkdir -p "$OUT"
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/targets/test_fp8_torch_target.py 2>&1 | tail -25 \
    > "$OUT/pytest_gpu_fp8.txt"
tail -3 "$OUT/pytest_gpu_fp8.txt"
if [ "${TUNE:-1}" = 1 ]; then
  timeout 200 "$PY" benchmarks/fp8_bench.py --out "$OUT" --sections tune --tune-weights ${TUNE_WEIGHTS:-w8a8,fp8} --tune-rows ${TUNE_ROWS:-1,8} \
      2>&1 | grep -v Warning | grep -E "tune|Error"
fi
timeout 330 "$PY" benchmarks/fp8_bench.py --out "$OUT" --sections rounds,head_draft,gemm --batch "${BATCH:-1}" \
    --gemm-rows 1,8,64 --kinds "${KINDS:-bf16,fp8,fp8_dynamic,fp8_head_draft,fp8_dynamic_head_draft}" \
    2>&1 | grep -v Warning > "$OUT/fp8_bench.log"
grep -E "B=|goals|Error|error" "$OUT/fp8_bench.log" | cut -c1-400
