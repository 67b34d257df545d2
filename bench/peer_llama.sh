#!/usr/bin/env bash
# bench/peer_llama.sh - tandem against llama.cpp on the same GGUF file, CPU only.
#
#   bench/peer_llama.sh [LAYERS] [THREADS]      (defaults 4 layers, 2 threads)
#
# Makes (once, under ${PEER_DIR:-/tmp/peer}) a GGUF of Qwen3-30B-A3B shapes with
# LAYERS layers in two mixes (bench/peer_llama.py make): q4_k_m (experts Q4_K,
# every other layer's down Q6_K) and q8_0. On each, alternating, llama.cpp
# (llama-cpp-python through its Python API, bench/peer_llama.py llama) and
# `tandem run` (experts as int4 for q4_k_m, int8 for q8_0; packed from the
# file at load, not timed) run a PROMPT-token prompt and 16 decode steps with
# the same threads; the prompt is random words of the file's vocabulary, one
# token each. One line per case:
#   bench=peer_llama model=qwen3-30b-a3b layers=L quant=Q threads=T phase=prompt|decode
#     tokens=N tok_s=... llama_tok_s=... vs_llama=... expert_MB_tok=...
# expert_MB_tok: routed-expert bytes one decoded token reads in tandem's packed
# format (8 experts x 3 matrices x 768 x 2048 per layer). Needs llama-cpp-python
# (PYTHONPATH / LLAMA_CPP_LIB_PATH may point at a build), gguf and numpy;
# TANDEM=path names another tandem command than build/tandem.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-4}
T=${2:-2}
DIR=${PEER_DIR:-/tmp/peer}
mkdir -p "$DIR"
TANDEM=${TANDEM:-build/tandem} # another build of the command may be named
[ "$TANDEM" != build/tandem ] || make -s -j2 build/tandem >/dev/null

for q in q4_k_m q8_0; do
    f="$DIR/qwen3-30b-a3b-${L}l-$q.gguf"
    [ -f "$f" ] || python3 bench/peer_llama.py make "$f" --quant "$q" --layers "$L"
    fmt=int4
    mb=$(python3 -c "print(round($L*8*3*768*2048*(0.5+4/32)/1e6, 1))")
    if [ "$q" = q8_0 ]; then
        fmt=int8
        mb=$(python3 -c "print(round($L*8*3*768*2048*(1+4/2048)/1e6, 1))")
    fi
    for P in 512 2048; do
        prompt=$(python3 -c "import random; random.seed(3); print(' '.join('w%d' % random.randrange(151000) for _ in range($P)))")
        ll=$(python3 bench/peer_llama.py llama "$f" --threads "$T" --prompt "$P" --decode 16 | tail -n 1)
        out=$("$TANDEM" run -m "$f" -p "$prompt" -n 16 --greedy -t "$T" --cpu-experts $fmt -c $((P + 64)) 2>&1 >/dev/null |
              grep -o 'prompt: [0-9]* tokens, [0-9.]* tok/s | generation: [0-9]* tokens, [0-9.]* tok/s')
        tp=$(echo "$out" | sed -E 's/prompt: ([0-9]+) tokens, ([0-9.]+) tok.*/\1 \2/')
        tg=$(echo "$out" | sed -E 's/.*generation: ([0-9]+) tokens, ([0-9.]+) tok.*/\1 \2/')
        lp=$(echo "$ll" | sed -E 's/.*llama_prompt_tok_s=([0-9.]+).*/\1/')
        ld=$(echo "$ll" | sed -E 's/.*llama_decode_tok_s=([0-9.]+).*/\1/')
        set -- $tp
        echo "bench=peer_llama model=qwen3-30b-a3b layers=$L quant=$q threads=$T phase=prompt tokens=$1 tok_s=$2" \
             "llama_tok_s=$lp vs_llama=$(python3 -c "print(round($2/$lp, 2))")"
        set -- $tg
        echo "bench=peer_llama model=qwen3-30b-a3b layers=$L quant=$q threads=$T phase=decode prompt=$P tokens=$1" \
             "tok_s=$2 llama_tok_s=$ld vs_llama=$(python3 -c "print(round($2/$ld, 2))") expert_MB_tok=$mb"
    done
done
