#!/usr/bin/env bash
# dev/sysroot.sh - unpack the Debian libraries tandem builds against into
# .sysroot/ (git-ignored), for machines that have no package registry (the
# GPU machine). Run it here, carry .sysroot with the call, and build there with
#   make EXTRA_CFLAGS="-I$PWD/.sysroot/usr/include" \
#        EXTRA_LDFLAGS="-L$PWD/.sysroot/usr/lib/x86_64-linux-gnu -Wl,-rpath,$PWD/.sysroot/usr/lib/x86_64-linux-gnu"
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs="libjansson-dev libjansson4 libnuma-dev libnuma1 libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2
      libedit-dev libedit2 libbsd0 libmd0 libmicrohttpd-dev libmicrohttpd12"
rm -rf .sysroot && mkdir -p .sysroot/debs
(cd .sysroot/debs && apt-get download $pkgs >/dev/null)
for f in .sysroot/debs/*.deb; do dpkg -x "$f" .sysroot; done
rm -rf .sysroot/debs .sysroot/usr/share
du -sh .sysroot
