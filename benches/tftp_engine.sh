#!/usr/bin/env bash
# Issue 2's benchmark: the TFTP engine against tftpd-hpa, same client, same 40 MB file, same
# directory, on loopback. Prints a Markdown table (medians of interleaved runs) and the targets:
#   - lock-step blksize 512 and 1428 (curl): branchtftp ≤ 1.0× tftpd-hpa's time
#   - blksize 1428 + windowsize 16 (atftp): ≥ 4× faster than lock-step 1428
#   - 200 concurrent downloads of a 4 MB file (curl): all intact, total time ≤ tftpd-hpa's,
#     branchtftp peak RSS ≤ 64 MB
#
#   bash benches/tftp_engine.sh            # BENCH_RUNS=7 for more runs
#   BENCH_QUICK=1 bash benches/tftp_engine.sh   # lock-step and window rows only (minutes, not 20)
# Needs: tftpd-hpa (in.tftpd), curl, atftp (tests/run.sh installs them). Not a CI test.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
source "$here/lib.sh"
trap bench_cleanup EXIT

cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
bin="${CARGO_TARGET_DIR:-$repo/target}/release/branchtftp"

BENCH_TMP="$(mktemp -d)"
chmod 755 "$BENCH_TMP"
root="$BENCH_TMP/root"
mkdir -p "$root"
head -c 40000000 /dev/urandom >"$root/big.bin"
head -c 4000000 /dev/urandom >"$root/four.bin"
chmod -R a+rX "$root"
big_sha="$(sha256sum <"$root/big.bin" | cut -d' ' -f1)"
four_sha="$(sha256sum <"$root/four.bin" | cut -d' ' -f1)"

bt_port="$(bench_free_udp_port)"
hpa_port="$(bench_free_udp_port)"
cat >"$BENCH_TMP/bt.yaml" <<YAML
log: warn
tftp:
  listen: ["127.0.0.1:$bt_port"]
  max_blksize: 1468
  max_windowsize: 64
http:
  listen: []
admin:
  listen: null
cache:
  dir: $BENCH_TMP/cache
  overrides: $root
access:
  allow: ["127.0.0.0/8"]
  max_transfers: 4096
  max_per_client: 1000
YAML
bench_start "$bin" serve -c "$BENCH_TMP/bt.yaml"
bt_pid="$BENCH_PID"
bench_start in.tftpd -L -a "127.0.0.1:$hpa_port" -s "$root" -u nobody
bench_wait_tftp 127.0.0.1 "$bt_port"
bench_wait_tftp 127.0.0.1 "$hpa_port"

out="$BENCH_TMP/out"
check() { [ "$(sha256sum <"$out" | cut -d' ' -f1)" = "$big_sha" ]; }
curl_get() { curl -s -m 120 "${@:3}" -o "$out" "tftp://127.0.0.1:$1/$2" && check; }

bench_compare "40 MB, lock-step blksize 512 (curl)" \
    branchtftp "curl_get $bt_port big.bin" \
    tftpd-hpa "curl_get $hpa_port big.bin"
bench_expect "lock-step 512: branchtftp ≤ 1.0× tftpd-hpa" "$BENCH_RATIO <= 1.0"

bench_compare "40 MB, lock-step blksize 1428 (curl)" \
    branchtftp "curl_get $bt_port big.bin --tftp-blksize 1428" \
    tftpd-hpa "curl_get $hpa_port big.bin --tftp-blksize 1428"
bench_expect "lock-step 1428: branchtftp ≤ 1.0× tftpd-hpa" "$BENCH_RATIO <= 1.0"

atftp_get() {
    rm -f "$out"
    atftp -g -r big.bin -l "$out" --option "blksize 1428" "$@" 127.0.0.1 "$bt_port" >/dev/null 2>&1 && check
}
bench_compare "40 MB from branchtftp, atftp blksize 1428" \
    "windowsize 16" "atftp_get --option 'windowsize 16'" \
    "lock-step" "atftp_get"
bench_expect "windowsize 16 ≥ 4× faster than lock-step 1428" "$BENCH_RATIO <= 0.25"

if [ -n "${BENCH_QUICK:-}" ]; then
    bench_report
    exit 0
fi

# 200 clients at once, each a real curl process; every copy is checked.
many() {
    local port="$1" i failed=0
    local -a pids=()
    for ((i = 0; i < 200; i++)); do
        curl -s -m 300 -o "$BENCH_TMP/many-$i" "tftp://127.0.0.1:$port/four.bin" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || failed=1; done
    for ((i = 0; i < 200; i++)); do
        [ "$(sha256sum <"$BENCH_TMP/many-$i" | cut -d' ' -f1)" = "$four_sha" ] || failed=1
    done
    rm -f "$BENCH_TMP"/many-*
    return "$failed"
}
bench_compare "200 concurrent 4 MB downloads (curl, blksize 512)" \
    branchtftp "many $bt_port" \
    tftpd-hpa "many $hpa_port"
bench_expect "200 concurrent: branchtftp total ≤ tftpd-hpa's" "$BENCH_RATIO <= 1.0"
rss_kb="$(bench_peak_rss_kb "$bt_pid")"
bench_row "branchtftp peak RSS over the whole run (MB)" "branchtftp" \
    "$(awk -v k="$rss_kb" 'BEGIN { printf "%.1f", k / 1024 }')" "target" "64" "-"
bench_expect "branchtftp peak RSS ≤ 64 MB" "$rss_kb <= 65536"

bench_report
