#!/usr/bin/env bash
# The CUDA ops' host runs (and the C++ CPU driver) under AddressSanitizer + UBSan, without a GPU.
#
# The persistent and stepped CUDA kernels' tile functions run on the host in the tests
# (HostExec); built with -fsanitize=address,undefined, an out-of-bounds index into any tensor (the
# CPU allocator's blocks are ASan's) or undefined arithmetic in them stops the run with a report,
# where on a GPU it would read or write someone else's memory silently. Builds a CPU-only copy of
# the extension (no nvcc: the .cu launchers are left out, the host code is the same) in a scratch
# copy of the tree, then runs the test files that drive those host runs with the sanitizer
# runtimes preloaded into python.
#
#   bash tools/asan_host_tests.sh    # ~4 min build + ~3.5 min tests on 2 cores (~1 000 tests)
# Env: PYTHON (default python), ASAN_DIR (the copy's directory, kept; default a fresh one, removed
# at exit), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -n "${ASAN_DIR:-}" ]; then
  dir=$ASAN_DIR
else  # a scratch copy, removed at the end
  dir=$(mktemp -d /tmp/rims_asan.XXXX)
  trap 'rm -rf "$dir"' EXIT
fi
mkdir -p "$dir"
# The tree as it is (tracked and untracked, not ignored files; a tracked file deleted in the
# working tree is skipped), without build outputs.
git ls-files -z --cached --others --exclude-standard |
  tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$dir"
cd "$dir"
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize=vptr"
# -O1 -g: ASan's advice (line numbers in reports); at setup.py's -O3 the build took twice as long.
CUDA_HOME=/nonexistent CFLAGS="$flags" CXXFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
  RIMS_FAST_CXX_FLAGS="-O1 -g" \
  MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace > build_asan.log 2>&1 ||
  { tail -30 build_asan.log; exit 1; }
# Preloading the runtimes succeeds whether or not the flags reached the compiler: check they did.
# (Not `nm | grep -q`: under pipefail, grep's early exit makes nm's SIGPIPE fail the pipeline.)
syms=$(nm -D rims_fast/_C*.so)
grep -q __asan_report <<< "$syms" ||
  { echo "asan_host_tests: the extension was built without -fsanitize=address"; exit 1; }
# pytest-xdist's workers (the [test] extra) inherit LD_PRELOAD, so they run sanitized too.
workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n auto --dist worksteal" || true)
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0,halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1,print_stacktrace=1 \
  "$PY" -m pytest -q -p no:cacheprovider $workers \
    tests/test_rim_seq.py tests/test_rim_steps.py tests/test_brim_steps.py \
    tests/test_host_item_order.py tests/test_host_lanes.py tests/test_rim_cpu.py \
    tests/test_masked_cell.py
