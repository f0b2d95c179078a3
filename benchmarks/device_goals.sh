#!/usr/bin/env bash
# Issue 12's open measurements in one device call (about 7 minutes once a machine is up; its Gemma4 half ran on an
# H100 on 2026-12-07, its H200 half on an H200 that evening, twice, in about 2 minutes each: docs/BENCH.md):
# 1. on an H200 only, the goals run: fp8_bench's rounds at B = 1 (bf16, FP8, FP8 with LM head and draft quantized)
#    with the first rounds after the admission's sync (DSPARK_ADMIT_AHEAD=0), then queued behind it (1, the
#    default since its H100 A/B; the A/B the goal's last 0.3-0.5 % is asked of; AB_VAR=DSPARK_GLU_STORE
#    MODES="1 0" repeats the SwiGLU store's), from the committed H200 GEMM choices (benchmarks/device_pdl.sh,
#    AB_VAR; KINDS=bf16,fp8_head_draft for a call short of device time), then the queued admission's GPU test;
#    its files land in $OUT/goals_h200/ as they are written, so a call cut by the session's device time still
#    returns the half it finished;
# 2. on either card, the Gemma4-12B shape with the e4m3 soft-capped head and draft (kinds fp8, fp8_head_draft) as
#    $OUT/gemma4_head_<card>.tgz, then the Gemma4 GPU tests of tests/targets/test_fp8_torch_target.py;
# 3. the Gemma4-12B step by kernel with the head and draft in e4m3 (why its FP8 step runs further above its floor
#    than Qwen3-8B's): $OUT/profile_step_<card>_gemma4_fp8_head_draft.json (PROFILE=0 skips it; GEMMA4=0 skips
#    2 and 3, for a call with little device time left).
# Usage (repository root, on the device): OUT=$OUT bash benchmarks/device_goals.sh
set -u
OUT=${OUT:?set OUT to the output directory}
nvidia-smi -L
if nvidia-smi -L | grep -q H200; then CARD=h200; else CARD=h100; fi
if [ $CARD = h200 ]; then
  OUT=$OUT PDL_DIR=$OUT/goals_h200 MODES="${MODES:-0 1}" AB_VAR=${AB_VAR:-DSPARK_ADMIT_AHEAD} CHAIN=0 TESTS=0 \
      CHOICES_FROM=benchmarks/results/gemm_choices_h200.json ROUND_TIMEOUT=${ROUND_TIMEOUT:-120} bash benchmarks/device_pdl.sh
  PYTHONPATH=$PWD timeout ${TEST_TIMEOUT:-100} python -m pytest -v -m gpu -p no:cacheprovider \
      tests/targets/test_torch_rounds.py -k queued_behind 2>&1 | tee "$OUT/goals_h200/pytest_admit_ahead.txt" \
      | grep -E "PASSED|FAILED|ERROR|passed|failed"
fi
if [ "${GEMMA4:-1}" = 1 ]; then
  OUT=$OUT MODES=1 CHAIN=0 TESTS=0 SHAPE=gemma4-12b KINDS=fp8,fp8_head_draft ROUND_TIMEOUT=${GEMMA_TIMEOUT:-140} \
      CHOICES_FROM=benchmarks/results/gemm_choices_$CARD.json bash benchmarks/device_pdl.sh
  mv "$OUT/pdl.tgz" "$OUT/gemma4_head_$CARD.tgz"
  PYTHONPATH=$PWD timeout ${TEST_TIMEOUT:-100} python -m pytest -v -m gpu -p no:cacheprovider \
      tests/targets/test_fp8_torch_target.py -k gemma4 2>&1 | tee "$OUT/pytest_gemma4_$CARD.txt" \
      | grep -E "PASSED|FAILED|ERROR|passed|failed"
fi
if [ "${GEMMA4:-1}" = 1 ] && [ "${PROFILE:-1}" = 1 ]; then
  PYTHONPATH=$PWD timeout ${PROFILE_TIMEOUT:-120} python benchmarks/profile_step.py --shape gemma4-12b \
      --quantize fp8-head-draft > "$OUT/profile_step_${CARD}_gemma4_fp8_head_draft.json"
  echo "profile rc=$?"
fi
