#!/usr/bin/env bash
# Programmatic dependent launch on the H200 in one device call (~7 min once the machine is up): the GPU tests
# with PDL on (the default), launch_chain.py (the step's kernels chained in graphs, PDL off and on), fp8_bench's
# rounds at B = 1 (bf16, FP8, FP8 with LM head and draft quantized) with DSPARK_PDL=0 then on, and (GEMMA=1)
# device_gemma4.sh's 12B bench with PDL off then on. Everything lands in $OUT/pdl.tgz (a device call returns
# few files), or with PDL_DIR in that folder as it is written.
# AB_VAR names the switch the A/B flips (default DSPARK_PDL; DSPARK_GEMM_EARLY: the decode GEMM's early first
# weight tile; DSPARK_GEMM_HANDOFF: split-K partials summed by the consumer; DSPARK_PRESCALED: products' inputs
# written in the fp16 product's format; DSPARK_DEFERRED_NORM: RMSNorms finished by the e4m3 product after them, o's
# and down's partials handed to the norm; DSPARK_FRAGMENT_ORDER: e4m3 weights stored in fragment order;
# DSPARK_GEMM_KEEP_ASYNC: the decode GEMM's accumulator stored through a select, its wgmma left asynchronous by
# ptxas, best with CHOICES=0; DSPARK_SCALED_MM: W8A8 products above 16 rows may run cuBLAS's block-scaled e4m3
# product, a choices file keeping its W8A8 entries only for the same setting; DSPARK_GLU_STORE: e4m3 gate|up in pairs,
# its store finishing SwiGLU (Gemma4: GeGLU) where it runs in one split); CHAIN=0 skips the launch chains;
# TESTS_LAST=1 runs the GPU tests after the rounds, TEST_FILES picks them (default: the five GPU test files, about
# 10 minutes on an H100 on 2026-12-06: more than one call's limit, so split them, e.g. test_fp8_torch_target.py alone,
# under 7 minutes; a run cut by TEST_TIMEOUT still lists the tests it finished);
# BATCH (e.g. 4,16), NEW (new tokens), SHAPE (fp8_bench --shape, e.g. gemma4-12b with KINDS=fp8; not with BASE code
# whose fp8_bench.py predates it), TEMP (> 0: sampling rounds too), CAPS (e.g. 1,3: narrow rounds, and replay b
# again verifying at most that many drafts; not with BASE code older than fp8_bench --verify-caps), PLAIN=1 (rounds
# that draft nothing, VerifyPolicy draft_rows=0, against target-only steps; not with BASE code before them) and
# ROUND_TIMEOUT (s per mode) shape the rounds. CANDIDATES=1 runs benchmarks/gemm_candidates.py after the rounds (every
# decode GEMM candidate within 1e-2 and repeating its bits on this card; CANDIDATE_ROWS, CANDIDATES_TIMEOUT s).
# WIDE_CLASS=1 runs benchmarks/wide_class.py after the rounds (the
# decode GEMM's wide row class against the old class-1 configuration, product by product; WIDE_TIMEOUT s). BASE=dir (a copy of an earlier dspark_compile package's parent,
# e.g. made with `git archive REV dspark_compile benchmarks/fp8_bench.py`): mode 0 runs that code (with that
# fp8_bench.py, when the copy has one) instead, for changes with no switch. Without AB_VAR it then flips no
# switch: until 2026-12-05 it flipped DSPARK_PDL, so such an A/B's base half ran with PDL off (docs/BENCH.md, "The
# base half without PDL").
# Both modes share the decode GEMM's timed choices (DSPARK_GEMM_CHOICES, $W/gemm_choices.json, kept in the
# archive): the second runs the first's configurations for every product the switch leaves alone, instead of a
# choice among near-equal candidates of its own; CHOICES=0 lets each time its own. CHOICES_FROM=file seeds them
# from an earlier call's file (e.g. benchmarks/results/gemm_choices_h100.json or gemm_choices_h200.json): a base
# half then skips the timing that cut a B = 32 A/B; a file of another GPU or candidate set is left alone, and that
# half times its own.
# Usage (repository root): OUT=$OUT [TESTS=0] [ROUNDS=0] [GEMMA=1] [AB_VAR=...] bash benchmarks/device_pdl.sh
set -u
OUT=${OUT:?set OUT to the output directory}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
W=${PDL_DIR:-$(mktemp -d)/pdl}  # PDL_DIR (under $OUT): a call cut short still returns the halves it finished
mkdir -p "$W"
tests() {  # -v: a run cut by TEST_TIMEOUT still names each test that passed or failed before the cut
  timeout ${TEST_TIMEOUT:-240} "$PY" -m pytest -v -m gpu -p no:cacheprovider ${TEST_FILES:-tests/targets/test_fp8_torch_target.py \
      tests/targets/test_torch_rounds.py tests/targets/test_torch_target.py tests/targets/test_gemma4_torch_target.py \
      tests/targets/test_round_kernels.py} \
      > "$W/pytest_gpu_full.txt" 2>&1
  rc=$?
  { grep -E " (PASSED|FAILED|ERROR|SKIPPED) +\[" "$W/pytest_gpu_full.txt" | sed 's/^tests\/targets\///'
    tail -25 "$W/pytest_gpu_full.txt" | grep -vE " (PASSED|FAILED|ERROR|SKIPPED) +\["; } > "$W/pytest_gpu_pdl.txt"
  if [ $rc = 124 ] && ! grep -qE "[0-9]+ (passed|failed)" "$W/pytest_gpu_pdl.txt"; then  # cut before the summary
    echo "cut by the ${TEST_TIMEOUT:-240} s limit (TEST_TIMEOUT) before pytest's summary" >> "$W/pytest_gpu_pdl.txt"
  fi
  rm -f "$W/pytest_gpu_full.txt"
  tail -2 "$W/pytest_gpu_pdl.txt"
}
AB=${AB_VAR:-DSPARK_PDL}
if [ -n "${BASE:-}" ] && [ -z "${AB_VAR:-}" ]; then AB=DSPARK_AB_HALF; fi  # a BASE A/B flips no switch
if [ "${CHOICES:-1}" = 1 ]; then export DSPARK_GEMM_CHOICES=$W/gemm_choices.json; fi
if [ -n "${CHOICES_FROM:-}" ]; then  # both modes start from them
  cp "$CHOICES_FROM" "$W/gemm_choices.json" 2> /dev/null || { echo "CHOICES_FROM=$CHOICES_FROM: no such file" >&2; exit 2; }
