#!/bin/sh
# deploy/clean-root.sh COMMAND... — run commands as a new user would: in a fresh clone of this
# repository's last commit, inside a pristine Debian 12 root (debootstrap minbase: no compiler,
# no libraries, none of the packages this project installs). Each COMMAND is one shell command
# line, run in the clone's top directory, in order; the first that fails fails the script.
#
# CI runs the README's two Quick start commands this way (.ci/run), so that a missing install
# step fails CI instead of a newcomer's first command. Needs root (debootstrap, chroot, mount)
# and Debian's package archive. The root lives in out/clean-root (removed at the end unless
# FEDPEFT_KEEP_ROOT=1); the minbase bootstrap is cached in out/debian12-minbase.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ "$#" -ge 1 ] || { echo "usage: $0 COMMAND..." >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "clean-root: needs root (debootstrap, chroot, mount)" >&2; exit 1; }
say() { printf '%s\n' "== clean root: $*"; }
mirror=${FEDPEFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=$top/out/debian12-minbase
root=$top/out/clean-root

if [ ! -e "$base/.fedpeft-minbase" ]; then
    say "debootstrap minbase bookworm"
    rm -rf "$base"
    mkdir -p "$top/out"
    debootstrap --variant=minbase bookworm "$base" "$mirror" >"$base.log" 2>&1 ||
        { tail -20 "$base.log" >&2; echo "clean-root: debootstrap failed" >&2; exit 1; }
    touch "$base/.fedpeft-minbase"
fi
rm -rf "$root"
cp -a "$base" "$root"
rm -f "$root/.fedpeft-minbase"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true

say "a fresh clone of $(git rev-parse --short HEAD)"
git clone --quiet --no-local "$top" "$root/root/fedpeft"

# The commands run in a mount namespace of their own: /proc, /sys, /dev/shm and /dev/pts of the
# root vanish with it, so nothing of the host can be reached through the root afterwards.
cat >"$root/root/run-commands.sh" <<'EOF'
#!/bin/sh
set -eu
cd /root/fedpeft
for c in "$@"; do
    printf '%s\n' "== clean root: \$ $c"
    start=$(date +%s)
    sh -c "$c" || { printf '%s\n' "== clean root: FAILED: $c" >&2; exit 1; }
    printf '%s\n' "== clean root: done in $(( $(date +%s) - start )) s: $c"
done
EOF
chmod +x "$root/root/run-commands.sh"
# The network's own settings pass into the root (a new user's machine on this network has
# them): proxies, and the extra CA certificates a TLS-intercepting proxy needs (npm fetches the
# test oracles over https). Nothing else of the host does.
netenv=""
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    eval "val=\${$v:-}"
    [ -n "$val" ] && netenv="$netenv $v=$val"
done
if [ -n "${NODE_EXTRA_CA_CERTS:-}" ] && [ -r "$NODE_EXTRA_CA_CERTS" ]; then
    mkdir -p "$root/etc/ssl"
    cp "$NODE_EXTRA_CA_CERTS" "$root/etc/ssl/network-ca.crt"
    netenv="$netenv NODE_EXTRA_CA_CERTS=/etc/ssl/network-ca.crt"
fi
status=0
unshare --mount --propagation private sh -c '
    set -eu
    root=$1
    mount -t proc proc "$root/proc"
    mount -t sysfs -o ro sysfs "$root/sys"
    mkdir -p "$root/dev/shm" "$root/dev/pts"
    mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts" 2>/dev/null || true
    netenv=$2
    shift 2
    # shellcheck disable=SC2086
    exec chroot "$root" env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 TERM=dumb $netenv /root/run-commands.sh "$@"
' clean-root "$root" "$netenv" "$@" || status=$?

if [ "${FEDPEFT_KEEP_ROOT:-0}" != 1 ]; then
    # the namespace and its mounts are gone; refuse to delete through a mount all the same
    if grep -q " $root/" /proc/mounts; then
        echo "clean-root: $root still has mounts; not removing it" >&2
    else
        rm -rf "$root"
    fi
fi
[ "$status" -eq 0 ] && say "all commands passed" || say "FAILED (status $status)"
exit "$status"
