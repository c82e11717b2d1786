#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's box:
#
#   bash tests/run.sh [extra args for the test runner, e.g. a test name filter]
#
# 1. Installs the real TFTP peers the interop tests talk to (tftpd-hpa, tftp-hpa, atftp,
#    busybox, curl) and Prometheus (promtool, for tests/fleet.rs) when one is missing: `apt-get update` once, then `apt-get install`.
#    Reruns skip this, so they are fast.
# 2. Unpacks atftpd (the packaged server that speaks windowsize; apt cannot install it next to
#    tftpd-hpa) into target/peers/atftpd and exports ATFTPD for the tests.
# 3. Runs every test target in release mode (the 40 MB transfers and the 100-client tests need
#    it), with cargo-nextest when installed. Exits non-zero on any failure.
#
# Environment: BRANCHTFTP_NEXTEST=0 forces plain `cargo test`; CARGO_TARGET_DIR is honoured.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

log() { printf '==> %s\n' "$*" >&2; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        log "need root (or sudo) to run: $*"
        return 1
    fi
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq
        apt_updated=1
    fi
}

# --- 1. real peers ----------------------------------------------------------------------------
missing=()
command -v in.tftpd >/dev/null || missing+=(tftpd-hpa)
command -v tftp >/dev/null || missing+=(tftp-hpa)
command -v atftp >/dev/null || missing+=(atftp)
command -v busybox >/dev/null || missing+=(busybox)
command -v curl >/dev/null || missing+=(curl)
# promtool and the server itself, for the fleet tests (tests/fleet.rs).
command -v promtool >/dev/null || missing+=(prometheus)
# ip(8), for the admin test's network namespace (tests/admin_auth.rs).
command -v ip >/dev/null || missing+=(iproute2)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    log "installing ${missing[*]}"
    # Install the full set in one go: it is what peers.md documents and CI expects.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        tftpd-hpa tftp-hpa atftp busybox curl prometheus iproute2 >/dev/null
fi

# --- 2. atftpd, unpacked (not installed) ------------------------------------------------------
peers="$target_dir/peers"
atftpd="$peers/atftpd/usr/sbin/atftpd"
if [ ! -x "$atftpd" ]; then
    log "unpacking atftpd into $peers/atftpd"
    mkdir -p "$peers"
    work="$(mktemp -d)"
    chmod 755 "$work" # apt-get download runs as _apt when it can
    if ! (cd "$work" && apt-get download atftpd >/dev/null 2>&1); then
        apt_update_once
        (cd "$work" && apt-get download atftpd >/dev/null)
    fi
    rm -rf "$peers/atftpd"
    dpkg -x "$work"/atftpd_*.deb "$peers/atftpd"
    rm -rf "$work"
fi
export ATFTPD="$atftpd"
# A missing peer fails the tests here instead of skipping them.
export BRANCHTFTP_REQUIRE_PEERS=1

# --- 3. the suite -----------------------------------------------------------------------------
if [ "${BRANCHTFTP_NEXTEST:-1}" != 0 ] && cargo nextest --version >/dev/null 2>&1; then
    log "cargo nextest run --release --lib --bins --tests"
    cargo nextest run --release --lib --bins --tests --no-fail-fast "$@"
else
    log "cargo test --release --lib --bins --tests"
    cargo test --release --lib --bins --tests --no-fail-fast "$@"
fi

# --- packaging checks (tests/packaging.sh, written separately) --------------------------------
# >>> packaging hook: builds the .deb and checks it; runs only once the script exists.
if [ -f "$repo/tests/packaging.sh" ]; then
    log "tests/packaging.sh"
    bash "$repo/tests/packaging.sh"
fi
# <<< packaging hook

log "all tests passed"
