#!/bin/bash
# End-to-end test of the Debian package, as a branch admin would meet it:
#   systemd hardening score of deploy/branchtftp.service (exposure <= 1.5),
#   build the .deb (packaging/build-deb.sh), lintian without errors,
#   dpkg -i: files, conffile, user, cache owner, man page; check-config on the packaged config,
#   the sysctl.d file raising net.core.rmem_max for the listeners (applied by postinst, and
#   the server's warning when the cap is low),
#   the installed binary served as the branchtftp user on unprivileged ports: a file put in the
#   overrides directory downloaded with tftp-hpa,
#   upgrade to a newer version keeps an edited conffile and the cache,
#   dpkg -r keeps config, cache and user; dpkg --purge removes all of them.
#
# Needs root (it installs and purges the package on this machine). Installs what it needs with
# apt-get when missing: lintian, tftp-hpa, systemd (systemd-analyze), adduser.
# Environment: DEB=path  test this .deb instead of building one (the upgrade step still builds).
# Exits non-zero on any failure; ends with "N passed, N failed".
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PASSED=0
FAILED=0
SKIPPED=0
WORK=$(mktemp -d /tmp/branchtftp-packaging.XXXXXX)
chmod 755 "$WORK"
SERVE_PID=

ok() { PASSED=$((PASSED + 1)); echo "ok   - $*"; }
bad() { FAILED=$((FAILED + 1)); echo "FAIL - $*"; }
skip() { SKIPPED=$((SKIPPED + 1)); echo "skip - $*"; }
# check DESCRIPTION COMMAND...: runs the command, records ok/FAIL with its output on failure.
check() {
    local what=$1
    shift
    local out
    if out=$("$@" 2>&1); then
        ok "$what"
    else
        bad "$what"
        printf '%s\n' "$out" | sed 's/^/       /' | tail -20
    fi
}
# The checks after a failed install make no sense: stop there.
fatal() {
    bad "$*"
    finish
}
finish() {
    echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
    [ "$FAILED" -eq 0 ]
    exit $?
}
# The kernel's receive buffer cap as found; the test lowers it to Debian's default to see the
# package raise it, and puts it back at the end.
RMEM_MAX0=$(cat /proc/sys/net/core/rmem_max)
STOCK_RMEM_MAX=212992
cleanup() {
    if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null; wait "$SERVE_PID" 2>/dev/null; fi
    sysctl -qw net.core.rmem_max="$RMEM_MAX0" 2>/dev/null
    if dpkg-query -W -f='${Status}' branchtftp 2>/dev/null | grep -q installed; then
        dpkg --purge branchtftp >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/packaging.sh: run as root (it installs and purges the package)" >&2
    exit 2
fi
if dpkg-query -W -f='${Status}' branchtftp 2>/dev/null | grep -q 'ok installed'; then
    if [ "${BRANCHTFTP_TEST_PURGE:-}" != 1 ]; then
        echo "tests/packaging.sh: branchtftp is installed on this machine; this test purges it." >&2
        echo "Purge it first, or set BRANCHTFTP_TEST_PURGE=1." >&2
        exit 2
    fi
    dpkg --purge branchtftp >/dev/null
fi

# --- tools ---
need=()
command -v lintian >/dev/null || need+=(lintian)
command -v tftp >/dev/null || need+=(tftp-hpa)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v adduser >/dev/null || need+=(adduser)
command -v setpriv >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
        { echo "apt-get install ${need[*]} failed" >&2; exit 2; }
fi

# --- systemd hardening ---
exposure=$(systemd-analyze security --offline=true deploy/branchtftp.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for branchtftp.service: \([0-9.]*\).*/\1/p')
if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 1.5) }'; then
    ok "systemd-analyze security --offline=true deploy/branchtftp.service: exposure $exposure <= 1.5"
else
    bad "systemd-analyze security exposure '${exposure:-?}' is not <= 1.5"
fi
check "systemd-analyze verify accepts the unit (binary aside)" \
    sh -c "systemd-analyze verify deploy/branchtftp.service 2>&1 |
           grep -v -e 'is not executable' -e 'man branchtftp' -e '^\$' | { ! grep .; }"

# --- build and lint ---
if [ -n "${DEB:-}" ]; then
    deb=$DEB
else
    packaging/build-deb.sh >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fatal "packaging/build-deb.sh"; }
    deb=$(ls -t target/debian/branchtftp_*.deb | grep -v '+upgradetest' | head -1)
fi
[ -f "$deb" ] || fatal "no .deb found ($deb)"
ok "built $deb"
version=$(dpkg-deb -f "$deb" Version)

lintian --tag-display-limit 0 "$deb" >"$WORK/lintian.txt" 2>&1
if grep -q '^E:' "$WORK/lintian.txt"; then
    bad "lintian reports errors"
    grep '^E:' "$WORK/lintian.txt" | sed 's/^/       /'
else
    ok "lintian: no errors ($(grep -c '^W:' "$WORK/lintian.txt") warnings)"
