#!/usr/bin/env bash
# The decode-speed checks on the H200 in one device call (~5 min once the machine is up): the GPU tests, then
# admission_bench.py (admission graphs against eager admission, 8B), then device_gemma4.sh's 12B bench with the
# step's kernel profile, then (FP8=1) fp8_bench at B = 1 (bf16 / FP8 / FP8 with head and draft: target step vs
# floor, replay-b tok/s, speculative == target-only). At most 8 files come back from a device call, so the
# outputs are kept to eight in $OUT (flat): pytest_gpu.txt, admission_bench.json, bench_gemma4.json,
# bench_qwen3.json, profile_step.json, gemma4_summary.json, fp8_bench.json, fp8_bench.png
# Usage (repository root): OUT=$OUT [FP8=1] bash benchmarks/device_decode.sh
set -u
OUT=${OUT:?set OUT to the output directory}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
mkdir -p "$OUT"
timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/targets/test_fp8_torch_target.py \
    tests/targets/test_torch_rounds.py tests/targets/test_torch_target.py tests/targets/test_gemma4_torch_target.py \
    2>&1 | tail -25 > "$OUT/pytest_gpu.txt"
timeout 120 "$PY" benchmarks/admission_bench.py --out "$OUT" 2>&1 | grep -E '^\{|Error'
tmp=$(mktemp -d)
OUT=$tmp/g BATCH=1 PYTEST=0 PROFILE=1 REPEATS=10 NEW=32 timeout 240 bash benchmarks/device_gemma4.sh
for f in bench_gemma4.json bench_qwen3.json profile_step.json gemma4_summary.json; do
  cp "$tmp/g/$f" "$OUT"/ 2>/dev/null
done
if [ "${FP8:-0}" = 1 ]; then
  timeout 150 "$PY" benchmarks/fp8_bench.py --out "$tmp" --sections kl,rounds,head_draft --batch 1 --new-tokens 128 \
      2>&1 | grep -v Warning | grep -E "B=|goals"
  cp "$tmp"/fp8_bench.json "$tmp"/fp8_bench.png "$OUT"/ 2>/dev/null
fi
tail -c 600 "$OUT/gemma4_summary.json" 2>/dev/null; cat "$OUT/pytest_gpu.txt" | tail -2
