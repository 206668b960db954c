#!/usr/bin/env bash
# The whole GPU run in one device call: correctness first, then every timing stage, the tables
# last. Each stage has its own time limit and all of them one deadline, so a stage that hangs or
# compiles for ever costs its limit, never the call; what did not fit is named, not run.
#
#   bash bench/gpu_all.sh                 # every stage (about 8 minutes on an H200)
#   bash bench/gpu_all.sh --quick         # shorter workloads, for a second attempt
#   bash bench/gpu_all.sh speed serve     # just these stages (names below)
#
# Out ($OUT, default /tmp/out; the device tool brings back at most 8 files): summary.txt (one line
# per stage: rc, seconds), RESULTS-gpu.md (the markdown sections for bench/RESULTS.md), logs.tar.gz
# (every log and JSON), compile-cache.tar.gz (inductor's and Triton's caches: carry it back as
# out/cache/compile-cache.tar.gz and the next call compiles from it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
LOGS="$OUT/logs"
MD="$OUT/RESULTS-gpu.md"
SUMMARY="$OUT/summary.txt"
mkdir -p "$LOGS"
QUICK=0
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    *) STAGES+=("$arg") ;;
  esac
done
ALL=(env tests diag kernel speed-eager speed serve chunks throughput hf prefill gemv speed-gemv rows)
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL[@]}")
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-480}))
CACHE=${TMPDIR:-/tmp}/refreekv-compile
export TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor TRITON_CACHE_DIR=$CACHE/triton
mkdir -p "$CACHE"
if [ -f out/cache/compile-cache.tar.gz ]; then
  tar -xzf out/cache/compile-cache.tar.gz -C "$CACHE" && echo "compile cache: restored" >>"$SUMMARY"
fi
q() { [ "$QUICK" = 1 ] && echo "$2" || echo "$1"; }  # q FULL QUICK

# stage NAME LIMIT_S CMD...: run CMD under min(LIMIT, what the deadline leaves), log to logs/NAME.log
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 25))
  if [ "$left" -lt 20 ]; then
    echo "$name: not run (deadline)" | tee -a "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOGS/$name.log"
  timeout -k 10 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $(($(date +%s) - t0)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
  tail -n 4 "$LOGS/$name.log" | sed 's/^/    /'
}

