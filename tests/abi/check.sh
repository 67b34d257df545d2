#!/usr/bin/env bash
# tests/abi/check.sh - the ABI of libtandem.so (make test-abi):
#   1. it exports tandem_* functions only (src/libtandem.map hides the rest);
#   2. every symbol of the 0.1 release (tests/abi/tandem-0.syms) is still there;
#   3. the public structs and constants have the layout of the frozen 0.1
#      header (tests/abi/layout.c, compiled against both headers);
#   4. a client built against the frozen header alone (tests/abi/client.c),
#      linked with the .so, runs the demo model.
# Last line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
CC=${CC:-cc}
so=$BUILD/libtandem.so
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
ok() { echo "  ok: $1"; pass=$((pass + 1)); }
bad() { echo "  FAIL: $1"; fail=$((fail + 1)); }

nm -D --defined-only "$so" | awk '$2 ~ /^[TtWwDdBbRr]$/ {print $3}' | sed 's/@.*//' | sort -u > "$tmp/exported"
others=$(grep -v '^tandem_' "$tmp/exported" || true)
if [ -z "$others" ]; then ok "$(wc -l < "$tmp/exported") symbols exported, all tandem_*"
else bad "exported without the tandem_ prefix: $(echo $others | head -c 300)"; fi

missing=$(comm -23 <(sort -u tests/abi/tandem-0.syms) "$tmp/exported")
if [ -z "$missing" ]; then ok "every 0.1 symbol is exported"
else bad "0.1 symbols gone (a break of soname 0): $(echo $missing)"; fi

if $CC -std=c11 -Wall -Werror -Itests/abi/v0 -o "$tmp/layout0" tests/abi/layout.c &&
   $CC -std=c11 -Wall -Werror -Iinclude -o "$tmp/layout" tests/abi/layout.c &&
   "$tmp/layout0" > "$tmp/l0" && "$tmp/layout" > "$tmp/l1" && diff "$tmp/l0" "$tmp/l1" > "$tmp/ldiff"; then
    ok "struct layouts and constants equal the 0.1 header's ($(wc -l < "$tmp/l0") lines)"
else
    # a public struct changed size or a constant its value: a program built against 0.1 would
    # overrun or misread it. Before the first release, refreeze (cp include/tandem.h tests/abi/v0/);
    # after it, bump TANDEM_VERSION_MAJOR (the soname) and freeze a v1 header beside v0.
    bad "layout differs from the frozen 0.1 header: $(tr '\n' ' ' < "$tmp/ldiff" 2>/dev/null | head -c 400)"
fi

if $CC -std=c11 -Wall -Wextra -Werror -Itests/abi/v0 -o "$tmp/client" tests/abi/client.c \
       -L"$BUILD" -ltandem -Wl,-rpath,"$PWD/$BUILD" && "$tmp/client" models/demo > "$tmp/out" 2>&1; then
    ok "$(cat "$tmp/out")"
else
    bad "0.1 client: $(cat "$tmp/out" 2>/dev/null | tail -3)"
fi
echo "abi: $pass passed, $fail failed"
[ "$fail" = 0 ]
