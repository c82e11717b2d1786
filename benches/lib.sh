#!/usr/bin/env bash
# Helpers for benchmark scripts that compare two programs (say branchtftp and tftpd-hpa) with
# the same client on the same file. Source it:
#
#   source "$(dirname "$0")/lib.sh"
#   bench_compare "40 MB, blksize 512 (curl)" \
#       branchtftp "curl -s -m 60 -o /dev/null tftp://$BT/big.bin" \
#       tftpd-hpa  "curl -s -m 60 -o /dev/null tftp://$HPA/big.bin"
#   bench_report
#
# Loopback round trips on shared machines swing between ~30 and ~300 µs from moment to moment,
# so every comparison interleaves the two commands (A B B A A B ...: neither always goes first),
# runs each BENCH_RUNS times (default 5), and reports medians and the ratio A/B.
# Commands are strings run with `eval` in the calling shell, so shell functions work too. A
# command that fails aborts the benchmark: a fast failure is not a result.
#
# After each bench_compare, BENCH_A, BENCH_B (median seconds) and BENCH_RATIO (A/B) hold the
# results, for scripts that check a target (see bench_expect).

BENCH_RUNS="${BENCH_RUNS:-5}"
BENCH_ROWS=()
BENCH_PIDS=()

bench_log() { printf '  %s\n' "$*" >&2; }

# Current time in seconds, with nanoseconds.
bench_now() { date +%s.%N; }

# Seconds taken by one run of the command string $1 (printed with 4 decimals).
bench_time() {
    local start end
    start="$(bench_now)"
    if ! eval "$1" >/dev/null 2>"${BENCH_STDERR:-/dev/null}"; then
        printf 'bench: command failed: %s\n' "$1" >&2
        exit 1
    fi
    end="$(bench_now)"
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.4f\n", e - s }'
}

# Median of the numbers given as arguments.
bench_median() {
    printf '%s\n' "$@" | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "nan"; exit }
            if (NR % 2) printf "%.4f\n", v[(NR + 1) / 2]
            else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}

# bench_compare TITLE LABEL_A CMD_A LABEL_B CMD_B [PREPARE]
# Interleaves BENCH_RUNS runs of each (PREPARE, if given, is eval'd before every run, e.g. to
# delete the previous output), then records a table row.
bench_compare() {
    local title="$1" label_a="$2" cmd_a="$3" label_b="$4" cmd_b="$5" prepare="${6:-}"
    local -a ta=() tb=()
    local i t
    bench_log "$title: $label_a vs $label_b, $BENCH_RUNS runs each, interleaved"
    for ((i = 0; i < BENCH_RUNS; i++)); do
        # A B, B A, A B, ...: drift in the machine's load hits both sides alike.
        if ((i % 2 == 0)); then
            [ -n "$prepare" ] && eval "$prepare"
            t="$(bench_time "$cmd_a")" || exit 1; ta+=("$t")
            [ -n "$prepare" ] && eval "$prepare"
            t="$(bench_time "$cmd_b")" || exit 1; tb+=("$t")
        else
            [ -n "$prepare" ] && eval "$prepare"
            t="$(bench_time "$cmd_b")" || exit 1; tb+=("$t")
            [ -n "$prepare" ] && eval "$prepare"
            t="$(bench_time "$cmd_a")" || exit 1; ta+=("$t")
        fi
        bench_log "run $((i + 1)): $label_a ${ta[-1]} s, $label_b ${tb[-1]} s"
    done
    BENCH_A="$(bench_median "${ta[@]}")"
    BENCH_B="$(bench_median "${tb[@]}")"
    BENCH_RATIO="$(awk -v a="$BENCH_A" -v b="$BENCH_B" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
    BENCH_ROWS+=("$title|$label_a|$BENCH_A|$label_b|$BENCH_B|$BENCH_RATIO")
}

# bench_single TITLE LABEL CMD [PREPARE]: median of BENCH_RUNS runs of one command (a row with
# no B side). The median is left in BENCH_A.
bench_single() {
    local title="$1" label="$2" cmd="$3" prepare="${4:-}"
    local -a ts=()
    local i t
    bench_log "$title: $label, $BENCH_RUNS runs"
    for ((i = 0; i < BENCH_RUNS; i++)); do
        [ -n "$prepare" ] && eval "$prepare"
        t="$(bench_time "$cmd")" || exit 1
        ts+=("$t")
    done
    BENCH_A="$(bench_median "${ts[@]}")"
    BENCH_B=""
    BENCH_RATIO=""
    BENCH_ROWS+=("$title|$label|$BENCH_A|-|-|-")
}