fi
grep '^W:' "$WORK/lintian.txt" | sed 's/^/       /'

# --- install ---
# Install on a kernel with Debian's default cap, if this machine lets us set it (a container may
# not): the package must raise it.
RMEM_SETTABLE=
if sysctl -qw net.core.rmem_max=$STOCK_RMEM_MAX 2>/dev/null; then RMEM_SETTABLE=1; fi
dpkg -i "$deb" >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; fatal "dpkg -i $deb"; }
ok "dpkg -i $deb ($version)"
check "/usr/lib/sysctl.d/60-branchtftp.conf installed, raising net.core.rmem_max to 4 MiB" \
    grep -qx 'net.core.rmem_max = 4194304' /usr/lib/sysctl.d/60-branchtftp.conf
if [ -n "$RMEM_SETTABLE" ]; then
    check "postinst applied it: net.core.rmem_max $STOCK_RMEM_MAX -> 4194304" \
        sh -c '[ "$(cat /proc/sys/net/core/rmem_max)" -ge 4194304 ]'
else
    skip "postinst applies the sysctl: net.core.rmem_max cannot be set on this machine"
fi
check "/usr/bin/branchtftp is installed and runs" /usr/bin/branchtftp --version
check "/etc/branchtftp/branchtftp.yaml is a conffile" \
    sh -c "dpkg-query -W -f='\${Conffiles}' branchtftp | grep -q '/etc/branchtftp/branchtftp.yaml '"
check "/etc/branchtftp/overrides/ exists" test -d /etc/branchtftp/overrides
check "system user branchtftp exists" sh -c 'getent passwd branchtftp | grep -q ":/var/lib/branchtftp:"'
check "/var/lib/branchtftp belongs to branchtftp" \
    sh -c '[ "$(stat -c %U:%G /var/lib/branchtftp)" = branchtftp:branchtftp ]'
check "systemd unit installed" sh -c 'ls /lib/systemd/system/branchtftp.service /usr/lib/systemd/system/branchtftp.service 2>/dev/null | grep -q .'
check "unit enabled (multi-user.target.wants)" test -L /etc/systemd/system/multi-user.target.wants/branchtftp.service
check "man page branchtftp.1.gz installed and renders" \
    sh -c 'zcat /usr/share/man/man1/branchtftp.1.gz | grep -q "^\.TH branchtftp 1"'
check "example configs installed" test -f /usr/share/doc/branchtftp/examples/regional-tier.yaml
check "branchtftp check-config passes on the packaged /etc/branchtftp/branchtftp.yaml" \
    env -u BRANCHTFTP_CONFIG /usr/bin/branchtftp check-config
check "branchtftp check-config -c /etc/branchtftp/branchtftp.yaml as the branchtftp user" \
    setpriv --reuid=branchtftp --regid=branchtftp --init-groups \
    /usr/bin/branchtftp check-config -c /etc/branchtftp/branchtftp.yaml

