#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the GPU test machine, which has torch and Triton but
# no DeepSpeed and reaches no package index. Run here, where the index is reachable:
#
#     bash benchmarks/gpu_wheels.sh          # into .gpu_wheels/ (git-ignored; WHEELS=DIR for another)
#
# then carry the folder with the run (the device tool's carry: [".gpu_wheels"]); gpu_check.sh installs
# from it with --no-index. Together they must stay under 60 MiB (the working tree and what is carried
# travel within 64 MiB): the script prints the total and fails above that.
#
# DeepSpeed is on PyPI as a source distribution only: it is built here into a pure-Python wheel at this
# venv's version, with DS_BUILD_OPS=0 (no compiled ops; the trainer uses none) and without build
# isolation (its setup.py imports torch, which an isolated build would download). Of its requirements
# the GPU image lacks hjson and pydantic; pydantic brings pydantic-core (compiled: a CPython 3.12
# manylinux wheel), annotated-types and typing-inspection, and needs a typing-extensions newer than an
# image may hold, so that goes along too (pip installs it only where the one there is too old).
# einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm and torch are there already.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
WHEELS="${WHEELS:-.gpu_wheels}"
LIMIT_MIB=60
EXTRA=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
deepspeed="deepspeed==$(version deepspeed)"
echo "building $deepspeed (DS_BUILD_OPS=0) ..."
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed "$deepspeed" \
    --wheel-dir "$WHEELS"
pins=()
for name in "${EXTRA[@]}"; do pins+=("$name==$(version "$name")"); done
echo "downloading ${pins[*]} for CPython 3.12, manylinux x86_64 ..."
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "${pins[@]}"

ls -l "$WHEELS"
bytes=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "total: $mib MiB in $(ls "$WHEELS"/*.whl | wc -l) wheels ($WHEELS/)"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "over the $LIMIT_MIB MiB limit" >&2
    exit 1
fi
