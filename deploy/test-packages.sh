#!/bin/sh
# deploy/test-packages.sh — build the Debian packages and check them as an operator meets them:
#   1. lintian: no errors and no warnings;
#   2. a fresh Debian 12 root (debootstrap, minbase; kept in out/pkg-root/ between runs unless
#      FEDPEFT_FRESH_ROOT=1) gets systemd, man-db and the two packages through apt;
#   3. there: the service user and state directories exist, --version runs, both units pass
#      `systemd-analyze verify` and rate an exposure of 2.0 or lower;
#   4. deploy/README.md's steps: a CA, the coordinator's certificate, a site kit, installed with
#      the guide's owners and modes; both daemons pass --check-config as the fedpeft user, and
#      run one federated round there (demo model, 3 local steps) that the coordinator stores.
# Needs root (debootstrap, chroot) and Debian's package archive.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
say() { printf '%s\n' "== $*"; }
fail() { printf '%s\n' "test-packages: FAILED: $*" >&2; exit 1; }

say "packages"
./deploy/package.sh build-pkg >/dev/null
server_deb=$(ls build-pkg/fedpeft-server_*.deb)
client_deb=$(ls build-pkg/fedpeft-client_*.deb)

say "lintian"
lintian --tag-display-limit 0 --fail-on error,warning "$server_deb" "$client_deb" 2>&1 |
    grep -v 'running with root privileges' || true
lintian --tag-display-limit 0 --fail-on error,warning "$server_deb" "$client_deb" \
    >/dev/null 2>&1 || fail "lintian reports errors or warnings"

root=$top/out/pkg-root
mirror=${FEDPEFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ "${FEDPEFT_FRESH_ROOT:-0}" = 1 ] || [ ! -x "$root/usr/bin/apt-get" ] ||
    [ ! -e "$root/.fedpeft-base" ]; then
    say "a fresh Debian 12 root ($root)"
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 ||
        { tail -20 "$root.log" >&2; fail "debootstrap"; }
    chroot "$root" apt-get update -q >>"$root.log" 2>&1 || fail "apt-get update in the root"
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends systemd man-db procps >>"$root.log" 2>&1 ||
        fail "systemd in the root"
    touch "$root/.fedpeft-base"
    # what follows changes the root: keep a pristine copy of it to start from next time
    rm -rf "$root.base"
    cp -a "$root" "$root.base"
else
    say "a clean Debian 12 root (reset from $root.base)"
    rm -rf "$root"
    cp -a "$root.base" "$root"
fi
run() { chroot "$root" "$@"; }
as_fedpeft() { chroot --userspec=fedpeft:fedpeft "$root" "$@"; }

say "apt install the packages"
cp "$server_deb" "$client_deb" "$root/tmp/"
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "/tmp/$(basename "$server_deb")" "/tmp/$(basename "$client_deb")" >"$root.install.log" 2>&1 ||
    { tail -20 "$root.install.log" >&2; fail "apt-get install"; }
run getent passwd fedpeft >/dev/null || fail "no fedpeft user"
for d in /var/lib/fedpeft-server /var/lib/fedpeft-client; do
    [ "$(run stat -c '%U %a' "$d")" = "fedpeft 700" ] || fail "$d is not fedpeft's, mode 700"
done
for p in fedpeft-server fedpeft-client fedpeft; do
    run "$p" --version || fail "$p --version"
done
run man -w fedpeft-server fedpeft-client fedpeft >/dev/null || fail "manual pages"

say "systemd units"
for u in fedpeft-server fedpeft-client; do
    run systemd-analyze verify "/lib/systemd/system/$u.service" || fail "$u.service: verify"
    run systemd-analyze security --offline=true --threshold=20 \
        "/lib/systemd/system/$u.service" | tail -1
    run systemd-analyze security --offline=true --threshold=20 \
        "/lib/systemd/system/$u.service" >/dev/null || fail "$u.service: exposure above 2.0"
done

