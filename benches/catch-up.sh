#!/usr/bin/env bash
# How fast a segment far behind catches up from its peers (gossip repair), and
# what that costs the foreground: one run, on one machine, a 6-node dev cluster
# of release binaries with one PG, on file devices under --dir.
# Benchmarks are not tests: exits 0 unless a tool is missing or a step fails.
#
# Phases (each round runs them in order; --rounds N gives medians):
#   catch-up     node 6 is killed; storbench commits --mib MiB of
#                transactions of 8 pages of 8 KiB (iodepth 32: 8 times
#                --mib of page images, every one a record node 6's segment
#                lacks); computed holds only 1 MiB per PG for a lagging
#                segment, so node 6's segment needs repair; nodes 1 to 5
#                are left to finish coalescing what was written (their
#                coalesced LSNs still for 2 s); node 6 starts again and
#                `storctl status` is polled (every 50 ms) until its segment
#                is at the PGCL with no holes. Two rates over the time from
#                its "listening" line to caught up:
#                  records     bytes of the records it lacked (storbench's
#                              io_bytes: the page images committed) / time
#                  hydrated    bytes of page versions it hydrated (its log
#                              says) / time: what it moved, where the
#                              records were coalesced by every peer
#   foreground   commits (4 KiB, 1 page per transaction, iodepth 8) for
#                --fg-runtime seconds with every node up and nothing to
#                repair (the baseline); then node 6 is killed, --mib MiB
#                committed, the donors left to settle, and the same load
#                run twice: with node 6 back but its repair held to
#                4 KiB/s (it takes appends it cannot count for the
#                quorum; what a segment behind costs apart from its
#                repair's traffic), then, node 6 restarted as usual, while
#                it catches up at full rate (started together); p99
#                commit latency of each, and the ratios.
#
# Usage: benches/catch-up.sh [options]
#   --mib N            MiB committed while node 6 is down (512)
#   --rounds N         rounds; medians (1)
#   --fg-runtime S     seconds of each foreground run (5)
#   --dir DIR          where the devices go (/var/tmp/catch-up); a fresh run.*
#                      directory under it is removed at the end
#   --device-size S    each node's device (4g); its log is a quarter, at most 1g
#   --json FILE        also write the figures as JSON to FILE (`-`: stdout)
#   --no-build         use the existing target/release binaries
#   -h, --help         this text
# Env: CARGO_TARGET_DIR; KEEP_RUN=1 keeps the run directory (logs) at the end;
# NODE6_CONFIG=FILE starts node 6 with `storaged run --config FILE` (not in
# the held run, which has a config of its own).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MIB=512
ROUNDS=1
FG_RUNTIME=5
DIR=/var/tmp/catch-up
DEVICE_SIZE=4g
JSON_OUT=""
BUILD=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/release"

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "catch-up: $*" >&2; exit 1; }
log() { echo "catch-up: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --mib) MIB="${2:?--mib needs a value}"; shift 2 ;;
        --rounds) ROUNDS="${2:?--rounds needs a value}"; shift 2 ;;
        --fg-runtime) FG_RUNTIME="${2:?--fg-runtime needs a value}"; shift 2 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        --device-size) DEVICE_SIZE="${2:?--device-size needs a value}"; shift 2 ;;
        --json) JSON_OUT="${2:?--json needs a value}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
for n in "$MIB" "$ROUNDS" "$FG_RUNTIME"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--mib, --rounds and --fg-runtime take positive integers, not '$n'"
done
command -v python3 >/dev/null || die "python3 is needed to read the JSON"

. "$ROOT/benches/node6.sh"

commit_bytes() { # MiB → bytes committed (storbench's io_bytes)
    "$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=8k --pages-per-txn=8 \
        --iodepth=32 --size="${1}m" --output-format=json | json 'd["jobs"][0]["write"]["io_bytes"]'
}

foreground() { # seconds → p99 commit latency in µs
    "$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=4k --iodepth=8 \
        --runtime="${1}" --output-format=json \
        | json 'd["jobs"][0]["write"]["clat_ns"]["percentile"]["99.000000"] / 1000'
}

