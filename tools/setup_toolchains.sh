#!/usr/bin/env bash
# Installs the arm64 cross compiler and qemu-user (Debian packages) for the arm64 target's
# tests. Needs root and the Debian registry; without them the arm64 tests skip with a reason.
set -u
need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -eq 0 ]; then
    echo "toolchains: aarch64 cross compiler and qemu-user present"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "toolchains: missing ${need[*]} and cannot apt-get install them (not root or no apt); arm64 tests will skip"
    exit 0
fi
echo "toolchains: installing ${need[*]}"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/tmp/slimgraph_apt.log 2>&1 \
    || echo "toolchains: apt-get install failed (see /tmp/slimgraph_apt.log); arm64 tests will skip"
exit 0
