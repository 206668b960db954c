#!/usr/bin/env bash
# The GPU measurements of the paged engine, for a session with a lent H100 (device tool's `run`):
# each stage fits one 10-minute call; logs and JSON go to $OUT, the markdown sections to
# $OUT/RESULTS-gpu.md (append them to bench/RESULTS.md here afterwards). The device has no model
# hub and no package index: only random-weight shapes run there (the bundled real models' wheels
# are over the 64 MiB a call may carry).
#
#   bash bench/gpu.sh tests        # tests/test_gpu.py + the kernel/pool/engine tests on CUDA + one NCCL rank
#   bash bench/gpu.sh kernel       # bench/speed/attention.py: kernel vs reference vs dense SDPA, page sizes
#   bash bench/gpu.sh gemv         # bench/speed/gemv.py: decode projections, cuBLAS vs engine/kernels/gemv.py's tile sweep, rows 1/4/16
#   bash bench/gpu.sh gemv-tuned   # the same at rows 1 with max-autotune's Triton templates (compiles: minutes)
#   bash bench/gpu.sh speed-gemv   # bench/speed/cli.py batch 1 at 512 through the Triton GEMV (REFREEKV_GEMV=triton)
#   bash bench/gpu.sh speed        # bench/speed/cli.py, Qwen2.5-7B shape: batch 1 (512, 8k), floor, scaling, batch 16 x 4k
#   bash bench/gpu.sh hf           # bench/speed/cli.py's transformers rows (eager + static compile) on the same weights
#   bash bench/gpu.sh anchor       # the team's transformers anchor script, copied into out/anchors/ (ignored) and
#                                  # carried with the call (device tool: carry ["out/anchors"]): the same-run anchor
#   bash bench/gpu.sh rows         # bench/rows.sh: the CPU table's rows (ours eager / compiled, transformers eager / static compile)
#   bash bench/gpu.sh chunks       # bench/chunks.py: prefill tok/s per chunked-prefill token budget, 7B shape, one 8k prompt
#   bash bench/gpu.sh throughput   # bench/load/throughput.py, 7B shape, forced budgets 100/50/25%, transformers static batching
#   bash bench/gpu.sh all [--quick] [STAGE...]   # bench/gpu_all.sh: the whole GPU run in one call (see there)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MD="$OUT/RESULTS-gpu.md"
case "${1:-}" in
  tests)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    # no -x: one failure must not hide the rest; the bundled real models are not on the device
    { python -m pytest -q tests/test_gpu.py tests/test_kv.py tests/test_engine.py -m "not slow" \
        --deselect tests/test_engine.py::test_incremental_detokenisation_equals_full_decoding \
        --deselect tests/test_engine.py::test_cli_batch_prints_every_answer_in_order; python -m pytest -q tests/test_tp.py -k nccl; python -m pytest -q tests/test_gemv.py; } 2>&1 | tee "$OUT/pytest-gpu.log" ;;
  kernel)
    python -m bench.attention --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" ;;
  gemv)
    python -m bench.gemv --no-autotune --json "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.log" ;;
  gemv-tuned)
    python -m bench.gemv --rows 1 --json "$OUT/gemv-tuned.json" 2>&1 | tee "$OUT/gemv-tuned.log" ;;
  speed-gemv)
    REFREEKV_GEMV=triton python -m bench.speed --compile --sections speed,floor,profile --policies full --prompt-lens 512 \
      --json "$OUT/speed-gemv.json" --results-md "$MD" 2>&1 | tee "$OUT/speed-gemv.log" ;;
  speed)
    python -m bench.speed --compile --sections speed,floor,scaling,batch,profile --trace "$OUT/trace.json" --json "$OUT/speed.json" --results-md "$MD" 2>&1 | tee "$OUT/speed.log" ;;
  hf)
    python -m bench.speed --compile --sections speed,hf --policies full --prompt-lens 512,8192 --json "$OUT/speed-hf.json" \
      --results-md "$MD" 2>&1 | tee "$OUT/speed-hf.log" ;;
  rows)
    bash bench/rows.sh --shape qwen2.5-7b --device cuda --out "$OUT" --md "$MD" ;;
  anchor)
    [ -f out/anchors/hf_baseline.py ] || { echo "copy the anchor script to out/anchors/hf_baseline.py and carry out/anchors" >&2; exit 2; }
    python out/anchors/hf_baseline.py eager static-compile 2>&1 | tee "$OUT/anchor.log" ;;
  throughput)
    python -m bench.throughput --shape qwen2.5-7b --device cuda --compile --budgets 1,0.5,0.25 --requests 64 --new-tokens 128 \
      --pool-tokens 60000 --max-seqs 64 --hf static-compile --hf-batch 16 --json "$OUT/throughput-7b.json" \
      --results-md "$MD" 2>&1 | tee "$OUT/throughput.log" ;;
  chunks)
    python -m bench.chunks --shape qwen2.5-7b --device cuda --prompt 8192 --budgets 0,512,1024,2048,4096 \
      --json "$OUT/chunks.json" --results-md "$MD" 2>&1 | tee "$OUT/chunks.log" ;;
  all)
    # every stage in one call, correctness first, each under its own limit and all under one
    # deadline (DEADLINE_S, default 480): what does not fit is named in summary.txt, not run
    shift
    exec bash bench/gpu_all.sh "$@" ;;
  *)
    echo "usage: bash bench/gpu.sh all [--quick] [STAGE...]|tests|kernel|gemv|gemv-tuned|speed|speed-gemv|hf|rows|anchor|chunks|throughput" >&2
    exit 2 ;;
esac
