#!/usr/bin/env bash
# One lease of a GPU machine, in one call, most valuable first (a lease is short: 15 minutes of
# device time per session, machine start included, at most 10 per call):
#   build     the extension for sm_90a; print what is available (rims_fast.info)
#   gputests  the gpu-marked tests, one test file per pytest run (a hang or crash in one file
#             does not cost the others; pytest-timeout stops a hung test) -> $OUT/pytest-gpu.log
#   memcheck  compute-sanitizer memcheck on tools/sanitize_case.py (small workload)
#   sanitize  memcheck, then racecheck and synccheck on the persistent kernels and the stepped
#             ops (--seq-only)
#   bench     the benchmark: bf16, BENCH_CONFIGS (default paper), every GPU provider, BENCH_ROUNDS
#             (default 3) rotated rounds (~35 s a round at paper) -> $OUT/*.json, csv
#   large     the benchmark at `large`: bf16, LARGE_PROVIDERS (cuDNN, the default cuda choice, the
#             stepped ops, the Triton forward), LARGE_ROUNDS (default 2; ~40 s a round)
#             -> $OUT/large.json, csv
#   profile   tools/profile_steps.py: torch.profiler kernel and input-shape tables of the stepped
#             ops at paper and large -> $OUT/profile-steps.log, and with RIMS_FAST_CUDA_FUSED=1
#             -> $OUT/profile-steps-fused.log
#   phases    tools/phase_clocks.py: each phase's share of a persistent-kernel step (clock64()
#             per phase, forward and backward, hoisted / F / cluster) at paper bf16, ~20 s
#             -> $OUT/phase-clocks.md
#   tiles     a tile sweep of the persistent kernels (RIMS_FAST_CUDA_TILE; tables in the log only)
#   alltests  the whole test suite -> $OUT/pytest.log
#   ncu       Nsight Compute on one persistent forward (CUDA cores, clusters) and one backward at
#             `paper` bf16, and one launch of the fused stepped gates kernel at `large`
#             (tools/profile_case.py; NCU_CASES picks), with every warp stall reason
#             (which of L2 latency, barriers, instruction fetch... the step waits on) -> $OUT/ncu.txt
# Every stage's time limit (the build's too) is the smaller of its cap (*_TIMEOUT) and what is left
# before DEADLINE seconds (default 560: run the call with timeout_s 590) from the start, so the call ends inside the device tool's
# limit whatever hangs (the few seconds of nvidia-smi and version prints excepted). Everything is appended to $OUT/${LOG:-session}.log.
#   bash tools/gpu_session.sh                         (build gputests sanitize bench phases large
#             ncu profile; ~450 s on an H100 on 2026-11-27 without ncu, at one round: build 130,
#             tests 140, sanitizers 55, paper 35, large 40, profile 55 (rounds now 3 and 2: paper
#             ~100, large ~80); ncu, never run yet, is capped at 60 s a
#             case and the deadline skips what does not fit, profile last). All of it takes more
#             than one call now; two calls, the second while the machine is warm (30 s):
#   STAGES="build gputests sanitize bench phases" bash tools/gpu_session.sh
#   STAGES="large ncu profile" LOG=session2 bash tools/gpu_session.sh
#   STAGES="build gputests" GPU_TEST_FILES="tests/test_rim_seq.py" bash tools/gpu_session.sh
#   STAGES="build bench" BENCH_CONFIGS=large bash tools/gpu_session.sh
#   STAGES="build bench" BENCH_CONFIGS=large BENCH_NAME=large \
#     BENCH_PROVIDERS=lstm,cuda_steps,cuda_steps_graph,triton_tiled_graph bash tools/gpu_session.sh
#             (the stepped ops, the CUDA C++ path meant for `large`, beside cuDNN and the Triton one)
#   RIMS_FAST_SEQ_TILE_MAX=1 STAGES="build bench ncu" bash tools/gpu_session.sh   (the persistent
#             kernels compiled for tile 1 only: 1/8 of their per-sample code, fewer registers;
#             the automatic tile at paper is 1 anyway, so the bench compares kernel sizes)
# Building took ~85 s on the device (9.0a only) before the column-group kernels made them larger;
# the kernels now compile as three units in parallel (here, two archs on 2 cores: 205 s for the
# one unit before, 89-129 s each after), so expect ~1-2 min; a fresh machine takes ~30 s to start.
STAGES=${STAGES:-"build gputests sanitize bench phases large ncu profile"}
want() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/${LOG:-session}.log") 2>&1
export GIT_SHA=${GIT_SHA:-} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16
DEADLINE=${DEADLINE:-560}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
stamp() { echo "=== [$(elapsed)s] $*"; }
# limit CAP: seconds a stage may take (its cap, or what is left before the deadline, 5 s kept).
limit() { local left=$(( DEADLINE - $(elapsed) - 5 )); (( left < $1 )) && echo $left || echo $1; }
run_for() { local t; t=$(limit "$1"); shift; (( t < 10 )) && { echo "skipped (deadline): $*"; return 124; }
            timeout -k 5 "$t" "$@"; }

