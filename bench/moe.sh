#!/bin/bash
# bench/moe.sh [tandem bench moe options] - the CPU MoE benchmark with its
# PyTorch baseline in one command (../shared/BENCH.md): first
# bench/torch_moe.py on the same shapes and token counts (its times go to a
# file; TORCH_OUT names it, default a temp file), then `tandem bench moe
# --torch FILE ...` so every line carries vs_torch. Uses build/tandem when it
# has the `bench moe` subcommand, else build/dev/moe_bench (make bench);
# BUILD=folder picks another build folder.
# If PyTorch fails, tandem still runs (vs_torch=na).
set -u
cd "$(dirname "$0")/.."
shapes=deepseek-v3,qwen3-30b-a3b
tokens=1,4,32,128,512,2048,8192
threads=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
    --shape) shapes=${args[i + 1]:-$shapes} ;;
    --tokens) tokens=${args[i + 1]:-$tokens} ;;
    --threads) threads=${args[i + 1]:-0} ;;
    esac
done
TORCH_OUT=${TORCH_OUT:-$(mktemp /tmp/torch_moe.XXXXXX)}
if ! python3 bench/torch_moe.py --shape "$shapes" --tokens "$tokens" --threads "$threads" --out "$TORCH_OUT"; then
    echo "bench=torch_moe error=torch_moe.py_failed (vs_torch will be na)"
fi
B=${BUILD:-build}
if "$B/tandem" bench moe --help >/dev/null 2>&1; then
    cmd=("$B/tandem" bench moe)
elif [ -x "$B/dev/moe_bench" ]; then
    cmd=("$B/dev/moe_bench")
else
    echo "bench/moe.sh: neither '$B/tandem bench moe' nor $B/dev/moe_bench (make bench)" >&2
    exit 2
fi
exec "${cmd[@]}" --torch "$TORCH_OUT" "$@"
