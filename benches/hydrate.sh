#!/usr/bin/env bash
# How fast one segment of --mib MiB of pages hydrates from its peers, and
# what that costs the foreground: a 6-node dev cluster of release binaries
# with one PG big enough for it, on sparse file devices under --dir.
# Benchmarks are not tests: exits 0 unless a tool is missing or a step fails.
#
# Steps (each round runs them in order; --rounds N gives medians):
#   setup        the PG gets --mib MiB of pages (a dev cluster's PG is at
#                most 512 MiB, so the bench writes its own cluster file's
#                pg_pages and formats sparse devices of the size it needs);
#                computed holds only 1 MiB per PG for a lagging segment.
#   baseline     commits (4 KiB, 1 page per transaction, iodepth 8) for
#                --fg-runtime seconds with every node up: commits/s and p99;
#                run again once node 6 has hydrated beside the foreground
#                (below), and the foreground alone is the mean of the two.
#   alone        node 6 is killed; every page of the PG is written once
#                (8 KiB, 8 pages per transaction, 512 committers: each owns
#                256 pages); the donors coalesce and let their logs go, so
#                node 6's segment can only hydrate, and the bench waits
#                until they stop (their coalesced LSNs, from their
#                metrics, the same 2 s apart). Node 6 starts again
#                with nothing else running, and `storctl status` is polled
#                (every 50 ms) until its segment is at the PGCL with no
#                holes. Rate = bytes of page versions it hydrated (its log
#                says) / time from its start to its "segment hydrated"
#                line; the time to the PGCL (the chain above the versions
#                pulled too) is shown beside it.
#   with load    node 6 is killed and made to need every page again (its
#                device formatted anew with --fresh, else every page
#                written again), and starts with the foreground load of the
#                baseline running alongside for --fg-runtime seconds:
#                commits/s and p99 of the foreground while it hydrated,
#                their ratios to the baseline, and the hydration's rate
#                under that load (repair yields to the foreground).
#
# Usage: benches/hydrate.sh [options]
#   --mib N            MiB of pages in the PG, all hydrated (1024)
#   --fresh            node 6's device is zeroed and formatted anew before it
#                      starts again (a replaced disk): its segment is new, as
#                      a membership change's new member's is, rather than one
#                      that holds older versions of every page
#   --rounds N         rounds; medians (1)
#   --fg-runtime S     seconds of each foreground run (5)
#   --dir DIR          where the devices go (/var/tmp/hydrate); a fresh run.*
#                      directory under it is removed at the end. The devices
#                      are sparse files, but each ends up nearly all written
#                      (about 3.5 × --mib MiB, 4.3 GiB at 1024): the run is
#                      refused unless DIR's file system has 6 devices free
#   --json FILE        also write the figures as JSON to FILE (`-`: stdout)
#   --no-build         use the existing target/release binaries
#   -h, --help         this text
# Env: CARGO_TARGET_DIR; KEEP_RUN=1 keeps the run directory (logs) at the end;
# NODE6_CONFIG=FILE starts node 6 with `storaged run --config FILE`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MIB=1024
ROUNDS=1
FG_RUNTIME=5
DIR=/var/tmp/hydrate
JSON_OUT=""
BUILD=1
FRESH=0
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/release"
PAGE_BYTES=8192
# storbench: a committer owns at most 256 pages; 512 of them own 128 Ki pages.
COMMITTERS_OWN_PAGES=256

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "hydrate: $*" >&2; exit 1; }
log() { echo "hydrate: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --mib) MIB="${2:?--mib needs a value}"; shift 2 ;;
        --rounds) ROUNDS="${2:?--rounds needs a value}"; shift 2 ;;
        --fg-runtime) FG_RUNTIME="${2:?--fg-runtime needs a value}"; shift 2 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        --json) JSON_OUT="${2:?--json needs a value}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --fresh) FRESH=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
