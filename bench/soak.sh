#!/usr/bin/env bash
# bench/soak.sh - a soak of `tandem serve`: start a server on the demo model
# (loopback, a free port, packed INT8 experts, whose expert sums do not
# depend on the batch, so greedy outputs must stay identical to solo runs) and
# drive it for SECONDS with bench/soak.py's mix of valid, malformed, slow and
# disconnecting clients; then stop it with SIGTERM, which must exit 0.
#
#   bench/soak.sh SECONDS [CLIENTS]      (default 6 clients)
#
# Prints soak.py's `bench=soak ...` line with kernels=SET server_exit=STATUS appended, and
# exits 1 when anything was wrong. The server's log is kept in
# build/soak-server.log.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: bench/soak.sh SECONDS [CLIENTS]" >&2
    exit 2
fi
secs=$1 clients=${2:-6}
BIN=${TANDEM_BIN:-build/tandem}
[ -x "$BIN" ] || make -s -j"$(nproc)" >/dev/null || exit 2
log=build/soak-server.log
# greedy outputs are promised load-independent on the batch-invariant kernels:
# on an AMX machine the AVX-512 set (see tests/server/run.sh); SOAK_CPU
# overrides (e.g. SOAK_CPU=amx to watch the tile kernels too)
cpu=${SOAK_CPU:-}
[ -z "$cpu" ] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null && cpu=avx512
[ -n "$cpu" ] && export TANDEM_CPU=$cpu
"$BIN" serve -m models/demo --host 127.0.0.1 --port 0 --cpu-only --cpu-experts int8 --max-seqs 16 --queue 64 \
    2>"$log" &
pid=$!
for _ in $(seq 1 600); do
    grep -qs "listening on" "$log" && break
    kill -0 $pid 2>/dev/null || { echo "bench/soak.sh: the server did not start:"; tail -n 20 "$log"; exit 1; }
    sleep 0.1
done
url=$(grep -o 'http://[^ ]*' "$log" | tail -n 1)
out=$(python3 bench/soak.py "$url" "$secs" $pid --clients="$clients")
rc=$?
kill -TERM $pid 2>/dev/null
wait $pid
srv=$?
echo "$out" | grep -v '^bench=soak'
echo "$(echo "$out" | grep '^bench=soak') kernels=${cpu:-default} server_exit=$srv"
[ $rc = 0 ] && [ $srv = 0 ]
