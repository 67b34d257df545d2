#!/usr/bin/env bash
# bench/e2e.sh - end-to-end benchmark of the hybrid engine (and the CPU engine)
# on full-size shapes with dummy weights: Qwen3-30B-A3B, then DeepSeek-V3
# with as many layers as host memory holds. Prints BENCH.md lines and writes
# them to $OUT/e2e-<model>.txt.
#
#   bench/e2e.sh [BUILD]          BUILD: the build folder (default build)
#   env: OUT (default .), E2E_MODELS="qwen3 deepseek", E2E_DECODE (32),
#        E2E_PROMPTS (512,4096), E2E_DS_LAYERS (5: 3 dense + 2 MoE layers,
#        ~70 GB of host memory with INT4 experts), E2E_EXPERTS (int4),
#        E2E_TIMEOUT (seconds per model, 240), E2E_HANDOFF (both, host or
#        memop), E2E_DEFER (deferral values, 0), E2E_KERNELS (decode, or both:
#        also the first kernels' GPU time), E2E_OPS=1 (per-op table),
#        E2E_PCIE=1 (one MoE layer streamed to the GPU vs the CPU per prompt),
#        E2E_STREAM_MIN=N (prefill again with expert streaming from N tokens),
#        E2E_QWEN_MODE (both: also the CPU engine; or hybrid)
# Uses `$BUILD/tandem bench e2e` when the command has it, else links
# bench/e2e_main.c against $BUILD/libtandem.a with the Makefile's libraries.
set -u
cd "$(dirname "$0")/.."
BUILD=${1:-build}
OUT=${OUT:-.}
mkdir -p "$OUT"
models=${E2E_MODELS:-qwen3 deepseek}
decode=${E2E_DECODE:-32}
prompts=${E2E_PROMPTS:-512,4096}
experts=${E2E_EXPERTS:-int4}
tmo=${E2E_TIMEOUT:-240}

if [ -x "$BUILD/tandem" ] && "$BUILD/tandem" bench --help 2>&1 | grep -q e2e; then
    runner=("$BUILD/tandem" bench e2e)
else
    libs=$(make --no-print-directory -s -f Makefile -f <(printf 'print-%%:\n\t@echo $($*)\n') \
           BUILD="$BUILD" ${EXTRA_LDFLAGS:+EXTRA_LDFLAGS="$EXTRA_LDFLAGS"} print-LDLIBS)
    if ! cc -std=c11 -O2 -D_GNU_SOURCE -Iinclude -Isrc ${EXTRA_CFLAGS:-} bench/e2e_main.c \
            "$BUILD/libtandem.a" $libs -o "$BUILD/e2e_bench"; then
        echo "e2e: could not link bench/e2e_main.c against $BUILD/libtandem.a" >&2
        exit 1
    fi
    runner=("$BUILD/e2e_bench")
fi

rc=0
for m in $models; do
    case $m in
    qwen3) args=(--model bench/configs/qwen3-30b-a3b --name qwen3-30b-a3b --mode "${E2E_QWEN_MODE:-both}" --cpu-prompt 512 --cpu-decode 8) ;;
    deepseek) args=(--model bench/configs/deepseek-v3 --name deepseek-v3 --layers "${E2E_DS_LAYERS:-5}" --mode hybrid) ;;
    *) echo "e2e: unknown model $m (qwen3, deepseek)" >&2; rc=1; continue ;;
    esac
    args+=(--handoff "${E2E_HANDOFF:-both}" --defer "${E2E_DEFER:-0}" --kernels "${E2E_KERNELS:-decode}")
    [ "${E2E_OPS:-0}" = 1 ] && args+=(--ops)
    [ "${E2E_PCIE:-0}" = 1 ] && args+=(--pcie)
    [ -n "${E2E_STREAM_MIN:-}" ] && args+=(--stream-min "$E2E_STREAM_MIN")
    log="$OUT/e2e-$m.txt"
    echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(nproc) cores: ${runner[*]} ${args[*]} --dummy-weights --experts $experts --prompt $prompts --decode $decode" | tee "$log"
    TANDEM_LOG=${TANDEM_LOG:-info} timeout "$tmo" "${runner[@]}" "${args[@]}" --dummy-weights --experts "$experts" \
        --prompt "$prompts" --decode "$decode" 2>&1 | tee -a "$log"
    r=${PIPESTATUS[0]}
    [ "$r" = 0 ] || { echo "e2e: $m exited with $r$([ "$r" = 124 ] && echo ' (timeout)')" | tee -a "$log"; rc=1; }
done
exit $rc