say "the operator's guide: CA, coordinator, site kit"
run fedpeft ca init --dir /root/pki --name "Package Test" >/dev/null
run fedpeft ca issue --dir /root/pki --server localhost,127.0.0.1 >/dev/null
run fedpeft ca issue --dir /root/pki --site st-marys --coordinator 127.0.0.1:7443 >/dev/null
run install -d -m 0750 -g fedpeft /etc/fedpeft/pki
run install -m 0644 /root/pki/servers/localhost/server.crt /root/pki/ca.crt /root/pki/ca.crl \
    /etc/fedpeft/pki/
run install -m 0640 -g fedpeft /root/pki/servers/localhost/server.key /etc/fedpeft/pki/
run install -d -m 0750 -g fedpeft /etc/fedpeft/kit
run install -m 0644 /root/pki/sites/st-marys/site.crt /root/pki/sites/st-marys/ca.crt \
    /etc/fedpeft/kit/
run install -m 0640 -g fedpeft /root/pki/sites/st-marys/site.key /etc/fedpeft/kit/
run install -m 0644 /root/pki/sites/st-marys/fedpeft-client.ini /etc/fedpeft/fedpeft-client.ini
# the base model and the site's data, readable by the fedpeft user
mkdir -p "$root/srv/fedpeft/model" "$root/srv/fedpeft/data"
cp models/demo/config.json models/demo/model.safetensors models/demo/tokenizer.json \
    "$root/srv/fedpeft/model/"
awk 'BEGIN { RS = "%\n" } NR <= 200 { gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); gsub(/\t/, " ");
     gsub(/\n/, "\\n"); print "{\"text\": \"" $0 "\"}" }' /usr/share/games/fortunes/medicine \
    >"$root/srv/fedpeft/data/train.jsonl"
sha=$(run fedpeft model-id /srv/fedpeft/model)
conf=$root/etc/fedpeft/fedpeft-server.ini
sed -i -e "s|^base_model_config = .*|base_model_config = /srv/fedpeft/model/config.json|" \
    -e "s|^base_model_sha256 = .*|base_model_sha256 = $sha|" \
    -e "s|^listen = .*|listen = 127.0.0.1:7443|" "$conf"

say "--check-config as the fedpeft user"
as_fedpeft fedpeft-server --check-config --config /etc/fedpeft/fedpeft-server.ini >/dev/null ||
    fail "fedpeft-server --check-config"
as_fedpeft fedpeft-client --check-config --config /etc/fedpeft/fedpeft-client.ini >/dev/null ||
    fail "fedpeft-client --check-config"

say "one federated round in the clean root"
log=$root.round.log
: >"$log"
# chroot itself in the background (not a function: $! must be the daemon, which chroot execs)
chroot --userspec=fedpeft:fedpeft "$root" fedpeft-server \
    --config /etc/fedpeft/fedpeft-server.ini --set server.metrics= \
    --set server.exit_when_done=true --set federation.rounds=1 --set federation.min_sites=1 \
    --set federation.min_updates=1 --set train.steps=3 --set train.seq_len=64 >>"$log" 2>&1 &
server=$!
chroot --userspec=fedpeft:fedpeft "$root" fedpeft-client \
    --config /etc/fedpeft/fedpeft-client.ini \
    --set network.backoff_initial_s=0.2 --set network.backoff_max_s=1 --set train.threads=1 \
    >>"$log" 2>&1 &
client=$!
trap 'kill $server $client 2>/dev/null || true' EXIT
i=0
while kill -0 "$server" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -le 1200 ] || { cat "$log" >&2; fail "the round did not finish in 120 s"; }
    sleep 0.1
done
wait "$server" || { cat "$log" >&2; fail "fedpeft-server exited with an error"; }
kill "$client" 2>/dev/null || true
wait "$client" 2>/dev/null || true
if pgrep -f "fedpeft-client --config /etc/fedpeft/fedpeft-client.ini" >/dev/null; then
    fail "the site daemon did not stop on SIGTERM"
fi
trap - EXIT
run fedpeft status --state-dir /var/lib/fedpeft-server --json >"$root.status.json"
grep -q '"state": *"closed"' "$root.status.json" || { cat "$log" >&2; fail "no closed round"; }
grep -q 'round 1: update stored by the coordinator' "$log" || fail "the site's update was not stored"
echo "test-packages: all checks passed"
