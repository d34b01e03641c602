#!/usr/bin/env bash
# One lease of a GPU machine, in one call: build the extension for sm_90a, run the whole test
# benchmark suite, the whole test suite on the GPU, compute-sanitizer (memcheck; racecheck and
# synccheck on the persistent kernel) on a small workload.
# Everything is logged to $OUT/session.log; benchmark results land in $OUT as JSON/CSV.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

stamp "machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
stamp "build"
python3 -m pip install --no-deps --no-build-isolation -e . > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
tail -2 /tmp/build.log
python3 -m rims_fast.info
stamp "benchmarks"
timeout "${BENCH_TIMEOUT:-200}" python3 -m benchmarks --device cuda --dtype bf16 --configs "${BENCH_CONFIGS:-paper,large}" \
  --providers "${BENCH_PROVIDERS:-lstm,torch,cuda,cuda_seq,triton,triton_graph}" --modes fwd,fwd+bwd --out "$OUT" --no-progress
stamp "tests (GPU present: gpu-marked tests run, Triton compiles for real)"
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest tests -v -rs -p no:cacheprovider > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|Fatal|Segmentation" "$OUT/pytest.log" | tail -5
stamp "compute-sanitizer memcheck"
[ -n "${SKIP_SANITIZER:-}" ] || timeout "${SAN_TIMEOUT:-90}" compute-sanitizer --tool memcheck --print-limit 20 python3 tools/sanitize_case.py 2>&1 | tail -8
stamp "compute-sanitizer racecheck + synccheck (persistent kernel)"
[ -n "${SKIP_SANITIZER:-}" ] || for tool in racecheck synccheck; do
  timeout "${SAN_TIMEOUT:-90}" compute-sanitizer --tool $tool --print-limit 20 python3 tools/sanitize_case.py --seq-only 2>&1 | tail -4
done
stamp "done"
