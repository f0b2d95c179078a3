#!/usr/bin/env bash
# serving_gpu.py's run on the device, in one call: unpack the carried bundle (benchmarks/serving_bundle.sh; WORK
# written here by `serving_gpu.py prepare`), stop whatever a cut earlier call left on the GPU, serve and measure,
# and stop the server's processes again. Everything lands in $OUT: serving_gpu.json/.png/.log.
# Usage (repository root, carry [".dev-serving"]): OUT=$OUT bash benchmarks/device_serving.sh [serving_gpu.py run
# options, e.g. --models dspark_target,dspark_sched --concurrency 1,64 --deadline 300]
# LIMIT (default 560 s) bounds the run; SIGTERM lets serving_gpu.py stop its server.
set -u
OUT=${OUT:?set OUT to the output directory}
BUNDLE=${BUNDLE:-.dev-serving}
stop_gpu_processes() {  # by PID from nvidia-smi: a pattern match would also hit this script's own command line
  nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
  sleep 2
}
stop_gpu_processes
for t in pytriton312:pt site_np:np site_ap:ap; do
  [ -d "/tmp/${t#*:}" ] || { mkdir -p "/tmp/${t#*:}" && tar xJf "$BUNDLE/wheels/${t%:*}.tar.xz" -C "/tmp/${t#*:}"; }
done
chmod -R a+x /tmp/pt/pytriton/tritonserver/bin
find /tmp/pt -name '*_backend_stub' -exec chmod a+x {} +
PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/pt timeout -s TERM "${LIMIT:-560}" python3 benchmarks/serving_gpu.py run \
    --work "$BUNDLE/gpu_work" --out "$OUT" --aiperf "python3 -m aiperf" --aiperf-path /tmp/ap --numpy-path /tmp/np \
    --duration 4 --whole-sweep "$@" > "$OUT/serving_gpu.log" 2>&1
echo "serving_gpu.py exit $?"
stop_gpu_processes
grep -v "SPS(" "$OUT/serving_gpu.log" | grep -iv warning | grep -E "serving_gpu|Error|error" | tail -20