log "starting a 6-node dev cluster with one PG in $RUN (devices of $DEVICE_SIZE)"
"$BIN/storctl" dev-cluster up --dir "$RUN" --device-size "$DEVICE_SIZE" --pgs 1 >/dev/null
"$BIN/storctl" dev-cluster down --dir "$RUN" >/dev/null
sed -i 's/^\[computed\]$/[computed]\npg_held_bytes_max = "1m"/' "$CLUSTER"
"$BIN/storctl" dev-cluster up --dir "$RUN" --keep >/dev/null

# Node 6 back, its repair held: a pull (and a hydration's batch) of 4 KiB
# a second after what the budget's first second lets through.
HELD_CONFIG="$RUN/held.toml"
printf 'repair_rate_bytes_per_s = 4096\nrepair_pull_bytes_max = 4096\nrepair_inflight_bytes_max = 4096\n' >"$HELD_CONFIG"

RATES=(); RECORD_RATES=(); BASE=(); HELD=(); DURING=()
for round in $(seq 1 "$ROUNDS"); do
    log "round $round: catch-up of $MIB MiB"
    kill_node6
    bytes=$(commit_bytes "$MIB")
    donors_settle
    start_node6
    t0=$(now)
    until node6_caught_up; do sleep 0.05; done
    t1=$(now)
    # What node 6 fetched: page versions (its log says how many bytes per
    # hydration) and the records pulled above them (not counted here).
    hydrated=$(hydrated_bytes 6 round)
    rate=$(python3 -c "print(round($hydrated / ($t1 - $t0) / 1e6, 1))")
    record_rate=$(python3 -c "print(round($bytes / ($t1 - $t0) / 1e6, 1))")
    RATES+=("$rate"); RECORD_RATES+=("$record_rate")
    log "  $bytes bytes of records committed while down; caught up in $(python3 -c "print(round($t1 - $t0, 2))") s: $record_rate MB/s of records; $hydrated bytes of page versions hydrated: $rate MB/s"

    log "round $round: foreground p99, then the same while node 6 catches up"
    donors_settle
    base=$(foreground "$FG_RUNTIME")
    kill_node6
    commit_bytes "$MIB" >/dev/null
    donors_settle
    start_node 6 held "$HELD_CONFIG"
    held=$(foreground "$FG_RUNTIME")
    stop_node 6
    start_node6
    during=$(foreground "$FG_RUNTIME")
    until node6_caught_up; do sleep 0.05; done
    BASE+=("$base"); HELD+=("$held"); DURING+=("$during")
    log "  p99 $base µs alone, $held µs with node 6 back and its repair held, $during µs during catch-up"
done

R=$(median "${RATES[@]}"); RR=$(median "${RECORD_RATES[@]}"); B=$(median "${BASE[@]}")
H=$(median "${HELD[@]}"); D=$(median "${DURING[@]}")
RATIO=$(python3 -c "print(round($D / $B, 2))")
HELD_RATIO=$(python3 -c "print(round($H / $B, 2))")
REPAIR_RATIO=$(python3 -c "print(round($D / $H, 2))")
printf '%-44s %12s\n' "catch-up rate (MB/s of records lacked)" "$RR" \
    "catch-up rate (MB/s hydrated)" "$R" "foreground p99 alone (µs)" "$B" \
    "foreground p99, node 6 back, repair held (µs)" "$H" \
    "foreground p99 during catch-up (µs)" "$D" "p99 ratio during / alone" "$RATIO" \
    "p99 ratio held / alone" "$HELD_RATIO" "p99 ratio during / held" "$REPAIR_RATIO"
J=$(printf '{"mib":%s,"rounds":%s,"catch_up_records_mb_per_s":%s,"catch_up_mb_per_s":%s,"fg_p99_us":%s,"fg_p99_repair_held_us":%s,"fg_p99_during_catch_up_us":%s,"p99_ratio":%s,"p99_ratio_held":%s,"p99_ratio_during_held":%s}' \
    "$MIB" "$ROUNDS" "$RR" "$R" "$B" "$H" "$D" "$RATIO" "$HELD_RATIO" "$REPAIR_RATIO")
if [ "$JSON_OUT" = "-" ]; then echo "$J"; elif [ -n "$JSON_OUT" ]; then echo "$J" >"$JSON_OUT"; fi