P=(python -m)
SEVEN=(--shape qwen2.5-7b --device cuda --compile)
for s in "${STAGES[@]}"; do
  case "$s" in
    env)
      stage env 30 bash -c 'nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv;
        python -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)";
        git log -1 --format="%H %s" 2>/dev/null || true' ;;
    tests)
      # CUDA correctness: the Triton kernel at GPU sizes, compiled CUDA graphs vs eager and vs the
      # dense store, no recompiles / re-recordings (decode re-plans included), the server on CUDA,
      # one NCCL rank, the Triton GEMV and the paged pool's Triton path
      TIMEOUT=()
      python -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(--timeout 60)
      REFREEKV_INSTAFAIL=1 stage tests "$(q 240 180)" "${P[@]}" pytest -q -p no:cacheprovider "${TIMEOUT[@]}" \
        tests/test_gpu.py tests/test_gemv.py tests/test_tp.py -k "not speed_bench_tiny and (not test_tp or nccl)" ;;
    diag)
      stage diag 100 env TORCH_LOGS=recompiles,graph_breaks "${P[@]}" bench.gpu_diag ;;
    tests-x)
      # the first compiled test's whole traceback
      stage tests-x 70 "${P[@]}" pytest -x -q -p no:cacheprovider --tb=long tests/test_gpu.py \
        -k "compiled_cuda_graphs_match" ;;
    speed-eager)
      stage speed-eager 110 "${P[@]}" bench.speed --no-compile --sections speed,floor --policies full,refreekv \
        --prompt-lens 512,8192 --new-tokens 64 --json "$LOGS/speed-eager.json" --results-md "$MD" ;;
    throughput-eager)
      stage throughput-eager 90 "${P[@]}" bench.throughput --shape qwen2.5-7b --device cuda --budgets 1,0.25 \
        --requests 32 --new-tokens 64 --pool-tokens 30000 --max-seqs 64 \
        --json "$LOGS/throughput-eager.json" --results-md "$MD" ;;
    kernel)
      stage kernel 40 "${P[@]}" bench.attention --json "$LOGS/attention.json" ;;
    speed)
      # ours: batch 1 at 512 and 8k (decode, prefill, pruning), the floor, batch 16 x 4k (full,
      # 25%), a profile of a batch-1 step; the JSON is rewritten after every run
      stage speed "$(q 240 150)" "${P[@]}" bench.speed --compile --sections speed,floor,batch,profile \
        --prompt-lens "$(q 512,8192 512)" --new-tokens "$(q 128 64)" --batches 16 --batch-prompt 4096 \
        --budgets 0.25 --trace "$LOGS/trace.json" --json "$LOGS/speed.json" --results-md "$MD" ;;
    hf)
      # transformers on the same weights: static cache + torch.compile at batch 1 (512) and 16 x 4k
      stage hf "$(q 200 150)" "${P[@]}" bench.speed --compile --sections speed,hf --policies full \
        --prompt-lens 512 --new-tokens "$(q 128 64)" --batches 16 --batch-prompt 4096 \
        --hf-modes static-compile --json "$LOGS/speed-hf.json" --results-md "$MD" ;;
    throughput)
      stage throughput "$(q 150 100)" "${P[@]}" bench.throughput "${SEVEN[@]}" --budgets 1,0.25 \
        --requests "$(q 48 32)" --new-tokens 64 --pool-tokens 30000 --max-seqs 64 \
        --json "$LOGS/throughput.json" --results-md "$MD" ;;
    serve)
      stage serve "$(q 200 130)" "${P[@]}" bench.serve "${SEVEN[@]}" --rate 4 --requests "$(q 48 24)" \
        --min-tokens 500 --max-tokens 2000 --new-tokens 32 --pool-tokens 30000 --offline-check \
        --long 3 --max-batched-tokens "$(q 0,2048,16384:2.5 2048,16384:2.5)" --policies full,refreekv \
        --json "$LOGS/serve.json" --results-md "$MD" ;;
    chunks)
      # chunked prefill's cost: prefill tok/s per token budget against whole prompts (issue 29)
      stage chunks 90 "${P[@]}" bench.chunks --shape qwen2.5-7b --device cuda --prompt 8192 \
        --budgets 0,512,1024,2048,4096 --json "$LOGS/chunks.json" --results-md "$MD" ;;
    prefill)
      stage prefill 90 "${P[@]}" bench.prefill --shape qwen2.5-7b --device cuda --long "$(q 8192 4096)" \
        --n-short 50 --reps 1 --results-md "$MD" ;;
    gemv)
      stage gemv 60 "${P[@]}" bench.gemv --no-autotune --json "$LOGS/gemv.json" ;;
    speed-gemv)
      # the Triton GEMV path end to end at batch 1 (REFREEKV_GEMV=triton): same rows as `speed`
      REFREEKV_GEMV=triton stage speed-gemv 120 "${P[@]}" bench.speed --compile --sections speed,floor \
        --policies full --prompt-lens 512 --new-tokens 64 --json "$LOGS/speed-gemv.json" --results-md "$MD" ;;
    rows)
      # issue 27's rows, as on the CPU: ours eager + transformers eager / static-compile, then ours
      # compiled; batch 1 at 512 and 2048, batch 8 at 512 (bench/rows.sh)
      stage rows "$(q 300 150)" bash bench/rows.sh --shape qwen2.5-7b --device cuda --out "$LOGS" --md "$MD" ;;
    anchor)
      [ -f out/anchors/hf_baseline.py ] && stage anchor 200 python out/anchors/hf_baseline.py eager static-compile ;;
    *)
      echo "unknown stage $s (one of: ${ALL[*]} anchor diag tests-x speed-eager throughput-eager)" | tee -a "$SUMMARY" ;;
  esac
done
echo "total $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
tar -czf "$OUT/compile-cache.tar.gz" -C "$CACHE" . 2>/dev/null
[ "$(stat -c %s "$OUT/compile-cache.tar.gz")" -gt 16000000 ] && rm -f "$OUT/compile-cache.tar.gz" \
  && echo "compile cache over 16 MB: not brought back" | tee -a "$SUMMARY"
cat "$SUMMARY"
[ -f "$MD" ] && tail -c 6000 "$MD"
exit 0
