#!/usr/bin/env bash
# Builds tools/runner/runner.cc (the slimgraph artifact runner) against TVM's runtime.
#
#   tools/build_runner.sh [arm64|x86|all]      (default: all)
#
# arm64: downloads the aarch64 wheels of apache-tvm and apache-tvm-ffi (the versions installed
#        in the Python below, so runtime and compiler match) with
#        `pip download --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64`, unzips
#        only libtvm_runtime.so, libtvm_ffi.so and the tvm-ffi headers, and cross-compiles with
#        aarch64-linux-gnu-g++. Run the result with
#        `qemu-aarch64 -L /usr/aarch64-linux-gnu $CACHE/runner/arm64/runner model.so ...`.
# x86:   uses the installed wheels in the Python environment and g++.
#
# Output: $CACHE/runner/<arch>/runner with the runtime libraries in $CACHE/runner/<arch>/lib
# (the runner's rpath is $ORIGIN/lib). CACHE is $SLIMGRAPH_RUNNER_CACHE, default
# <repo>/.slimgraph-cache (gitignored). The last line printed is the runner's path.
# Exit codes: 0 built (or up to date); 2 usage; 3 a compiler is missing; 4 wheels unavailable;
# 5 the compile failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SLIMGRAPH_RUNNER_CACHE:-$ROOT/.slimgraph-cache}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
WHAT="${1:-all}"

installed_version() {  # the version of a Python distribution, or the project's pin
    "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"
}
TVM_VERSION="${TVM_VERSION:-$(installed_version apache-tvm 0.27.0.post1)}"
TVM_FFI_VERSION="${TVM_FFI_VERSION:-$(installed_version apache-tvm-ffi 0.1.14.post1)}"

log() { echo "build_runner: $*" >&2; }

build() {  # build ARCH CXX FFI_INCLUDE LIBDIR
    local arch="$1" cxx="$2" include="$3" libdir="$4" out="$CACHE/runner/$1"
    mkdir -p "$out/lib"
    if [ "$libdir" != "$out/lib" ]; then
        cp -f "$libdir/libtvm_runtime.so" "$libdir/libtvm_ffi.so" "$out/lib/"
    fi
    make -s -C "$ROOT/tools/runner" CXX="$cxx" FFI_INCLUDE="$include" RUNTIME_LIB="$out/lib" \
        OUT="$out" "$out/runner" >&2 || { log "compiling the $arch runner failed"; return 5; }
    echo "$TVM_VERSION $TVM_FFI_VERSION" > "$out/VERSIONS"
    log "$arch runner: $out/runner (TVM $TVM_VERSION, tvm-ffi $TVM_FFI_VERSION)"
    echo "$out/runner"
}

fetch_arm64_runtime() {  # prints the folder holding lib/ and include/ for aarch64
    local dir="$CACHE/arm64-runtime/$TVM_VERSION-$TVM_FFI_VERSION"
    if [ -f "$dir/lib/libtvm_runtime.so" ] && [ -f "$dir/lib/libtvm_ffi.so" ] \
        && [ -d "$dir/include/tvm/ffi" ]; then
        echo "$dir"
        return 0
    fi
    local wheels="$CACHE/arm64-runtime/wheels"
    mkdir -p "$wheels"
    log "downloading the aarch64 wheels apache-tvm==$TVM_VERSION apache-tvm-ffi==$TVM_FFI_VERSION"
    if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --python-version 3.11 \
        "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" -d "$wheels" >&2; then
        log "could not download the aarch64 wheels (needs PyPI)"
        return 4
    fi
    local tmp
    tmp="$(mktemp -d "$CACHE/arm64-runtime/.unpack.XXXXXX")"
    unzip -q -o "$wheels"/apache_tvm-"$TVM_VERSION"-*aarch64*.whl 'tvm/lib/libtvm_runtime.so' -d "$tmp"
    unzip -q -o "$wheels"/apache_tvm_ffi-"$TVM_FFI_VERSION"-*aarch64*.whl \
        'tvm_ffi/lib/libtvm_ffi.so' 'tvm_ffi/include/*' -d "$tmp"
    mkdir -p "$tmp/out/lib"
    mv "$tmp/tvm/lib/libtvm_runtime.so" "$tmp/tvm_ffi/lib/libtvm_ffi.so" "$tmp/out/lib/"
    mv "$tmp/tvm_ffi/include" "$tmp/out/include"
    rm -rf "$dir"
    mv "$tmp/out" "$dir"
    rm -rf "$tmp"
    echo "$dir"
}

build_arm64() {
    if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
        log "aarch64-linux-gnu-g++ not found: install g++-aarch64-linux-gnu (tools/setup_toolchains.sh)"
        return 3
    fi
    local rt
    rt="$(fetch_arm64_runtime)" || return $?
    build arm64 aarch64-linux-gnu-g++ "$rt/include" "$rt/lib"
}

build_x86() {
    if ! command -v g++ >/dev/null 2>&1; then
        log "g++ not found: install g++"
        return 3
    fi
    local ffi tvm
    ffi="$("$PYTHON" -c 'import os, tvm_ffi; print(os.path.dirname(tvm_ffi.__file__))')"
    tvm="$("$PYTHON" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("tvm").origin))')"
    mkdir -p "$CACHE/x86-runtime"
    cp -f "$tvm/lib/libtvm_runtime.so" "$ffi/lib/libtvm_ffi.so" "$CACHE/x86-runtime/"
    build x86 g++ "$ffi/include" "$CACHE/x86-runtime"
}

case "$WHAT" in
    arm64) build_arm64 ;;
    x86) build_x86 ;;
    all) build_x86 && build_arm64 ;;
    *) echo "usage: $0 [arm64|x86|all]" >&2; exit 2 ;;
esac
