#!/usr/bin/env bash
# dev/h200_train.sh - one call on the H200 machine: train the demo model into
# $OUT (8 files), and meanwhile, at low priority, build tandem CPU-only from the
# carried .sysroot and run its tests, printing a summary at the end (stdout is
# all that comes back besides the 8 model files).
set -u
cd "$(dirname "$0")/.."
SR=$PWD/.sysroot/usr
(
  echo "== probe"; nproc; lscpu | grep -E 'Model name|amx|avx512_bf16' | cut -c1-200 | head -3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "== build"
  nice -n 19 make -j4 CUDA=0 build/run_tests EXTRA_CFLAGS="-I$SR/include" \
     EXTRA_LDFLAGS="-L$SR/lib/x86_64-linux-gnu -Wl,-rpath,$SR/lib/x86_64-linux-gnu" > /tmp/build.log 2>&1 \
     && echo build ok || { echo build FAILED; grep -E 'error' /tmp/build.log | head -20; }
  echo "== tests"; TANDEM_LOG=info nice -n 19 build/run_tests 2>&1 | grep -vE '^  ' | tail -25
) > /tmp/side.log 2>&1 &
side=$!
PYTHONUNBUFFERED=1 python3 tools/train_demo.py --corpus .corpus/apt-descriptions.jsonl.gz \
    --out "$OUT" --minutes "${MINUTES:-5.5}" --device cuda 2>&1 | grep -vE 'Token indices|^\s*$' | tail -60
wait $side
cat /tmp/side.log
