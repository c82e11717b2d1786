#!/usr/bin/env bash
# The phones' HTTP front end against nginx on the same cached files, loopback (issue 12):
#
#   bash benches/http_vs_nginx.sh
#
# A matrix of {1.5 KB config, 50 KB locale file} x {1, 32, 1000 keep-alive connections}: wrk
# fetches one file over and over from branchtftp's HTTP front end (release build, files
# pre-seeded with `branchtftp cache import`, so every request is a cache hit) and from nginx
# 1.22 (2 worker processes, `sendfile on`, access log off). Per cell, runs are interleaved
# (A B, B A, ...) because the machine's load drifts; the script prints every run, then a table
# of median requests/s and p99 latency per server and the ratio branchtftp/nginx of
# requests/s against the target (>= 0.7 in every cell). Exit status 1 if a cell misses it.
#
# Same conditions for both: each server gets the machine's defaults (branchtftp: the
# product's tokio runtime, one worker per core; nginx: 2 workers, as on a 2-core box), and wrk
# (2 threads) runs on the same cores as the server it loads, so on a 2-core machine the
# figures measure server+client together; compare the ratios, not the absolute figures.
# `wrk -c1` also shows a per-request stall on keep-alive connections (a missing TCP_NODELAY
# gives ~25 req/s: every response waits for the client's delayed ACK).
#
# Environment: BENCH_RUNS (default 3 runs per server and cell), BENCH_DURATION (default 5s),
# BENCH_CONNECTIONS (default "1 32 1000"), BENCH_FILES (default "config locale"; "firmware" adds
# a 4 MB image), BENCH_THREADS (wrk threads, default 2), BRANCHTFTP_BIN (default: build
# target/release/branchtftp), BENCH_NGINX_EXTRA (directives added to nginx's http block),
# BENCH_NGINX_SENDFILE (default on).
# Needs wrk and nginx (Debian: `apt-get install -y wrk nginx-light`; installed here when missing).
set -euo pipefail

RUNS="${BENCH_RUNS:-3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$here/lib.sh"

DURATION="${BENCH_DURATION:-5s}"
CONNECTIONS="${BENCH_CONNECTIONS:-1 32 1000}"
FILES="${BENCH_FILES:-config locale}"
THREADS="${BENCH_THREADS:-2}"
TARGET=0.7

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# wrk and nginx are benchmark tools, not test dependencies: install them when missing.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    # The package starts a system nginx on :80 where there is an init system; ours is separate.
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
# 1,000 connections on each side of loopback, for both servers and wrk.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

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
mkdir -p "$BENCH_TMP/www/English_United_States" "$BENCH_TMP/www/firmware" \
    "$BENCH_TMP/overrides" "$BENCH_TMP/nginx-temp"
declare -A PATHS=(
    [config]="SEP001122AABBCC.cnf.xml"
    [locale]="English_United_States/be-sip.jar"
    [firmware]="firmware/sip88xx.14-2-1-0101-21.sbn"
)
declare -A SIZES=([config]=1536 [locale]=51200 [firmware]=$((4 * 1024 * 1024)))
for f in config locale firmware; do
    head -c "${SIZES[$f]}" /dev/urandom >"$BENCH_TMP/www/${PATHS[$f]}"
done
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
  max_per_client: 4096         # wrk's connections all come from 127.0.0.1
EOF
"$BIN" cache import "$BENCH_TMP/www" -c "$BENCH_TMP/branchtftp.yaml" >"$BENCH_TMP/import.log" 2>&1
bench_start "$BIN" serve -c "$BENCH_TMP/branchtftp.yaml"
BT_PID="$BENCH_PID"
wait_http "http://127.0.0.1:$ADMIN_PORT/healthz"

# --- nginx -----------------------------------------------------------------------------------
NG_PORT="$(free_tcp_port)"
cat >"$BENCH_TMP/nginx.conf" <<EOF
daemon off;
worker_processes 2;
worker_rlimit_nofile 65536;
pid $BENCH_TMP/nginx.pid;
error_log $BENCH_TMP/nginx-error.log warn;
events { worker_connections 4096; }
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
        listen 127.0.0.1:$NG_PORT backlog=4096;
        root $BENCH_TMP/www;
    }
}
EOF
bench_start "$NGINX" -p "$BENCH_TMP" -e "$BENCH_TMP/nginx-error.log" -c "$BENCH_TMP/nginx.conf"
wait_http "http://127.0.0.1:$NG_PORT/${PATHS[config]}" ||
    { cat "$BENCH_TMP/nginx-error.log" "$BENCH_TMP"/server-1.log >&2; exit 1; }

