#!/usr/bin/env bash
# Moving every segment of a lost node: all its PGs at once (`storctl repair
# --node F --with G`) against one PG after another (`storctl repair --pg N
# --replace F --with G`, in turn): one run, on one machine, a 7-node dev
# cluster of release binaries whose --pgs PGs all sit on nodes 1 to 6
# (node 7 is a spare), on file devices under --dir.
# Benchmarks are not tests: exits 0 unless a tool is missing or a step fails.
#
# Steps:
#   setup        every PG gets --mib MiB of pages (the bench writes its own
#                cluster file: pg_pages, and each PG placed on nodes 1 to 6),
#                every page written once; the spare's device is zeroed
#                (a disk has its blocks: a write into a sparse file's hole
#                costs the file system an allocation) and formatted.
#   a move       the node that holds the segments (6, then 7, then 6 ...)
#                is killed and the other is moved to, either way:
#                  parallel  `storctl repair --node F --with G`
#                  serial    `storctl repair --pg N --replace F --with G`
#                            for each PG in turn
#                timed from the first storctl to the last one's exit (each
#                returns once its PG's new set alone is the membership and
#                its new segment is at the PGCL). Then F's device is zeroed
#                and formatted anew (a replaced disk), F starts empty, and
#                the next move goes back onto it.
#   rounds       each round moves once each way; odd rounds parallel first,
#                even rounds serial first. Figures: seconds of each, MB/s
#                of page versions hydrated (G's log says how many bytes),
#                and the ratio serial / parallel (above 1: at once is
#                faster).
#
# Usage: benches/move.sh [options]
#   --pgs N            PGs, each with a segment on the lost node (4)
#   --mib N            MiB of pages per PG (128; a multiple of 128)
#   --rounds N         rounds; medians (1)
#   --dir DIR          where the devices go (/var/tmp/move); a fresh run.*
#                      directory under it is removed at the end
#   --json FILE        also write the figures as JSON to FILE (`-`: stdout)
#   --no-build         use the existing target/release binaries
#   -h, --help         this text
# Env: CARGO_TARGET_DIR; KEEP_RUN=1 keeps the run directory (logs) at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGS=4
MIB=128
ROUNDS=1
DIR=/var/tmp/move
JSON_OUT=""
BUILD=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/release"
PAGE_BYTES=8192
# storbench: a committer owns at most 256 pages.
COMMITTERS_OWN_PAGES=256

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "move: $*" >&2; exit 1; }
log() { echo "move: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --pgs) PGS="${2:?--pgs needs a value}"; shift 2 ;;
        --mib) MIB="${2:?--mib needs a value}"; shift 2 ;;
        --rounds) ROUNDS="${2:?--rounds needs a value}"; shift 2 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        --json) JSON_OUT="${2:?--json needs a value}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
for n in "$PGS" "$MIB" "$ROUNDS"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--pgs, --mib and --rounds take positive integers, not '$n'"
done
[ $((MIB % 128)) = 0 ] || die "--mib must be a multiple of 128"
[ "$PGS" -ge 2 ] || die "--pgs must be at least 2: one PG has nothing to do at once"
command -v python3 >/dev/null || die "python3 is needed to read the JSON"

PG_PAGES=$((MIB * 1024 * 1024 / PAGE_BYTES))
# Committers such that they own every page of every PG (64 a job).
COMMITTERS=$((PGS * PG_PAGES / COMMITTERS_OWN_PAGES))
if [ "$COMMITTERS" -le 64 ]; then IODEPTH=$COMMITTERS; NUMJOBS=1; else IODEPTH=64; NUMJOBS=$((COMMITTERS / 64)); fi
[ $((IODEPTH * NUMJOBS)) = "$COMMITTERS" ] || die "--pgs × --mib must be a multiple of 128 MiB × 64 above 8 GiB"
# Each page: two version slots of 3 blocks; a node may hold every PG; the
# log a quarter of the device (at most 1 GiB), metadata and room to spare.
DEVICE_MIB=$((PGS * (PG_PAGES * 24 / 1024 + 64) + 1024 + 64))
mkdir -p "$DIR"
FREE_MIB=$(df -Pm "$DIR" | awk 'NR == 2 {print $4}')
NEED_MIB=$((7 * DEVICE_MIB + 1024))
[ "$FREE_MIB" -ge "$NEED_MIB" ] || die "$DIR has $FREE_MIB MiB free; seven devices of $DEVICE_MIB MiB and 1 GiB to spare need $NEED_MIB (use --dir elsewhere, or smaller --pgs or --mib)"

. "$ROOT/benches/lib.sh"

# The PGs whose membership (as `storctl status` shows it) has node $1.
pgs_on() {
    "$BIN/storctl" status --cluster "$CLUSTER" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
for pg in v["pgs"]:
    m = pg.get("membership")
    members = m["new"] if m else [s["node"] for s in pg["segments"]]
    if int(sys.argv[1]) in members:
        print(pg["pg"])' "$1"
}

