#!/bin/sh
# deploy/package.sh [DIR] — build the Debian packages fedpeft-server and fedpeft-client in DIR
# (default build-pkg): a release build with Debian's hardening flags (dpkg-buildflags), the
# manual pages, then CPack. Prints the paths of the two .deb files.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
dir=${1:-build-pkg}
./deploy/setup.sh deps --package
export DEB_BUILD_MAINT_OPTIONS=hardening=+all
cflags="$(dpkg-buildflags --get CPPFLAGS) $(dpkg-buildflags --get CFLAGS)"
ldflags=$(dpkg-buildflags --get LDFLAGS)
./deploy/setup.sh build "$dir" -DCMAKE_BUILD_TYPE=Release -DFP_TESTS=OFF \
    -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_C_FLAGS="$cflags" -DCMAKE_EXE_LINKER_FLAGS="$ldflags"
rm -f "$dir"/*.deb
(cd "$dir" && cpack -G DEB >cpack.log 2>&1) || { cat "$dir/cpack.log" >&2; exit 1; }
ls "$dir"/fedpeft-server_*.deb "$dir"/fedpeft-client_*.deb
