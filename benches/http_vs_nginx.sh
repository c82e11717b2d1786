#!/usr/bin/env bash
# The phones' HTTP front end against nginx, serving the same cached 4 MB file on loopback:
#
#   bash benches/http_vs_nginx.sh
#
# wrk (32 connections, 2 threads, BENCH_DURATION each run, default 10s) fetches one 4 MB
# firmware-sized file from branchtftp's HTTP front end (release build, the file pre-seeded with
# `branchtftp cache import`, so every request is a cache hit) and from nginx (`sendfile on`,
# a minimal config in a temporary directory). Runs are interleaved (A B, B A, ...) because the
# machine's load drifts; the script prints each run, the medians of requests/s and MiB/s, and
# the ratio branchtftp/nginx. Target: >= 0.7. Exit status 1 if the target is missed.
#
# Environment: BENCH_RUNS (default 3 per server), BENCH_DURATION (default 10s),
# BENCH_CONNECTIONS (default 32), BENCH_THREADS (default 2), BRANCHTFTP_BIN (default: build
# target/release/branchtftp), BENCH_SIZE_MB (default 4), BENCH_NGINX_EXTRA (directives added to
# nginx's http block, e.g. "sendfile_max_chunk 512k;" to try its tuning), BENCH_NGINX_SENDFILE
# (default on).
set -euo pipefail

RUNS="${BENCH_RUNS:-3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$here/lib.sh"

DURATION="${BENCH_DURATION:-10s}"
CONNECTIONS="${BENCH_CONNECTIONS:-32}"
THREADS="${BENCH_THREADS:-2}"
SIZE_MB="${BENCH_SIZE_MB:-4}"
TARGET=0.7

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# wrk and nginx are benchmark tools, not test dependencies: install them when missing.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    # The package starts a system nginx on :80 where there is an init system; ours is separate.
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

BIN="${BRANCHTFTP_BIN:-}"
if [ -z "$BIN" ]; then
    log "cargo build --release"
    (cd "$repo" && cargo build --release --quiet)
    BIN="${CARGO_TARGET_DIR:-$repo/target}/release/branchtftp"
fi

BENCH_TMP="$(mktemp -d /tmp/branchtftp-bench-http.XXXXXX)"
trap bench_cleanup EXIT
# nginx workers drop to `nobody` when started as root: let them read the files.
chmod 755 "$BENCH_TMP"
mkdir -p "$BENCH_TMP/www/firmware" "$BENCH_TMP/overrides" "$BENCH_TMP/nginx-temp"
NAME="firmware/sip88xx.14-2-1-0101-21.sbn"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom >"$BENCH_TMP/www/$NAME"
chmod -R a+rX "$BENCH_TMP/www"

free_tcp_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

wait_http() {
    local i
    for ((i = 0; i < 100; i++)); do
        if curl -s -o /dev/null --noproxy '*' -m 1 "$1"; then return 0; fi
        sleep 0.1
    done
    printf 'bench: nothing answers at %s\n' "$1" >&2
    return 1
}

# --- branchtftp ------------------------------------------------------------------------------
BT_PORT="$(free_tcp_port)"
ADMIN_PORT="$(free_tcp_port)"
cat >"$BENCH_TMP/branchtftp.yaml" <<EOF
log: info
tftp:
  listen: ["127.0.0.1:$(bench_free_udp_port)"]
http:
  listen: ["127.0.0.1:$BT_PORT"]
admin:
  listen: "127.0.0.1:$ADMIN_PORT"
cache:
  dir: $BENCH_TMP/cache
  overrides: $BENCH_TMP/overrides
upstreams:
  - url: http://127.0.0.1:9    # nothing listens: every request must be a cache hit
sync:
  prefetch: []
access:
  allow: ["127.0.0.0/8"]
  max_transfers: 4096
  max_per_client: 256          # wrk's 32 connections all come from 127.0.0.1
EOF
"$BIN" cache import "$BENCH_TMP/www" -c "$BENCH_TMP/branchtftp.yaml" >"$BENCH_TMP/import.log" 2>&1
bench_start "$BIN" serve -c "$BENCH_TMP/branchtftp.yaml"
BT_URL="http://127.0.0.1:$BT_PORT/$NAME"
wait_http "http://127.0.0.1:$ADMIN_PORT/healthz"