stamp "machine (commit ${GIT_SHA:-unknown})"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if want build; then
  stamp "build"
  run_for "${BUILD_TIMEOUT:-300}" python3 -m pip install --no-deps --no-build-isolation -e . > /tmp/build.log 2>&1 || { tail -60 /tmp/build.log; exit 1; }
  tail -2 /tmp/build.log
fi
python3 -m rims_fast.info
TIMEOUT_OPT=""
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=${PER_TEST_TIMEOUT:-60} --timeout-method=thread"
if want gputests; then
  for f in ${GPU_TEST_FILES:-tests/test_masked_cell.py tests/test_rim_seq.py tests/test_rim_steps.py tests/test_brim.py tests/test_rim_triton.py}; do
    stamp "gpu-marked tests: $f"
    echo "##### $f" >> "$OUT/pytest-gpu.log"
    run_for "${GPU_TEST_TIMEOUT:-150}" python3 -m pytest "$f" -m gpu -v -rfEs --tb=short -p no:cacheprovider \
      $TIMEOUT_OPT ${PYTEST_ARGS:-} >> "$OUT/pytest-gpu.log" 2>&1
    echo "exit $?"; tail -1 "$OUT/pytest-gpu.log"
  done
  grep -E "^(FAILED|ERROR)|Fatal|Segmentation|Timeout" "$OUT/pytest-gpu.log" | head -40
fi
if want memcheck || want sanitize; then
  stamp "compute-sanitizer memcheck"
  run_for "${SAN_TIMEOUT:-90}" compute-sanitizer --tool memcheck --print-limit 20 python3 tools/sanitize_case.py 2>&1 | tail -12
fi
if want sanitize; then
  for tool in racecheck synccheck; do
    stamp "compute-sanitizer $tool (persistent kernels)"
    run_for "${SAN_TIMEOUT:-90}" compute-sanitizer --tool $tool --print-limit 20 python3 tools/sanitize_case.py --seq-only 2>&1 | tail -8
  done
fi
if want bench; then
  stamp "benchmarks"
  run_for "${BENCH_TIMEOUT:-180}" python3 -m benchmarks --device cuda --dtype bf16 --configs "${BENCH_CONFIGS:-paper}" \
    --providers "${BENCH_PROVIDERS:-lstm,torch,cuda,cuda_seq,cuda_seq_f,cuda_seq_narrow,cuda_seq_t2,cuda_seq_t2_narrow,cuda_seq_mma,cuda_seq_cluster,cuda_seq_cluster2,cuda_seq_cluster2_narrow,cuda_steps,cuda_steps_graph,cuda_steps_graph_pdl,cuda_steps_graph_fused,triton_graph,triton_tiled_graph,triton_tiled_graph_kbwd}" \
    --modes fwd,fwd+bwd --rounds "${BENCH_ROUNDS:-3}" --out "$OUT" --name "${BENCH_NAME:-bench}" --no-progress
