#!/usr/bin/env bash
# The eager / compiled / transformers rows of one model on one device (issue 27's table): batch 1 at
# prompts 512 and 2048, batch 8 at 512, 64 new tokens, full KV; our eager engine with transformers
# eager and static-cache + torch.compile in one process, then our compiled engine in a second one
# (its warm-up is in its JSON: compile_warmup_s, graphs_compiled_*). Sections go to --results-md.
#
#   OMP_NUM_THREADS=1 bash bench/rows.sh --model smollm2-135m-instruct --device cpu --dtype float32 --md bench/RESULTS.md
#   bash bench/rows.sh --shape qwen2.5-7b --device cuda --md "$OUT/RESULTS-gpu.md"        # bench/gpu.sh rows
#
# Options: SRC (--model M | --shape S), --device, --dtype, --md FILE, --out DIR (logs, JSON; default /tmp),
# --prompt-lens L (batch-1 prompts, default 512,2048), --batch-prompt N (batch-8 prompt, default 512).
set -uo pipefail
cd "$(dirname "$0")/.."
src=() md="" out=/tmp tag=rows lens=512,2048 bprompt=512
while [ $# -gt 0 ]; do
  case "$1" in
    --model|--shape|--device|--dtype) src+=("$1" "$2"); [ "$1" = --model ] || [ "$1" = --shape ] && tag="$2"; shift 2 ;;
    --md) md="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --prompt-lens) lens="$2"; shift 2 ;;
    --batch-prompt) bprompt="$2"; shift 2 ;;
    *) echo "bench/rows.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
tag="$tag-t${OMP_NUM_THREADS:-all}-b$bprompt"
rows=(--prompt-lens "$lens" --new-tokens 64 --policies full --batches 8 --batch-prompt "$bprompt" --budgets none)
mdarg=(); [ -n "$md" ] && mdarg=(--results-md "$md")
rc=0
python -m bench.speed "${src[@]}" "${rows[@]}" --no-compile --sections speed,batch,hf --hf-modes eager,static-compile \
  --json "$out/$tag-eager.json" "${mdarg[@]}" 2>&1 | tee "$out/$tag-eager.log" || rc=1
python -m bench.speed "${src[@]}" "${rows[@]}" --compile --sections speed,batch \
  --json "$out/$tag-compiled.json" "${mdarg[@]}" 2>&1 | tee "$out/$tag-compiled.log" || rc=1
exit $rc
