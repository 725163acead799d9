#!/usr/bin/env bash
# The GPU session's one call: GPU tests, the kernel tuner, the decode-step figure (ours vs vLLM's and
# SGLang's ops), per-layer kernels, cache-miss upload, end-to-end serving and the demo on the H200. bench/GPU_RUN.md
# says how to call it with the device tool and what to do with what comes back.
#
#   bash bench/gpu_run.sh                  # on the GPU machine ($OUT set by the device tool)
#   CPU_SMOKE=1 bash bench/gpu_run.sh      # here: every stage at tiny sizes (Triton interpreter, fp16
#                                          # where the peers run), to catch errors before device time
#
# Time: TOTAL_S (default 480 s) bounds the whole script. Each stage gets min(its own limit, what is
# left); its scripts see LORAPLEX_DEADLINE (Unix time) and stop starting new work before it, writing
# what they measured; a stage that overruns is stopped (SIGINT, then SIGKILL 5 s later). A failed or
# stopped stage never stops the next. Results and logs go to $WORK and are bundled into
# $OUT/loraplex_gpu.tgz after EVERY stage (the device tool returns at most 8 files from $OUT, also
# when the command is killed), beside $OUT/summary.txt and $OUT/console.log.
# STAGES picks stages, in this order (default all): env hazards tests tune step_linear kernels upload step e2e demo
set -uo pipefail
cd "$(dirname "$0")/.."
T_START=$SECONDS
if [ "${CPU_SMOKE:-0}" = 1 ]; then TOTAL_S=${TOTAL_S:-1500} LIMIT_SCALE=3; else TOTAL_S=${TOTAL_S:-480} LIMIT_SCALE=1; fi
OUT=${OUT:-/tmp/loraplex_gpu_out}
WORK=${WORK:-/tmp/loraplex_gpu_work}
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/results" "$WORK/logs"
: > "$OUT/console.log"
exec > >(tee -a "$OUT/console.log") 2>&1
export LORAPLEX_BENCH_OUT="$WORK/results" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# in the repo (git-ignored .cache/): kept on a warm device machine between calls, so a second call compiles less
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there
R="$WORK/results"
STAGES=${STAGES:-"env hazards tests tune step_linear kernels upload step e2e demo"}

if [ "${CPU_SMOKE:-0}" = 1 ]; then
  # the CPU machine: interpreter, tiny shapes, fp16 wherever the peers run (the interpreter's bf16 dot is wrong)
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export TRITON_INTERPRET=1
  TESTS_ARGS=""
  TUNE_ARGS="--smoke --out $R/tune_smoke_config.json"
  STEP_LIN_ARGS="--smoke --linear-only --dtype float16 --tokens 1,5 --adapters 1,3 --out $R"
  STEP_ARGS="--smoke --dtype float16 --tokens 1,5 --adapters 1,3 --out $R"
  KERNELS_ARGS="--smoke --tokens 1 5 --adapters 1 3 --out $R"
  UPLOAD_ARGS="--cpu --layers 2 --adapters 2 --repeats 2 --out $R"
  E2E_ARGS="--cpu --adapters 6 --slots 2 --host 3 --requests 6 --naive-requests 3 --batch 2 --new-tokens 3 \
--mixes zipf,identical --catalog-dir $WORK/e2e-catalog --out $R"
  DEMO_ARGS="--setting smallest --data $WORK/demo_data"
else
  PY=${PYTHON:-python3}
  TESTS_ARGS="--timeout=60"
  TUNE_ARGS=""  # writes loraplex/kernels/configs/<GPU>.json here: the stages after it run with it
  STEP_LIN_ARGS="--linear-only --out $R"
  STEP_ARGS="--tokens 1,32,256 --out $R"
  KERNELS_ARGS="--ranks 16 --reps 50 --out $R"
  UPLOAD_ARGS="--out $R"
  E2E_ARGS="--adapters 400 --requests 256 --naive-requests 64 --mixes zipf,uniform,identical,distinct \
--catalog-dir /tmp/loraplex-e2e --out $R"
  DEMO_ARGS="--data /tmp/loraplex_demo_data"
fi
summary="$OUT/summary.txt"
: > "$summary"