fi
if want phases; then
  stamp "phase clocks of the persistent kernels (paper bf16)"
  run_for "${PHASES_TIMEOUT:-60}" python3 tools/phase_clocks.py > "$OUT/phase-clocks.md" 2>&1
  echo "exit $?"; cat "$OUT/phase-clocks.md" | head -120
fi
if want large; then
  stamp "benchmarks at large"
  run_for "${LARGE_TIMEOUT:-150}" python3 -m benchmarks --device cuda --dtype bf16 --configs large \
    --providers "${LARGE_PROVIDERS:-lstm,cuda,cuda_steps_graph,cuda_steps_graph_pdl,cuda_steps_graph_fused,triton_tiled_graph}" \
    --modes fwd,fwd+bwd --rounds "${LARGE_ROUNDS:-2}" --out "$OUT" --name large --no-progress
fi
if want profile; then
  stamp "profile of the stepped ops"
  run_for "${PROFILE_TIMEOUT:-90}" python3 tools/profile_steps.py --rows 16 > "$OUT/profile-steps.log" 2>&1
  echo "exit $?"; grep -E "^#####|CommPhase|SelectPhase|CommBwd|SelectBwd" "$OUT/profile-steps.log" | cut -c1-160 | head -40
  stamp "profile of the stepped ops, fused kernels (RIMS_FAST_CUDA_FUSED=1)"
  RIMS_FAST_CUDA_FUSED=1 run_for "${PROFILE_TIMEOUT:-90}" python3 tools/profile_steps.py --rows 16 \
    > "$OUT/profile-steps-fused.log" 2>&1
  echo "exit $?"; grep -E "^#####|GatesCell|OutputResidual|CommPhase|SelectPhase" "$OUT/profile-steps-fused.log" | cut -c1-160 | head -40
fi
if want tiles; then
  for tile in ${TILES:-4}; do
    stamp "tile $tile"
    RIMS_FAST_CUDA_TILE=$tile run_for "${TILE_TIMEOUT:-60}" python3 -m benchmarks --device cuda --dtype bf16 \
      --configs "${BENCH_CONFIGS:-paper}" --providers lstm,cuda_seq,cuda_seq_mma,cuda_seq_cluster --modes fwd,fwd+bwd --no-save --no-progress
  done
fi
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if want ncu && [[ -z $NCU ]]; then
  stamp "ncu: not found on this machine (PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-compute), stage skipped"
elif want ncu; then
  stamp "ncu (persistent kernels, paper bf16): $NCU"
  stalls=""
  for r in long_scoreboard short_scoreboard barrier no_instruction wait mio_throttle lg_throttle \
           math_pipe_throttle branch_resolving membar not_selected selected dispatch_stall misc; do
    stalls="$stalls,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
  done
  # e.g. NCU_CASES="--mma,--mma --backward"; "--fused --large": the fused gates kernel at `large`
  IFS=, read -ra cases <<< "${NCU_CASES:-plain,--backward,--cluster,--fused --large}"
  for a in "${cases[@]}"; do
    [[ $a == plain ]] && a=""
    k=rim_seq_fwd; case "$a" in *backward*) k=rim_seq_bwd;; *fused*) k=GatesCellPhase;; esac
    echo "##### profile_case $a ($k)" >> "$OUT/ncu.txt"
    run_for "${NCU_TIMEOUT:-60}" "$NCU" --kernel-name "regex:$k" --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats \
      --metrics "smsp__inst_executed.sum,sm__cycles_elapsed.max$stalls" \
      python3 tools/profile_case.py $a >> "$OUT/ncu.txt" 2>&1  # $a unquoted: "--mma --backward" is two flags
    echo "exit $?"
  done
  grep -E "#####|Duration|Achieved Occupancy|Memory Throughput|Compute \(SM\) Throughput|Registers|inst_executed|issue_stalled" "$OUT/ncu.txt" | head -120
fi
if want alltests; then
  stamp "all tests"
  run_for "${TEST_TIMEOUT:-170}" python3 -m pytest tests -v -rfEs --tb=short -p no:cacheprovider $TIMEOUT_OPT > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; tail -3 "$OUT/pytest.log"
fi
stamp "done"
