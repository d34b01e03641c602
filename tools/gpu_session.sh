#!/usr/bin/env bash
# One lease of a GPU machine, in one call, most valuable first (a lease is short):
#   1. build the extension for sm_90a and print what is available;
#   2. the gpu-marked tests (the CUDA kernels, the persistent kernels, Triton at realistic shapes,
#      CUDA-graph replay) -> $OUT/pytest-gpu.log;
#   3. (bench) the benchmark (bf16, BENCH_CONFIGS, default paper; every GPU provider) and (tiles)
#      a tile sweep of the persistent kernels (RIMS_FAST_CUDA_TILE) -> $OUT/*.json, *.csv;
#   4. (alltests) the whole test suite -> $OUT/pytest.log;
#   5. compute-sanitizer: (memcheck) memcheck on a small workload; (sanitize) that plus racecheck
#      and synccheck on the persistent kernels.
# Everything is logged to $OUT/session.log. Time limits per stage: *_TIMEOUT variables.
# A session's device time is 15 minutes in all, machine start included (a few minutes), and one
# call is at most 10: so the default is ONE call of ~9 minutes, most valuable first:
#   bash tools/gpu_session.sh    (build ~3, gpu tests <=150 s, paper benchmark <=150 s, memcheck)
# and, only if the budget still allows a second call on the warm machine:
#   STAGES="alltests sanitize" bash tools/gpu_session.sh   (racecheck/synccheck; build cached)
#   STAGES="bench" BENCH_CONFIGS=large bash tools/gpu_session.sh
STAGES=${STAGES:-"build gputests bench memcheck"}
want() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
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
if want build; then
  python3 -m pip install --no-deps --no-build-isolation -e . > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
  tail -2 /tmp/build.log
fi
python3 -m rims_fast.info
stamp "gpu-marked tests"
if want gputests; then
  timeout "${GPU_TEST_TIMEOUT:-150}" python3 -m pytest tests -m gpu -v -rs -p no:cacheprovider > "$OUT/pytest-gpu.log" 2>&1
  echo "pytest -m gpu exit $?"; grep -E "passed|failed|Fatal|Segmentation" "$OUT/pytest-gpu.log" | tail -5
  grep -E "FAILED|ERROR" "$OUT/pytest-gpu.log" | head -20
fi
stamp "benchmarks"
want bench && timeout "${BENCH_TIMEOUT:-150}" python3 -m benchmarks --device cuda --dtype bf16 --configs "${BENCH_CONFIGS:-paper}" \
  --providers "${BENCH_PROVIDERS:-lstm,torch,cuda,cuda_seq,cuda_seq_mma,cuda_seq_cluster,cuda_seq_cluster_l2,triton,triton_graph,triton_tiled,triton_tiled_graph}" --modes fwd,fwd+bwd --out "$OUT" --no-progress
want tiles && for tile in ${TILES:-4}; do
  RIMS_FAST_CUDA_TILE=$tile timeout "${TILE_TIMEOUT:-60}" python3 -m benchmarks --device cuda --dtype bf16 \
    --configs paper --providers lstm,cuda_seq,cuda_seq_mma,cuda_seq_cluster --modes fwd,fwd+bwd --out "$OUT" --name "tile$tile" --no-progress | tail -6
done
stamp "all tests (GPU present: gpu-marked tests run, Triton compiles for real)"
if want alltests; then
  timeout "${TEST_TIMEOUT:-170}" python3 -m pytest tests -v -rs -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|Fatal|Segmentation" "$OUT/pytest.log" | tail -5
fi
stamp "compute-sanitizer memcheck"
{ want sanitize || want memcheck; } && timeout "${SAN_TIMEOUT:-90}" compute-sanitizer --tool memcheck --print-limit 20 python3 tools/sanitize_case.py 2>&1 | tail -8
stamp "compute-sanitizer racecheck + synccheck (persistent kernels)"
want sanitize && for tool in racecheck synccheck; do
  timeout "${SAN_TIMEOUT:-90}" compute-sanitizer --tool $tool --print-limit 20 python3 tools/sanitize_case.py --seq-only 2>&1 | tail -4
done
stamp "done"