bundle() {  # results + logs -> $OUT/loraplex_gpu.tgz, replaced whole (a kill mid-write leaves the old one)
  { tar -czf "$OUT/.bundle.tmp" -C "$WORK" results logs 2>/dev/null ||
    $PY -c "import sys, tarfile; t = tarfile.open(sys.argv[1], 'w:gz'); [t.add(sys.argv[2] + '/' + d, d) for d in ('results', 'logs')]; t.close()" \
      "$OUT/.bundle.tmp" "$WORK"; } && mv -f "$OUT/.bundle.tmp" "$OUT/loraplex_gpu.tgz"
}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to logs/NAME.log
  local name=$1 want=$(($2 * LIMIT_SCALE))
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((TOTAL_S - (SECONDS - T_START) - 10))  # 10 s kept for the last bundle and the summary
  local limit=$((want < left ? want : left))
  if [ "$limit" -lt 20 ]; then
    echo "$name: SKIPPED (only ${left} s left of TOTAL_S=${TOTAL_S})" | tee -a "$summary"
    return 0
  fi
  local log="$WORK/logs/$name.log" t0=$SECONDS
  echo "=== $name (limit ${limit}s, at $((SECONDS - T_START)) s): $*" | tee -a "$log"
  # the scripts stop starting new work ~10 s before the stage is stopped, and write what they have
  LORAPLEX_DEADLINE=$(($(date +%s) + limit - 10)) \
    timeout --signal=INT --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$? verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMEOUT (stopped at ${limit} s)"
  elif [ $rc -ne 0 ]; then verdict="FAILED rc=$rc"; fi
  echo "$name: $verdict ($((SECONDS - t0)) s)" | tee -a "$summary"
  tail -n 25 "$log"
  bundle
}

stage env 25 bash -c "nvidia-smi 2>&1 | head -15; $PY -c 'import sys, torch, triton, transformers, peft; \
print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, \
peft.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'; \
$PY -c 'import sys; sys.path.insert(0, \".peers/vllm\"); import vllm.lora.ops.triton_ops as v; print(\"vllm ops ok\")'; \
SGLANG_SHIM=.peers/sglang $PY -c 'import importlib.util as u; s = u.spec_from_file_location(\"p\", \".peers/sglang_peer.py\"); \
m = u.module_from_spec(s); s.loader.exec_module(m); print(\"sglang ops ok\")'; \
$PY -c 'import loraplex.kernels.ops, loraplex.kernels.sgmv_fused, loraplex.kernels.sgmv_shrink, \
loraplex.kernels.sgmv_expand, loraplex.kernels.embedding; print(\"loraplex kernels import ok\")'"

# the hazards no CPU run can show (bench/GPU_RUN.md lists them): 64-bit slot offsets, PDL after a kernel that
# signals early and writes late, the overlap paths (eager and graph replay), graphs per adapter-count bucket,
# a step with misses under torch.cuda.set_sync_debug_mode("error"); vLLM's dual stream where vLLM is installed
HAZARDS="int64_slot_offsets or writer_that_signals_first or overlap_context_equals or per_adapter_bucket or \
never_sync_the_host or dual_stream_equals_sequential"
stage hazards 90 $PY -m pytest -v -m gpu tests/kernels/test_gpu.py tests/vllm/test_overlap_plugin.py -k "$HAZARDS" \
  -p no:cacheprovider -rfE --durations=10 --junitxml="$R/gpu_hazards.xml" $TESTS_ARGS

# correctness at real shapes and CUDA-graph replay (kernels), device plans, overlapped uploads (runtime);
# no -x: every test runs; pytest-timeout bounds each test; -v so a stopped run still shows each outcome
stage tests 150 $PY -m pytest -v -m gpu tests/runtime/test_gpu.py tests/runtime/test_merged_gpu.py tests/kernels/test_gpu.py \
  tests/vllm/test_slab_upload_gpu.py tests/vllm/test_merged_gpu.py -k "not ($HAZARDS)" -p no:cacheprovider -rfE --durations=10 --junitxml="$R/gpu_tests.xml" $TESTS_ARGS

# kernel configs for this GPU (bench/tune.py): compiles its candidates in parallel, then a coordinate
# search over the decode step's LoRA, decode first; stops at the stage's deadline with what it found
stage tune 120 $PY bench/tune.py $TUNE_ARGS

# the headline: decode step kept vs base, ours beside vLLM's and SGLang's ops (TARGETS.md's setup)
stage step_linear 120 $PY bench/step.py $STEP_LIN_ARGS

# per layer vs the bandwidth floor and the peers, eager and graphed
stage kernels 90 $PY bench/kernels.py $KERNELS_ARGS

# cache miss: storage -> slab -> slot vs one-copy H2D, and GEMM slowdown while uploads run
stage upload 45 $PY bench/upload.py $UPLOAD_ARGS

# the decode step of the full model (attention over a 128-token context)
stage step 60 $PY bench/step.py $STEP_ARGS

# tokens/s and TTFT, adapters >> slots, four mixes, four systems
stage e2e 120 $PY bench/e2e.py $E2E_ARGS

# the demo with the Triton kernels (fp32: exact check against transformers + PEFT)
stage demo 45 $PY -m loraplex.demo $DEMO_ARGS

bundle
echo "=== summary ($((SECONDS - T_START)) s of TOTAL_S=${TOTAL_S})"
cat "$summary"
ls -la "$R" "$OUT"
# the headline table last, where the device tool's output_tail shows it
for f in step_linear step; do
  [ -f "$WORK/logs/$f.log" ] && { echo "--- $f"; grep -E '^ +[0-9]+ +[0-9]+ |^# (reference|FAIL|trunc)' "$WORK/logs/$f.log"; }
done
exit 0