for n in "$MIB" "$ROUNDS" "$FG_RUNTIME"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--mib, --rounds and --fg-runtime take positive integers, not '$n'"
done
PG_PAGES=$((MIB * 1024 * 1024 / PAGE_BYTES))
# Committers such that they own every page (storbench spreads them 64 a job).
COMMITTERS=$(((PG_PAGES + COMMITTERS_OWN_PAGES - 1) / COMMITTERS_OWN_PAGES))
[ $((COMMITTERS % 64)) = 0 ] || [ "$COMMITTERS" -lt 64 ] || die "--mib must be a multiple of 128 above 128"
if [ "$COMMITTERS" -le 64 ]; then IODEPTH=$COMMITTERS; NUMJOBS=1; else IODEPTH=64; NUMJOBS=$((COMMITTERS / 64)); fi
# Each page: two version slots of 3 blocks; the index; the log a quarter
# (at most 1 GiB), 1 MiB of metadata, and room to spare.
PAGES_MIB=$((PG_PAGES * 24 / 1024 + 64))
DEVICE_MIB=$((PAGES_MIB + 1024 + 64))
command -v python3 >/dev/null || die "python3 is needed to read the JSON"
mkdir -p "$DIR"
FREE_MIB=$(df -Pm "$DIR" | awk 'NR == 2 {print $4}')
NEED_MIB=$((6 * DEVICE_MIB + 1024))
# A full file system fails every node's writes at once (and everyone
# else's on it): refuse before starting.
[ "$FREE_MIB" -ge "$NEED_MIB" ] || die "$DIR has $FREE_MIB MiB free; six devices of $DEVICE_MIB MiB and 1 GiB to spare need $NEED_MIB (use --dir elsewhere, or a smaller --mib)"

. "$ROOT/benches/node6.sh"

# storbench's --size is per job, split over its --iodepth committers, in
# transactions of --bs each (--pages-per-txn pages apiece): each committer
# writes its COMMITTERS_OWN_PAGES pages once with --size = its pages × iodepth × 1 KiB.
write_every_page() {
    "$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=8k --pages-per-txn=8 \
        --iodepth="$IODEPTH" --numjobs="$NUMJOBS" --size="$((COMMITTERS_OWN_PAGES * IODEPTH))k" \
        --output-format=json >/dev/null
}

foreground() { # seconds, out file → JSON of the run in the file
    "$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=4k --iodepth=8 \
        --runtime="${1}" --output-format=json >"$2"
}
iops() { json 'round(d["jobs"][0]["write"]["iops"])' <"$1"; }
p99() { json 'round(d["jobs"][0]["write"]["clat_ns"]["percentile"]["99.000000"] / 1000)' <"$1"; }

log "a 6-node dev cluster with one PG of $PG_PAGES pages ($MIB MiB) in $RUN (sparse devices of ${DEVICE_MIB} MiB)"
"$BIN/storctl" dev-cluster up --dir "$RUN" --device-size 128m --pgs 1 >/dev/null
"$BIN/storctl" dev-cluster down --dir "$RUN" >/dev/null
sed -i "s/^pg_pages = .*/pg_pages = $PG_PAGES/; s/^\[computed\]$/[computed]\npg_held_bytes_max = \"1m\"/" "$CLUSTER"
for n in 1 2 3 4 5 6; do
    rm -f "$RUN/dev$n"
    truncate -s "${DEVICE_MIB}M" "$RUN/dev$n"
    "$BIN/storaged" format --device "$RUN/dev$n" --node-id "$n" >/dev/null 2>&1 \
        || die "formatting $RUN/dev$n failed"
done
"$BIN/storctl" dev-cluster up --dir "$RUN" --keep >/dev/null

# Node 6 is down; make it need every page again: a new device (--fresh),
# or every page written again while it is down.
make_node6_behind() {
    if [ "$FRESH" = 1 ]; then
        new_device 6 "$DEVICE_MIB"
    else
        write_every_page
        donors_settle
    fi
}

# Start node 6 and wait until it has hydrated (HYD_S: seconds from its
# start; HYD_BYTES, HYD_COUNT: page-version bytes and hydrations its log
# says) and is at the PGCL (PGCL_S).
hydrate_node6() {
    start_node6
    local t0 t1 t2
    t0=$(now)
    until grep -q "segment hydrated" "$RUN/logs/storaged-6.round.log"; do
        kill -0 "$(node_pid 6)" 2>/dev/null || die "node 6 died: $(tail -5 "$RUN/logs/storaged-6.round.log")"
        sleep 0.05
    done
    t1=$(now)
    until node6_caught_up; do sleep 0.05; done
    t2=$(now)
    HYD_BYTES=$(hydrated_bytes 6 round)
    HYD_COUNT=$(grep -c 'segment hydrated' "$RUN/logs/storaged-6.round.log" || true)
    HYD_S=$(python3 -c "print(round($t1 - $t0, 2))")
    PGCL_S=$(python3 -c "print(round($t2 - $t0, 2))")
}