fi
if [ "${TESTS:-1}" = 1 ] && [ "${TESTS_LAST:-0}" = 0 ]; then tests; fi
if [ "${ROUNDS:-1}" = 1 ]; then
if [ "${CHAIN:-1}" = 1 ]; then
  timeout 90 "$PY" benchmarks/launch_chain.py > "$W/launch_chain.json" 2> "$W/launch_chain.err"
  grep pdl "$W/launch_chain.json" | head -2
fi
for m in ${MODES:-0 1}; do
  PP=$PWD
  BENCH=benchmarks/fp8_bench.py
  if [ -n "${BASE:-}" ] && [ "$m" = 0 ]; then  # mode 0 runs the earlier code in BASE (and its bench, if it has one)
    PP=$BASE:$PWD
    if [ -f "$BASE/benchmarks/fp8_bench.py" ]; then BENCH=$BASE/benchmarks/fp8_bench.py; fi
  fi
  env PYTHONPATH=$PP $AB=$m timeout ${ROUND_TIMEOUT:-150} "$PY" $BENCH --out "$W/rounds_pdl$m" \
      --sections rounds,head_draft --batch ${BATCH:-1} --kinds ${KINDS:-bf16,fp8,fp8_head_draft} \
      --new-tokens ${NEW:-128} ${SHAPE:+--shape $SHAPE} ${TEMP:+--temperature $TEMP} ${CAPS:+--verify-caps $CAPS} $([ "${PLAIN:-0}" = 1 ] && echo --plain-rounds) 2>&1 | grep -v Warning \
      > "$W/rounds_pdl$m.log"
  echo "$AB=$m"; grep -E "B=" "$W/rounds_pdl$m.log" | cut -c1-300
done
fi
if [ "${GEMMA:-0}" = 1 ]; then
  for m in ${MODES:-0 1}; do
    env $AB=$m OUT=$W/gemma4_pdl$m BATCH=1 PYTEST=0 REPEATS=10 NEW=32 timeout 200 bash benchmarks/device_gemma4.sh \
        > /dev/null 2>&1
    echo "$AB=$m"; tail -c 700 "$W/gemma4_pdl$m/gemma4_summary.json"; echo
  done
fi
if [ "${CANDIDATES:-0}" = 1 ]; then  # every decode GEMM candidate right and repeatable on this card (gemm_candidates.py)
  timeout ${CANDIDATES_TIMEOUT:-200} "$PY" benchmarks/gemm_candidates.py "$W/gemm_candidates.json" \
      --rows ${CANDIDATE_ROWS:-8,64,256,512} > "$W/gemm_candidates.log" 2>&1
  echo "gemm_candidates rc=$?"; grep -E "^(failed|lm_head)" "$W/gemm_candidates.log" | tail -5 | cut -c1-200
fi
if [ "${WIDE_CLASS:-0}" = 1 ]; then  # after the rounds: an older BASE half rejects a file the wide class wrote
  timeout ${WIDE_TIMEOUT:-150} "$PY" benchmarks/wide_class.py "$W/wide_class.json" > "$W/wide_class.log" 2>&1
  grep -E "^(layer|gate_up|down|qkv|o|lm_head) " "$W/wide_class.log" | cut -c1-300
fi
if [ "${TESTS:-1}" = 1 ] && [ "${TESTS_LAST:-0}" = 1 ]; then tests; fi
if [ -z "${PDL_DIR:-}" ]; then tar czf "$OUT/pdl.tgz" -C "$(dirname "$W")" pdl; fi
