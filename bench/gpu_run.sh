#!/usr/bin/env bash
# The GPU session's one call: GPU tests, kernel benchmarks, the decode-step figure (ours vs vLLM's and
# SGLang's ops), the end-to-end run and the demo on the H200, everything written under $OUT.
#
# BEFORE the call, on the CPU machine (the GPU machine has no package index and no internet, so the
# peers' op files must be fetched here and carried; .peers/ is git-ignored):
#   bash /work/shared/peers/get_vllm_ops.sh .peers/vllm
#   bash /work/shared/peers/get_sglang_ops.sh .peers/sglang
#   cp /work/shared/peers/sglang_peer.py .peers/        # step.py imports it from there on the GPU machine
# then, with the device tool:
#   run(command="bash bench/gpu_run.sh", carry=[".peers"], timeout_s=600)
# and copy what comes back ($OUT/results/*.json, *.png) into bench/results/ to commit.
#
# Device time is short (15 minutes per task, start-up included; 10 minutes per command): each stage
# has its own time limit (they sum to 560 s), a failed or timed-out stage does not stop the next, and
# the summary at the end says which passed. STAGES picks stages (default: all, in this order); to
# split the work over two calls:
#   STAGES="env tests kernels step_linear" bash bench/gpu_run.sh   then   STAGES="step e2e demo" ...
# The GPU machine has torch 2.11, triton 3.6, transformers 5.17, peft, pytest and no vLLM: the system
# python3 is used with the repository on PYTHONPATH (the CPU machine's .venv is not carried).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex_gpu_out}
mkdir -p "$OUT/results" "$OUT/logs"
export LORAPLEX_BENCH_OUT="$OUT/results" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/loraplex_triton_cache}
PY=${PYTHON:-python3}
STAGES=${STAGES:-"env tests kernels step_linear step e2e demo"}
summary="$OUT/summary.txt"
: > "$summary"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/logs/NAME.log
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/logs/$name.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 124 ] && verdict="TIMEOUT" || { [ $rc -ne 0 ] && verdict="FAILED rc=$rc"; }
  echo "$name: $verdict ($((SECONDS - t0)) s)" | tee -a "$summary"
  tail -n 25 "$OUT/logs/$name.log"
}

stage env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers; print(torch.__version__, \
torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))'; \
ls .peers .peers/* 2>&1 | head -20"

# tests that need the GPU (real shapes, CUDA graphs, streams); the CPU suite runs in CI
stage tests 90 $PY -m pytest -q -x -m gpu tests -p no:cacheprovider

# per-layer kernels vs the bandwidth floor and the peers (bench/kernels.py, another helper's)
stage kernels 90 $PY bench/kernels.py --out "$OUT/results"

# the decode-step figure: linear modules only (the setup of TARGETS.md's peer table), then the full
# model with attention over a 128-token context
stage step_linear 120 $PY bench/step.py --linear-only --out "$OUT/results"
stage step 75 $PY bench/step.py --tokens 1,32,256 --out "$OUT/results"

# tokens/s and TTFT with 1000 adapters, the four mixes, the four systems
stage e2e 120 $PY bench/e2e.py --requests 256 --naive-requests 64 --catalog-dir /tmp/loraplex-e2e \
  --out "$OUT/results"

# the demo on the GPU with the Triton kernels (fp32: the exact check against transformers + PEFT)
stage demo 45 $PY -m loraplex.demo --data /tmp/loraplex_demo_data

echo "=== summary"
cat "$summary"
ls -la "$OUT/results"