# bench_row TITLE LABEL_A A LABEL_B B [RATIO]: adds a row measured some other way.
bench_row() {
    local ratio="${6:-}"
    if [ -z "$ratio" ]; then
        ratio="$(awk -v a="$3" -v b="$5" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
    fi
    BENCH_ROWS+=("$1|$2|$3|$4|$5|$ratio")
}

# bench_expect DESCRIPTION AWK_CONDITION: records whether a target holds, e.g.
#   bench_expect "branchtftp ≤ 1.0× tftpd-hpa" "$BENCH_RATIO <= 1.0"
# Targets are reported by bench_report; bench_report's exit status is 1 if one missed.
BENCH_TARGETS=()
BENCH_MISSED=0
bench_expect() {
    if awk "BEGIN { exit !($2) }"; then
        BENCH_TARGETS+=("met     $1 ($2)")
    else
        BENCH_TARGETS+=("MISSED  $1 ($2)")
        BENCH_MISSED=1
    fi
}

# Prints the table of every row so far (Markdown, so it pastes into an issue) and the targets.
bench_report() {
    printf '\n| scenario | A | A median (s) | B | B median (s) | A/B |\n'
    printf '| --- | --- | ---: | --- | ---: | ---: |\n'
    local row
    for row in "${BENCH_ROWS[@]}"; do
        IFS='|' read -r t la a lb b r <<<"$row"
        printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "$la" "$a" "$lb" "$b" "$r"
    done
    printf '\nmedian of %s interleaved runs each; %s, %s, %s cores\n' \
        "$BENCH_RUNS" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(uname -r)" "$(nproc)"
    if [ "${#BENCH_TARGETS[@]}" -gt 0 ]; then
        printf '\n'
        printf '%s\n' "${BENCH_TARGETS[@]}"
    fi
    return "$BENCH_MISSED"
}

# A UDP port on 127.0.0.1 that is not bound right now (from /proc/net/udp*).
bench_free_udp_port() {
    local port hex
    while :; do
        port=$((20000 + RANDOM % 40000))
        hex="$(printf ':%04X ' "$port")"
        if ! grep -qi "$hex" /proc/net/udp /proc/net/udp6 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# bench_start CMD...: starts a server in the background (output to a log in $BENCH_TMP), records
# its PID in BENCH_PID and for bench_cleanup.
bench_start() {
    : "${BENCH_TMP:=$(mktemp -d)}"
    "$@" >"$BENCH_TMP/server-${#BENCH_PIDS[@]}.log" 2>&1 &
    BENCH_PID=$!
    BENCH_PIDS+=("$BENCH_PID")
}

# Peak resident memory (VmHWM) of a running process, in KiB.
bench_peak_rss_kb() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

# Waits until a TFTP server answers at HOST PORT (a RRQ for a missing file gets an ERROR).
bench_wait_tftp() {
    local i
    for ((i = 0; i < 100; i++)); do
        if tftp "$1" "$2" -m binary -c get bench-probe-no-such-file /dev/null 2>&1 |
            grep -qi 'error'; then
            return 0
        fi
        sleep 0.1
    done
    printf 'bench: no TFTP server answering at %s %s\n' "$1" "$2" >&2
    return 1
}

# Stops every server started with bench_start (by PID) and removes BENCH_TMP.
bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    BENCH_PIDS=()
    if [ -n "${BENCH_TMP:-}" ]; then
        rm -rf "$BENCH_TMP"
    fi
}

# `bash benches/lib.sh --selftest`: the helpers on two sleeps of known length.
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = "--selftest" ]; then
    set -euo pipefail
    [ "$(bench_median 3 1 2)" = "2.0000" ] || { echo "median of odd count" >&2; exit 1; }
    [ "$(bench_median 4 1 3 2)" = "2.5000" ] || { echo "median of even count" >&2; exit 1; }
    BENCH_RUNS=3
    bench_compare "sleep" "0.05 s" "sleep 0.05" "0.10 s" "sleep 0.1"
    bench_expect "ratio about one half" "$BENCH_RATIO >= 0.4 && $BENCH_RATIO <= 0.6"
    bench_single "sleep" "0.02 s" "sleep 0.02"
    bench_row "given" "x" 1.0 "y" 4.0
    bench_report
fi
