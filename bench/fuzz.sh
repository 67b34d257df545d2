#!/usr/bin/env bash
# bench/fuzz.sh - run the libFuzzer targets of fuzz/ for a given time each.
#
#   bench/fuzz.sh TARGET SECONDS [cpu]   one target (a name in fuzz/, e.g. jinja)
#   bench/fuzz.sh all SECONDS [cpu]      every target, one after the other
#
# With `cpu`, SECONDS are CPU seconds: on a machine shared with other work a
# target runs again (from what it has learnt so far) until it got that much
# CPU time, as a fuzzing campaign measured in CPU-minutes needs.
#
# Builds them first (make fuzz, into build-fuzz/). Each target runs on one core
# for SECONDS (-max_total_time) from the committed seeds in fuzz/corpus/TARGET;
# what it learns goes to build-fuzz/corpus/TARGET (kept between runs, never
# into the committed seeds). Per input: 10 s at most (-timeout), 2 GB of RSS at
# most (-rss_limit_mb; the parsers need tens of MB, and two of these fit the
# 24 GB machine next to anything else). One line per target:
#   bench=fuzz target=NAME seconds=S execs=N crashes=N
# (S: the seconds it ran, less than SECONDS when it stopped at a crash)
# A crash, leak, timeout or out-of-memory input stops that target; its file is
# kept as build-fuzz/crashes/TARGET-crash-<sha1> (replay it with
# build-fuzz/fuzz/TARGET FILE) and the script exits 1 after the other targets.
# The full libFuzzer log of each run is in build-fuzz/logs/TARGET.log.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ] || [ $# -gt 3 ] || ! [[ "$2" =~ ^[0-9]+$ ]] || { [ $# = 3 ] && [ "$3" != cpu ]; }; then
    echo "usage: bench/fuzz.sh TARGET|all SECONDS [cpu]" >&2
    exit 2
fi
if [ "$1" = all ]; then
    targets=$(ls fuzz/*.c | sed 's|fuzz/||; s|\.c$||')
else
    [ -f "fuzz/$1.c" ] || { echo "bench/fuzz.sh: no target fuzz/$1.c" >&2; exit 2; }
    targets=$1
fi
secs=$2 by_cpu=${3:-}
make -s fuzz -j"${JOBS:-2}" >/dev/null || { echo "bench/fuzz.sh: make fuzz failed" >&2; exit 2; }

failed=0
mkdir -p build-fuzz/crashes build-fuzz/logs
for t in $targets; do
    work=build-fuzz/corpus/$t log=build-fuzz/logs/$t.log
    mkdir -p "$work"
    before=$(ls build-fuzz/crashes | grep -c "^$t-" || true) start=$(date +%s)
    cpu=0 execs_total=0 rc=0
    : >"$log"
    while :; do
        left=$((secs - cpu))
        TIMEFORMAT='%U %S'
        { time build-fuzz/fuzz/"$t" -max_total_time="$left" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
            -artifact_prefix=build-fuzz/crashes/"$t"- "$work" fuzz/corpus/"$t" >"$log.slice" 2>&1; } 2>"$log.cpu"
        rc=$?
        cat "$log.slice" >>"$log"
        cpu=$((cpu + $(awk '{printf "%.0f", $1 + $2}' "$log.cpu")))
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log.slice" | tail -n 1)
        # a crashed run prints no final stats: take its last status line ("#N ...")
        [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log.slice" | tail -n 1 | tr -d '#')
        execs_total=$((execs_total + ${execs:-0}))
        # one slice unless SECONDS are CPU seconds; never past a crash
        [ "$by_cpu" = cpu ] && [ $rc = 0 ] && [ $cpu -lt "$secs" ] || break
    done
    rm -f "$log.slice" "$log.cpu"
    ran=$(($(date +%s) - start)) # what it ran: less than SECONDS when it stopped at a crash
    after=$(ls build-fuzz/crashes | grep -c "^$t-" || true)
    execs=$execs_total
    crashes=$((after - before))
    [ $rc -ne 0 ] && [ $crashes -eq 0 ] && crashes=1 # died without an artifact (e.g. a trap in init)
    echo "bench=fuzz target=$t seconds=$ran cpu_s=$cpu execs=${execs:-0} crashes=$crashes"
    if [ $crashes -ne 0 ]; then
        failed=1
        grep -m 3 -E 'ERROR: |runtime error|SUMMARY' "$log" | sed 's/^/  /'
        ls -t build-fuzz/crashes | grep "^$t-" | head -n 1 | sed 's|^|  kept: build-fuzz/crashes/|'
    fi
done
exit $failed
