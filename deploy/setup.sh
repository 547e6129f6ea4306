#!/bin/sh
# deploy/setup.sh — make a Debian 12 machine ready to build fedpeft, and build it.
#
#   deploy/setup.sh deps [--test|--package]
#                                        install missing Debian packages (as root or via sudo):
#                                        to build and run the demo; --test adds the test suite's,
#                                        --package the packaging tools
#   deploy/setup.sh build DIR [cmake options...]
#                                        configure (Ninja) and build into DIR
#
# Only Debian 12 packages are used; nothing is downloaded at build or run time.
set -eu

# One list per purpose. To build fedpeft (without its tests):
BUILD_PKGS="gcc cmake ninja-build pkg-config libuv1-dev libprotobuf-c-dev protobuf-c-compiler
libssl-dev libopenblas-dev liblapacke-dev libsqlite3-dev libjansson-dev libinih-dev
libpcre2-dev libutf8proc-dev libsystemd-dev libmicrohttpd-dev nettle-dev libdnnl-dev
libpng-dev libjpeg62-turbo-dev zlib1g-dev"
# the demos' data (fedpeft sim's 12 languages; --task image's Fashion-MNIST) and the tests':
DEMO_PKGS="fortunes fortunes-min fortunes-de fortunes-it fortunes-es fortunes-br fortunes-eo
fortunes-pl fortunes-cs fortunes-bg fortunes-ru fortunes-ga fortunes-zh dataset-fashion-mnist"
# to build and run the tests (cmocka, sanitizers, a browser for the report, PyTorch peers):
TEST_PKGS="clang libclang-rt-14-dev libcmocka-dev openssl chromium procps python3-torch
python3-pil"
# packaging: manual pages, Debian build flags and tools, lintian, a clean root to install into
PKG_PKGS="help2man dpkg-dev lintian debootstrap systemd"

say() { printf '%s\n' "fedpeft setup: $*" >&2; }

missing_packages() {
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" ||
            printf '%s ' "$p"
    done
}

install_deps() {
    pkgs="$BUILD_PKGS $DEMO_PKGS"
    if [ "${1:-}" = "--package" ]; then
        pkgs="$pkgs $PKG_PKGS"
    fi
    if [ "${1:-}" = "--test" ]; then
        pkgs="$pkgs $TEST_PKGS $PKG_PKGS"
        # Node.js runs the reference tokenizers (npm test oracles); any node will do
        command -v node >/dev/null 2>&1 || pkgs="$pkgs nodejs"
        command -v npm >/dev/null 2>&1 || pkgs="$pkgs npm"
    fi
    # shellcheck disable=SC2086
    missing=$(missing_packages $pkgs)
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -eq 0 ]; then
        run_apt=""
    elif command -v sudo >/dev/null 2>&1; then
        run_apt="sudo"
    else
        say "missing Debian packages: $missing"
        say "run as root, or install them: apt-get install $missing"
        exit 1
    fi
    say "installing $missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if ! $run_apt apt-get install -y --no-install-recommends $missing >/dev/null; then
        say "refreshing the package lists and retrying"
        $run_apt apt-get update -q >/dev/null
        # shellcheck disable=SC2086
        $run_apt apt-get install -y --no-install-recommends $missing >/dev/null
    fi
}

build() {
    dir=$1
    shift
    top=$(cd "$(dirname "$0")/.." && pwd)
    say "building in $dir"
    cmake -S "$top" -B "$dir" -G Ninja "$@" >"$dir.cmake.log" 2>&1 ||
        { cat "$dir.cmake.log" >&2; exit 1; }
    rm -f "$dir.cmake.log"
    ninja -C "$dir" >/dev/null || ninja -C "$dir"
}

case "${1:-}" in
deps) shift; install_deps "$@" ;;
build) shift; build "$@" ;;
*) echo "usage: $0 deps [--test|--package] | build DIR [cmake options...]" >&2; exit 2 ;;
esac