# --- serve as the branchtftp user on unprivileged ports ---
if /usr/bin/branchtftp serve --help >/dev/null 2>&1; then
    cfg=$WORK/branchtftp.yaml
    # The packaged config with ports above 1024 on loopback and no upstreams (loopback only).
    sed -e 's|^  listen: \["0.0.0.0:69", "\[::\]:69"\]|  listen: ["127.0.0.1:16969"]|' \
        -e 's|^  listen: \["0.0.0.0:6970"\]|  listen: ["127.0.0.1:16970"]|' \
        -e 's|^  listen: "127.0.0.1:9069"|  listen: "127.0.0.1:19069"|' \
        -e '/^upstreams:/,/^$/d' \
        /etc/branchtftp/branchtftp.yaml >"$cfg"
    echo "upstreams: []" >>"$cfg"
    chmod 644 "$cfg"
    if [ "$(grep -cE '127\.0\.0\.1:1(6969|6970|9069)' "$cfg")" -ne 3 ]; then
        bad "could not move the packaged config to unprivileged ports"
    fi
    check "check-config on the test copy" /usr/bin/branchtftp check-config -c "$cfg"
    payload="<device><loadInformation>SIP88xx.14-2-1-0101-15</loadInformation></device>"
    printf '%s\r\n' "$payload" >/etc/branchtftp/overrides/SEP001122AABBCC.cnf.xml
    chmod 644 /etc/branchtftp/overrides/SEP001122AABBCC.cnf.xml
    BRANCHTFTP_CONFIG=$cfg setpriv --reuid=branchtftp --regid=branchtftp --init-groups \
        /usr/bin/branchtftp serve >"$WORK/serve.log" 2>&1 &
    SERVE_PID=$!
    got=
    for _ in $(seq 1 50); do
        rm -f "$WORK/got"
        (cd "$WORK" && timeout 5 tftp 127.0.0.1 16969 -m binary -c get SEP001122AABBCC.cnf.xml got) >/dev/null 2>&1
        if cmp -s "$WORK/got" /etc/branchtftp/overrides/SEP001122AABBCC.cnf.xml; then got=1; break; fi
        kill -0 "$SERVE_PID" 2>/dev/null || break
        sleep 0.2
    done
    if [ -n "$got" ]; then
        ok "tftp-hpa downloaded an overrides file from the installed binary (127.0.0.1:16969)"
    else
        bad "tftp-hpa download of SEP001122AABBCC.cnf.xml from the installed binary"
        sed 's/^/       /' "$WORK/serve.log" | tail -20
    fi
    check "no receive-buffer warning with the package's sysctl applied" \
        sh -c "! grep -q 'net.core.rmem_max caps it' '$WORK/serve.log'"
    check "the server runs as the branchtftp user" \
        sh -c "[ \"\$(ps -o user= -p $SERVE_PID)\" = branchtftp ]"
    rm -f "$WORK/got2"
    (cd "$WORK" && timeout 5 tftp 127.0.0.1 16969 -m binary -c get sep001122aabbcc.CNF.XML got2) >/dev/null 2>&1
    check "the name matches regardless of letter case" cmp -s "$WORK/got2" "$WORK/got"
    kill -TERM "$SERVE_PID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$SERVE_PID" 2>/dev/null; then
        bad "serve did not exit within 10s of SIGTERM"
        kill -KILL "$SERVE_PID"
        wait "$SERVE_PID" 2>/dev/null
    else
        wait "$SERVE_PID"
        rc=$?
        if [ "$rc" -eq 0 ]; then ok "serve exits 0 on SIGTERM"; else bad "serve exited $rc on SIGTERM"; fi
    fi
    SERVE_PID=
    if [ -n "$RMEM_SETTABLE" ]; then
        # Without the sysctl (Debian's default cap) the server says so when it starts.
        sysctl -qw net.core.rmem_max=$STOCK_RMEM_MAX
        BRANCHTFTP_CONFIG=$cfg timeout -s TERM 3 setpriv --reuid=branchtftp --regid=branchtftp \
            --init-groups /usr/bin/branchtftp serve >"$WORK/serve-lowcap.log" 2>&1
        check "with net.core.rmem_max at $STOCK_RMEM_MAX the server warns that it caps the listener" \
            grep -q 'TFTP listen 127.0.0.1:16969: receive buffer 208 KiB, not the 4096 KiB asked (net.core.rmem_max caps it)' \
            "$WORK/serve-lowcap.log"
        sysctl -qw net.core.rmem_max=4194304
    fi
else
    skip "serve as the branchtftp user and download with tftp: 'branchtftp serve' not in this build"
fi

# --- upgrade keeps an edited conffile and the cache ---
sed -i 's/^  max_per_client: 16$/  max_per_client: 8   # edited by the packaging test/' /etc/branchtftp/branchtftp.yaml
echo marker >/var/lib/branchtftp/upgrade-marker
packaging/build-deb.sh --deb-version "${version}+upgradetest" \
    -o "$WORK/branchtftp_upgrade.deb" >"$WORK/build2.log" 2>&1 ||
    { tail -20 "$WORK/build2.log"; fatal "build of the upgrade .deb"; }
if dpkg -i --force-confold "$WORK/branchtftp_upgrade.deb" >"$WORK/upgrade.log" 2>&1; then
    ok "upgrade $version -> ${version}+upgradetest with dpkg -i"
else
    cat "$WORK/upgrade.log"
    bad "upgrade with dpkg -i"
fi
check "upgrade kept the edited conffile" grep -q 'max_per_client: 8   # edited by the packaging test' /etc/branchtftp/branchtftp.yaml
check "upgrade left no .dpkg-new/.dpkg-dist beside it" sh -c '! ls /etc/branchtftp/*.dpkg-* 2>/dev/null | grep -q .'
check "upgrade kept the cache" test -f /var/lib/branchtftp/upgrade-marker
check "check-config passes on the edited conffile" /usr/bin/branchtftp check-config

# --- remove keeps config, cache and user; purge removes them ---
check "dpkg -r branchtftp" dpkg -r branchtftp
check "after remove: binary gone" test ! -e /usr/bin/branchtftp
check "after remove: sysctl.d file gone" test ! -e /usr/lib/sysctl.d/60-branchtftp.conf
check "after remove: conffile, cache and user kept" \
    sh -c 'test -f /etc/branchtftp/branchtftp.yaml && test -f /var/lib/branchtftp/upgrade-marker && getent passwd branchtftp >/dev/null'
check "dpkg --purge branchtftp" dpkg --purge branchtftp
check "after purge: /etc/branchtftp gone" test ! -e /etc/branchtftp
check "after purge: /var/lib/branchtftp gone" test ! -e /var/lib/branchtftp
check "after purge: user and group branchtftp gone" \
    sh -c '! getent passwd branchtftp && ! getent group branchtftp'
check "after purge: dpkg forgot the package" sh -c '! dpkg-query -W branchtftp 2>/dev/null'

finish
