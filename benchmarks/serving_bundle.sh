#!/usr/bin/env bash
# The carried folder that serving_gpu.py's device run unpacks (Python 3.12 x86_64, no network there), rebuilt from
# PyPI: .dev-serving/wheels/{pytriton312,site_np,site_ap}.tar.xz, about 46 MB together (the device call's carry
# limit is 64 MiB with the working tree). What goes in and why (traced AIPerf 0.13 runs, 2026-12-03):
#   pytriton312  nvidia-pytriton 0.7.0 unzipped, less the backend stubs of other Pythons and libpython3.13
#   site_np      numpy 1.26.4 (the python-backend stub needs numpy < 2), shared objects stripped
#   site_ap      AIPerf 0.13 and the distributions its `profile` runs import that the device lacks or pins
#                differently; left out: what the device has (numpy, transformers, tokenizers, huggingface_hub,
#                pyarrow, scipy, ...) and the UI/Kubernetes/optuna/datasets extras a --ui-type none run never imports
# Usage (repository root): bash benchmarks/serving_bundle.sh; then benchmarks/serving_gpu.py prepare --work
# .dev-serving/gpu_work and the run command in serving_gpu.py's docstring, with carry [".dev-serving"].
set -eu
DEST=${DEST:-.dev-serving}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$DEST/wheels"
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
pip_dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp/dl" "$@"; }

pip_dl nvidia-pytriton==0.7.0
mkdir -p "$tmp/pt" && unzip -q "$tmp"/dl/nvidia_pytriton-*.whl -d "$tmp/pt"
find "$tmp/pt" -path '*python_backend_stubs/3.*' -maxdepth 5 -type d ! -name 3.12 -exec rm -rf {} +
rm -f "$tmp"/pt/nvidia_pytriton.libs/libpython3-*.13.so*
chmod -R a+x "$tmp/pt/pytriton/tritonserver/bin"  # a wheel need not keep exec bits (a bundle without them failed)
find "$tmp/pt" -name '*_backend_stub' -exec chmod a+x {} +
(cd "$tmp/pt" && XZ_OPT=-9 tar cJf - .) > "$DEST/wheels/pytriton312.tar.xz"

pip_dl numpy==1.26.4
mkdir -p "$tmp/np" && unzip -q "$tmp"/dl/numpy-1.26.4-*.whl -d "$tmp/np"
find "$tmp/np" -name '*.so*' -exec strip --strip-unneeded {} + 2>/dev/null || true
(cd "$tmp/np" && XZ_OPT=-9 tar cJf - .) > "$DEST/wheels/site_np.tar.xz"

AP="aiperf==0.13.0 annotated_types==0.8.0 brotli==1.2.1 crick==0.0.8 cyclopts==4.25.3 docstring_parser==0.18.0
ffmpeg_python==0.2.0 future==1.0.0 jmespath==1.0.1 msgspec==0.23.0 orjson==3.11.9 pydantic==2.14.4
pydantic_core==2.50.5 pydantic_settings==2.16.3 python_dotenv==1.2.4 pyzmq==26.4.0 rich_rst==2.2.0
ruamel_yaml==0.18.17 ruamel_yaml_clib==0.2.15 setproctitle==1.3.8 typing_inspection==0.4.5 zstandard==0.25.0
typing_extensions==4.16.0 aiohttp==3.14.5 yarl==1.25.1 multidict==7.2.1 propcache==0.5.4 frozenlist==1.8.0
aiosignal==1.4.0 aiohappyeyeballs==2.7.1 aiofiles==24.1.0 rich==14.1.0 psutil==7.0.0 prometheus_client==0.23.1
uvloop==0.23.0"
# shellcheck disable=SC2086
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --target "$tmp/ap" $AP
rm -rf "$tmp/ap/bin" "$tmp"/ap/{psutil,crick,zmq,future}/tests
find "$tmp/ap" -name __pycache__ -type d -exec rm -rf {} +
find "$tmp/ap" -name '*.so*' -exec strip --strip-unneeded {} + 2>/dev/null || true
(cd "$tmp/ap" && XZ_OPT=-9 tar cJf - .) > "$DEST/wheels/site_ap.tar.xz"
du -sh "$DEST/wheels"/*
