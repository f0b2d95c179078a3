#!/usr/bin/env bash
# The decode GEMM's larger row class (17-1024 rows: verify blocks from B = 3 on, the B = 64 step) on the H200,
# one device call: fp8_bench's rounds at BATCH (default 16,64) for bf16 and FP8, first with the code in BASE (a
# copy of an earlier dspark_compile, for an A/B in the same call; skipped when unset), then with this tree, whose
# run adds the gemm section at 512 rows. Everything lands in $OUT/large_m.tgz.
# Usage (repository root): OUT=$OUT [BASE=dir] [BATCH=16,64] bash benchmarks/device_large_m.sh
set -u
OUT=${OUT:?set OUT to the output directory}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
W=$(mktemp -d)/large_m
mkdir -p "$W"
if [ -n "${BASE:-}" ]; then
  PYTHONPATH=$BASE:$PWD timeout 250 "$PY" benchmarks/fp8_bench.py --out "$W/base" --sections rounds \
      --batch ${BATCH:-16,64} --kinds fp8 --new-tokens 128 2>&1 | grep -v Warning > "$W/base.log"
  echo base; grep -E "B=" "$W/base.log" | cut -c1-300
fi
PYTHONPATH=$PWD timeout 300 "$PY" benchmarks/fp8_bench.py --out "$W/new" --sections rounds,gemm --gemm-rows 512 \
    --batch ${BATCH:-16,64} --kinds ${KINDS:-bf16,fp8} --new-tokens 128 2>&1 | grep -v Warning > "$W/new.log"
echo new; grep -E "B=|gemm " "$W/new.log" | cut -c1-400
tar czf "$OUT/large_m.tgz" -C "$(dirname "$W")" large_m
