#!/usr/bin/env bash
# Prepares what a GPU lease needs beside the working tree, in folders git ignores:
#   .whl/     wheels the device image lacks (ml_collections, grain and its array_record,
#             portpicker), for CPython 3.12 x86-64;
#   .golden/  a copy of ../shared/golden (the golden tests' vectors, with train/ and
#             mask2former/; 48 MB), which does not travel on its own. Both with the tree:
#             ~54 MB of the 64 MiB a call may carry.
# Then, on the device (carry .whl and .golden):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site PYTHON=python3 PYTHONUNBUFFERED=1 &&
#   RESULTS=$OUT BUDGET_S=540 GOLDEN_DIR=.golden bash benchmarks/device_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.golden/; do
  grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
mkdir -p .whl
for p in ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p"
done
golden=${GOLDEN_SRC:-../shared/golden}
if [ -d "$golden" ]; then
  rm -rf .golden && mkdir .golden
  cp "$golden"/*.npz "$golden"/*.py "$golden"/*.json .golden/
  for sub in train mask2former; do
    [ -d "$golden/$sub" ] && cp -r "$golden/$sub" .golden/
  done
fi
du -sh .whl .golden 2>/dev/null
