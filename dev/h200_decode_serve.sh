#!/usr/bin/env bash
# dev/h200_decode_serve.sh - one short call on the H200 machine (~4 minutes):
#   1. build with CUDA
#   2. e2e Qwen3-30B-A3B, INT4 CPU experts: hybrid decode with the memop
#      hand-off at deferral 0, 2, 0, 1 (d=0 twice: the drift of a shared
#      machine between the first and the third line), then CPU-only on the
#      same shapes; cpu_def_ms splits out the deferred experts; --pcie: one
#      MoE layer's experts streamed to the GPU vs the CPU at 512, 2048 and 4096
#      tokens (bench=prefill_stream, issue 5 item 4), and the prefill again
#      with expert streaming from 1024 tokens (stream_min=1024 lines)
#   3. bench/serve.sh on the same full-size model (random weights), 1/4/16
#      streams, 64 tokens each
#   OUT=/some/dir dev/h200_decode_serve.sh      (carry .sysroot, see dev/sysroot.sh; SERVE=0: no step 3;
#                                                DS_DEFER, DS_PROMPTS, DS_STREAM_MIN, DS_PCIE=0: step 2's)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/h200_ds}
mkdir -p "$OUT"
if ! command -v nvcc >/dev/null; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && { export PATH="$d:$PATH"; break; }; done
fi
mk=(make -j"$(nproc)")
if [ -d .sysroot/usr ]; then
    SR=$PWD/.sysroot/usr
    mk+=(EXTRA_CFLAGS="-I$SR/include" EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu")
fi
echo "== build ($SECONDS s)"
timeout 240 "${mk[@]}" CUDA=1 build/tandem >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
echo "== e2e qwen3 ($SECONDS s)"
E2E_MODELS=qwen3 E2E_TIMEOUT=240 E2E_QWEN_MODE=both E2E_HANDOFF=memop E2E_DEFER=${DS_DEFER:-0,2,0,1} E2E_PROMPTS=${DS_PROMPTS:-512,2048,4096} \
    E2E_PCIE=${DS_PCIE:-1} E2E_STREAM_MIN=${DS_STREAM_MIN:-1024} OUT="$OUT" \
    bench/e2e.sh build 2>&1 | grep -E '^(bench=|#)'
echo "== serve ($SECONDS s)"
if [ "${SERVE:-1}" = 0 ]; then
    echo "serve bench left out (SERVE=0)"
elif command -v curl >/dev/null; then
    MODEL=bench/configs/qwen3-30b-a3b TOKENS=64 REPS=1 LOGPROBS=1 OUT="$OUT/serve.txt" timeout 230 bench/serve.sh build -- \
        --dummy-weights --tokenizer models/demo --cpu-experts int4 2>&1 | tail -n 12
else
    echo "serve bench skipped: no curl on this machine"
fi
echo "== done ($SECONDS s)"