# --- nginx -----------------------------------------------------------------------------------
NG_PORT="$(free_tcp_port)"
cat >"$BENCH_TMP/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $BENCH_TMP/nginx.pid;
error_log $BENCH_TMP/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile ${BENCH_NGINX_SENDFILE:-on};
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path $BENCH_TMP/nginx-temp/body;
    proxy_temp_path $BENCH_TMP/nginx-temp/proxy;
    fastcgi_temp_path $BENCH_TMP/nginx-temp/fastcgi;
    uwsgi_temp_path $BENCH_TMP/nginx-temp/uwsgi;
    scgi_temp_path $BENCH_TMP/nginx-temp/scgi;
    ${BENCH_NGINX_EXTRA:-}
    server {
        listen 127.0.0.1:$NG_PORT ${BENCH_NGINX_LISTEN:-};
        root $BENCH_TMP/www;
    }
}
EOF
bench_start "$NGINX" -p "$BENCH_TMP" -e "$BENCH_TMP/nginx-error.log" -c "$BENCH_TMP/nginx.conf"
NG_URL="http://127.0.0.1:$NG_PORT/$NAME"
wait_http "$NG_URL" || { cat "$BENCH_TMP/nginx-error.log" "$BENCH_TMP"/server-1.log >&2; exit 1; }

# Both serve the very same bytes.
for url in "$BT_URL" "$NG_URL"; do
    curl -s --noproxy '*' -f -o "$BENCH_TMP/check" "$url"
    cmp -s "$BENCH_TMP/check" "$BENCH_TMP/www/$NAME" || {
        echo "bench: $url does not serve the file intact" >&2
        exit 1
    }
done

# --- runs ------------------------------------------------------------------------------------
# wrk's Transfer/sec ("1.23GB") in MiB/s.
to_mib() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "GB") ? 1024 : (u == "MB") ? 1 : (u == "KB") ? 1 / 1024 : 1 / 1048576
        printf "%.1f\n", n * f
    }'
}

declare -A REQS MIBS
REQS[branchtftp]=""; REQS[nginx]=""; MIBS[branchtftp]=""; MIBS[nginx]=""

run_wrk() { # LABEL URL
    local out rps tps
    out="$(wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" "$2" 2>&1)"
    if grep -q 'Non-2xx' <<<"$out"; then
        printf 'bench: %s answered errors:\n%s\n' "$1" "$out" >&2
        exit 1
    fi
    rps="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
    tps="$(to_mib "$(awk '/^Transfer\/sec:/ { print $2 }' <<<"$out")")"
    REQS[$1]+="$rps "
    MIBS[$1]+="$tps "
    printf '  %-10s %10s req/s %10s MiB/s%s\n' "$1" "$rps" "$tps" \
        "$(grep -q 'Socket errors' <<<"$out" && printf '  (%s)' "$(grep 'Socket errors' <<<"$out" | xargs)")" >&2
}

log "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, ${SIZE_MB} MiB file, $RUNS runs each, interleaved"
for ((i = 0; i < RUNS; i++)); do
    if ((i % 2 == 0)); then
        run_wrk branchtftp "$BT_URL"
        run_wrk nginx "$NG_URL"
    else
        run_wrk nginx "$NG_URL"
        run_wrk branchtftp "$BT_URL"
    fi
done

# shellcheck disable=SC2086
{
    bt_rps="$(bench_median ${REQS[branchtftp]})"
    ng_rps="$(bench_median ${REQS[nginx]})"
    bt_mib="$(bench_median ${MIBS[branchtftp]})"
    ng_mib="$(bench_median ${MIBS[nginx]})"
}
ratio="$(awk -v a="$bt_rps" -v b="$ng_rps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
bt_rss="$(bench_peak_rss_kb "${BENCH_PIDS[0]}" 2>/dev/null || echo '?')"

printf '\n| server | runs (req/s) | median req/s | median MiB/s |\n'
printf '| --- | --- | ---: | ---: |\n'
printf '| branchtftp %s (HTTP front, cache hit) | %s | %.1f | %.1f |\n' \
    "$("$BIN" --version 2>/dev/null | awk '{ print $2 }')" "${REQS[branchtftp]% }" "$bt_rps" "$bt_mib"
printf '| nginx %s (sendfile %s) | %s | %.1f | %.1f |\n' \
    "$("$NGINX" -v 2>&1 | sed 's|.*/||')" "${BENCH_NGINX_SENDFILE:-on}" "${REQS[nginx]% }" "$ng_rps" "$ng_mib"
printf '\nbranchtftp / nginx = %s (target >= %s); wrk -t%s -c%s -d%s, %s MiB file, median of %s interleaved runs each; branchtftp peak RSS %s KiB; %s, %s, %s cores\n' \
    "$ratio" "$TARGET" "$THREADS" "$CONNECTIONS" "$DURATION" "$SIZE_MB" "$RUNS" "$bt_rss" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(uname -r)" "$(nproc)"
awk -v r="$ratio" -v t="$TARGET" 'BEGIN { exit !(r >= t) }'