RATES=(); TO_PGCL=(); FG_RATES=(); BASE_IOPS=(); DURING_IOPS=(); BASE_P99=(); DURING_P99=()
for round in $(seq 1 "$ROUNDS"); do
    log "round $round: foreground alone ($(uptime | sed 's/.*load/load/'))"
    foreground "$FG_RUNTIME" "$RUN/base.json"
    kill_node6
    log "round $round: writing every page ($MIB MiB) while node 6 is down"
    write_every_page
    donors_settle
    [ "$FRESH" = 1 ] && make_node6_behind
    log "round $round: node 6 hydrates$([ "$FRESH" = 1 ] && echo " onto a new device") with no foreground ($(uptime | sed 's/.*load/load/'))"
    hydrate_node6
    RATES+=("$(python3 -c "print(round($HYD_BYTES / $HYD_S / 1e6, 1))")"); TO_PGCL+=("$PGCL_S")
    log "  $HYD_BYTES bytes of page versions in $HYD_COUNT hydration(s), $HYD_S s: ${RATES[-1]} MB/s; at the PGCL after $PGCL_S s"

    kill_node6
    log "round $round: node 6 behind again$([ "$FRESH" = 1 ] && echo " (a new device)" || echo " (every page written again)")"
    make_node6_behind
    log "round $round: node 6 hydrates, the foreground alongside ($(uptime | sed 's/.*load/load/'))"
    foreground "$FG_RUNTIME" "$RUN/during.json" &
    FG_PID=$!
    hydrate_node6
    wait "$FG_PID"
    FG_RATES+=("$(python3 -c "print(round($HYD_BYTES / $HYD_S / 1e6, 1))")")
    log "round $round: foreground alone again, node 6 caught up ($(uptime | sed 's/.*load/load/'))"
    foreground "$FG_RUNTIME" "$RUN/after.json"
    # The foreground alone is the mean of the runs before and after: this
    # VM's commits/s alone moved by half from one run to the next.
    BASE_IOPS+=("$(python3 -c "print(round(($(iops "$RUN/base.json")) / 2 + ($(iops "$RUN/after.json")) / 2))")")
    BASE_P99+=("$(python3 -c "print(round(($(p99 "$RUN/base.json")) / 2 + ($(p99 "$RUN/after.json")) / 2))")")
    DURING_IOPS+=("$(iops "$RUN/during.json")"); DURING_P99+=("$(p99 "$RUN/during.json")")
    log "  $HYD_BYTES bytes of page versions in $HYD_COUNT hydration(s), $HYD_S s: ${FG_RATES[-1]} MB/s with the foreground"
    python3 -c "import sys; sys.exit(0 if $HYD_S >= $FG_RUNTIME else 1)" \
        || log "  (the hydration ended before the foreground's $FG_RUNTIME s: the figures below cover some time without it)"
    log "  foreground: ${BASE_IOPS[-1]} commits/s, p99 ${BASE_P99[-1]} µs alone ($(iops "$RUN/base.json") and $(iops "$RUN/after.json") commits/s before and after); ${DURING_IOPS[-1]} commits/s, p99 ${DURING_P99[-1]} µs during ($(uptime | sed 's/.*load/load/'))"
done

R=$(median "${RATES[@]}"); T=$(median "${TO_PGCL[@]}"); FR=$(median "${FG_RATES[@]}")
BI=$(median "${BASE_IOPS[@]}"); DI=$(median "${DURING_IOPS[@]}")
BP=$(median "${BASE_P99[@]}"); DP=$(median "${DURING_P99[@]}")
IR=$(python3 -c "print(round($DI / $BI, 2))"); PR=$(python3 -c "print(round($DP / $BP, 2))")
printf '%-44s %12s\n' "hydration rate (MB/s of page versions)" "$R" "seconds until at the PGCL" "$T" \
    "hydration rate with the foreground (MB/s)" "$FR" \
    "foreground commits/s alone" "$BI" "foreground commits/s while hydrating" "$DI" \
    "commits/s ratio during / alone" "$IR" "foreground p99 alone (µs)" "$BP" \
    "foreground p99 while hydrating (µs)" "$DP" "p99 ratio during / alone" "$PR"
J=$(printf '{"mib":%s,"rounds":%s,"hydrate_mb_per_s":%s,"to_pgcl_s":%s,"hydrate_mb_per_s_with_fg":%s,"fg_iops":%s,"fg_iops_during":%s,"iops_ratio":%s,"fg_p99_us":%s,"fg_p99_during_us":%s,"p99_ratio":%s}' \
    "$MIB" "$ROUNDS" "$R" "$T" "$FR" "$BI" "$DI" "$IR" "$BP" "$DP" "$PR")
if [ "$JSON_OUT" = "-" ]; then echo "$J"; elif [ -n "$JSON_OUT" ]; then echo "$J" >"$JSON_OUT"; fi