declare -A URL
for f in $FILES; do
    URL[branchtftp,$f]="http://127.0.0.1:$BT_PORT/${PATHS[$f]}"
    URL[nginx,$f]="http://127.0.0.1:$NG_PORT/${PATHS[$f]}"
    # Both serve the very same bytes.
    for server in branchtftp nginx; do
        curl -s --noproxy '*' -f -o "$BENCH_TMP/check" "${URL[$server,$f]}"
        cmp -s "$BENCH_TMP/check" "$BENCH_TMP/www/${PATHS[$f]}" || {
            echo "bench: ${URL[$server,$f]} does not serve the file intact" >&2
            exit 1
        }
    done
done

# --- runs ------------------------------------------------------------------------------------
# wrk's latency ("1.23ms", "812.00us", "1.02s") in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "s") ? 1000 : (u == "ms") ? 1 : (u == "us") ? 0.001 : (u == "m") ? 60000 : 1
        printf "%.2f\n", n * f
    }'
}

declare -A REQS P99
run_wrk() { # SERVER FILE CONNECTIONS
    local out rps p99 threads=$THREADS key="$1,$2,$3"
    ((threads > $3)) && threads=$3
    out="$(wrk -t "$threads" -c "$3" -d "$DURATION" --latency "${URL[$1,$2]}" 2>&1)"
    if grep -q 'Non-2xx' <<<"$out"; then
        printf 'bench: %s answered errors:\n%s\n' "$1" "$out" >&2
        exit 1
    fi
    rps="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
    p99="$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")"
    REQS[$key]+="$rps "
    P99[$key]+="$p99 "
    printf '  %-10s %-7s -c%-5s %10s req/s  p99 %8s ms%s\n' "$1" "$2" "$3" "$rps" "$p99" \
        "$(grep -q 'Socket errors' <<<"$out" && printf '  (%s)' "$(grep 'Socket errors' <<<"$out" | xargs)")" >&2
}

log "wrk -t$THREADS -d$DURATION --latency, $RUNS runs per server and cell, interleaved"
for f in $FILES; do
    for c in $CONNECTIONS; do
        for ((i = 0; i < RUNS; i++)); do
            if ((i % 2 == 0)); then
                run_wrk branchtftp "$f" "$c"
                run_wrk nginx "$f" "$c"
            else
                run_wrk nginx "$f" "$c"
                run_wrk branchtftp "$f" "$c"
            fi
        done
    done
done

bt_rss="$(bench_peak_rss_kb "$BT_PID" 2>/dev/null || echo '?')"
printf '\n| file | connections | branchtftp req/s | nginx req/s | ratio (target >= %s) | branchtftp p99 ms | nginx p99 ms |\n' "$TARGET"
printf '| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n'
missed=0
for f in $FILES; do
    for c in $CONNECTIONS; do
        # shellcheck disable=SC2086
        {
            bt="$(bench_median ${REQS[branchtftp,$f,$c]})"
            ng="$(bench_median ${REQS[nginx,$f,$c]})"
            bt99="$(bench_median ${P99[branchtftp,$f,$c]})"
            ng99="$(bench_median ${P99[nginx,$f,$c]})"
        }
        ratio="$(awk -v a="$bt" -v b="$ng" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
        verdict="met"
        awk -v r="$ratio" -v t="$TARGET" 'BEGIN { exit !(r >= t) }' || { verdict="MISSED"; missed=1; }
        printf '| %s (%s B) | %s | %.0f | %.0f | %s %s | %.2f | %.2f |\n' \
            "$f" "${SIZES[$f]}" "$c" "$bt" "$ng" "$ratio" "$verdict" "$bt99" "$ng99"
    done
done
printf '\nbranchtftp %s (HTTP front, cache hit) vs nginx %s (2 workers, sendfile %s); wrk -t%s -d%s --latency, median of %s interleaved runs each; branchtftp peak RSS %s KiB; %s, %s, %s cores, load %s\n' \
    "$("$BIN" --version 2>/dev/null | awk '{ print $2 }')" "$("$NGINX" -v 2>&1 | sed 's|.*/||')" \
    "${BENCH_NGINX_SENDFILE:-on}" "$THREADS" "$DURATION" "$RUNS" "$bt_rss" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(uname -r)" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
exit "$missed"