# Move every segment of node $1 to node $2, $3 = parallel | serial; sets
# MOVE_S (seconds) and MOVE_BYTES (page versions node $2 hydrated).
move() {
    local from="$1" to="$2" mode="$3" t0 t1 pgs pg out
    pgs=$(pgs_on "$from")
    [ "$(echo "$pgs" | wc -w)" = "$PGS" ] || die "node $from holds PGs $(echo $pgs) of $PGS before the move"
    kill_node "$from"
    t0=$(now)
    if [ "$mode" = parallel ]; then
        out=$("$BIN/storctl" repair --cluster "$CLUSTER" --node "$from" --with "$to" --json --timeout 600) \
            || [ $? = 1 ] || die "storctl repair --node $from --with $to: $out"
    else
        for pg in $pgs; do
            out=$("$BIN/storctl" repair --cluster "$CLUSTER" --pg "$pg" --replace "$from" --with "$to" --json --timeout 600) \
                || [ $? = 1 ] || die "storctl repair --pg $pg --replace $from --with $to: $out"
        done
    fi
    t1=$(now)
    MOVE_S=$(python3 -c "print(round($t1 - $t0, 2))")
    MOVE_BYTES=$(hydrated_bytes "$to" move)
    [ "$(pgs_on "$to" | wc -w)" = "$PGS" ] || die "node $to does not hold every PG after the move"
    # The lost node comes back as a new, empty disk: the next move's target.
    new_device "$from" "$DEVICE_MIB"
    start_node "$from" move
}

log "a 7-node dev cluster, $PGS PGs of $MIB MiB on nodes 1 to 6, node 7 a spare, in $RUN"
"$BIN/storctl" dev-cluster up --dir "$RUN" --nodes 7 --device-size 128m --pgs "$PGS" >/dev/null
"$BIN/storctl" dev-cluster down --dir "$RUN" >/dev/null
sed -i "s/^pg_pages = .*/pg_pages = $PG_PAGES/; s/^\[computed\]$/[computed]\npg_held_bytes_max = \"1m\"/" "$CLUSTER"
for pg in $(seq 0 $((PGS - 1))); do
    printf '\n[[placement]]\npg = %d\nnodes = [1, 2, 3, 4, 5, 6]\n' "$pg" >>"$CLUSTER"
done
for n in 1 2 3 4 5 6 7; do
    rm -f "$RUN/dev$n"
    truncate -s "${DEVICE_MIB}M" "$RUN/dev$n"
done
for n in 1 2 3 4 5 6; do
    "$BIN/storaged" format --device "$RUN/dev$n" --node-id "$n" >/dev/null 2>&1 || die "formatting $RUN/dev$n failed"
done
new_device 7 "$DEVICE_MIB"
"$BIN/storctl" dev-cluster up --dir "$RUN" --keep >/dev/null
log "writing every page once ($((PGS * MIB)) MiB)"
"$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=8k --pages-per-txn=8 \
    --iodepth="$IODEPTH" --numjobs="$NUMJOBS" --size="$((COMMITTERS_OWN_PAGES * IODEPTH))k" \
    --output-format=json >/dev/null
# The spare's log from here on is the bench's, so it counts only the move's hydrations.
kill_node 7
start_node 7 move

declare -A SECS=() RATES=()
held=6 spare=7
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order=(parallel serial); else order=(serial parallel); fi
    for mode in "${order[@]}"; do
        log "round $round: node $held's $PGS segments to node $spare, $mode"
        move "$held" "$spare" "$mode"
        rate=$(python3 -c "print(round($MOVE_BYTES / $MOVE_S / 1e6, 1))")
        SECS[$mode]+="$MOVE_S "; RATES[$mode]+="$rate "
        log "  $MOVE_S s, $MOVE_BYTES bytes of page versions hydrated: $rate MB/s"
        read -r held spare <<<"$spare $held"
    done
done

# shellcheck disable=SC2086
P=$(median ${SECS[parallel]}); S=$(median ${SECS[serial]})
# shellcheck disable=SC2086
PR=$(median ${RATES[parallel]}); SR=$(median ${RATES[serial]})
RATIO=$(python3 -c "print(round($S / $P, 2))")
echo "move: $ROUNDS round(s), medians; $PGS PGs of $MIB MiB"
printf '%-40s %10s %10s\n' "" "seconds" "MB/s" \
    "every PG at once (repair --node)" "$P" "$PR" \
    "one PG after another (repair --pg)" "$S" "$SR"
printf '%-40s %10s\n' "serial / parallel time" "$RATIO"
J=$(printf '{"pgs":%s,"mib":%s,"rounds":%s,"parallel_s":%s,"serial_s":%s,"parallel_mb_per_s":%s,"serial_mb_per_s":%s,"serial_over_parallel":%s}' \
    "$PGS" "$MIB" "$ROUNDS" "$P" "$S" "$PR" "$SR" "$RATIO")
if [ "$JSON_OUT" = "-" ]; then echo "$J"; elif [ -n "$JSON_OUT" ]; then echo "$J" >"$JSON_OUT"; fi
