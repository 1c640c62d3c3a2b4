#!/usr/bin/env bash
# What scrub costs and how fast it goes: one run, on one machine, a 6-node
# dev cluster of release binaries with one PG, on file devices under --dir,
# with --mib MiB of 8 KiB pages committed first (so segments hold page
# versions to verify, not only zeros).
# Benchmarks are not tests: exits 0 unless a tool is missing or a step fails.
#
# Phases (each round runs them in order; --rounds N gives medians):
#   pass rate    every node runs with scrub_rate_bytes_per_s = 64 GiB (no
#                ceiling that binds) and no foreground load; node --node is
#                asked for a priority pass (`storctl scrub --node N --json`).
#                Rate = the pass's bytes_read / (its "scrub pass done" log
#                line's time − the moment storctl was started). fio reads
#                the same device file sequentially (--rw=read --bs=1M
#                --direct=1 --ioengine=io_uring --iodepth=1 --readonly, the
#                whole file) while the node idles. The two alternate
#                --pairs times (fio, then a pass), so both see the same
#                state of the machine and of its host's caches. The
#                ratio scrub / fio is the median over every pair of every
#                round of the pair's own ratio; the rates are the medians
#                of each round's medians.
#   foreground   commits (4 KiB, 1 page per transaction, iodepth 8) for
#                --fg-runtime seconds; p99 commit latency with every node
#                restarted under each config:
#                  off      scrub_enabled = false (the baseline)
#                  default  no config: the background pass at its default
#                           pace (the device in 86 400 s)
#                  ceiling  the nodes of the one of those two run last, with
#                           priority passes on every node back to back
#                           (`storctl scrub` in a loop) at the default
#                           ceiling, 256 MiB/s
#                  full     scrub_rate_bytes_per_s = 64 GiB, priority
#                           passes back to back on every node
#                and each p99 over the baseline's. off and default swap
#                places from round to round (off first in odd rounds), so
#                neither is always the one run just after the pass phase.
#
# Usage: benches/scrub.sh [options]
#   --rounds N         rounds; medians (3)
#   --pairs N          fio runs and passes alternated in each round (3)
#   --fg-runtime S     seconds of each foreground run (5)
#   --mib N            MiB of page writes committed before the first round (256)
#   --node N           the node whose pass is timed (1)
#   --dir DIR          where the devices go (/var/tmp/scrub-bench); a fresh
#                      run.* directory under it is removed at the end
#   --device-size S    each node's device (2g); its log is a quarter, at most 1g
#   --json FILE        also write the figures as JSON to FILE (`-`: stdout)
#   --no-build         use the existing target/release binaries
#   -h, --help         this text
# Env: CARGO_TARGET_DIR; FIO (fio); KEEP_RUN=1 keeps the run directory (logs).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS=3
PAIRS=3
FG_RUNTIME=5
MIB=256
NODE=1
DIR=/var/tmp/scrub-bench
DEVICE_SIZE=2g
JSON_OUT=""
BUILD=1
FIO="${FIO:-fio}"
FULL_RATE=68719476736 # 64 GiB/s: no ceiling that binds on this machine
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/release"

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "scrub-bench: $*" >&2; exit 1; }
log() { echo "scrub-bench: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="${2:?--rounds needs a value}"; shift 2 ;;
        --pairs) PAIRS="${2:?--pairs needs a value}"; shift 2 ;;
        --fg-runtime) FG_RUNTIME="${2:?--fg-runtime needs a value}"; shift 2 ;;
        --mib) MIB="${2:?--mib needs a value}"; shift 2 ;;
        --node) NODE="${2:?--node needs a value}"; shift 2 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        --device-size) DEVICE_SIZE="${2:?--device-size needs a value}"; shift 2 ;;
        --json) JSON_OUT="${2:?--json needs a value}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
for n in "$ROUNDS" "$PAIRS" "$FG_RUNTIME" "$MIB"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--rounds, --pairs, --fg-runtime and --mib take positive integers, not '$n'"
done
[[ "$NODE" =~ ^[1-6]$ ]] || die "--node takes a node of the 6-node cluster (1 to 6), not '$NODE'"
command -v python3 >/dev/null || die "python3 is needed to read the JSON"
if ! command -v "$FIO" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq fio >/dev/null
    else
        die "$FIO not found (apt-get install fio)"
    fi
fi

. "$ROOT/benches/lib.sh"
LOOP_PID=""
AT_EXIT+=(stop_scrub_loop)

# The configs the nodes run under (`storaged run --config`).
printf 'scrub_enabled = false\n' >"$RUN/scrub-off.toml"
: >"$RUN/scrub-default.toml"
printf 'scrub_rate_bytes_per_s = %s\n' "$FULL_RATE" >"$RUN/scrub-full.toml"

# Every segment is at the PGCL with no holes, and the scrubber answers.
all_caught_up() {
    "$BIN/storctl" status --cluster "$CLUSTER" --json 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)
ok = all(
    s.get("scl") is not None and s["scl"] >= pg["pgcl"] and not (s.get("holes") or [])
    for pg in v["pgs"] for s in pg["segments"]
) and all(n.get("scrub") is not None for n in v["nodes"])
sys.exit(0 if ok else 1)' 2>/dev/null
}

restart_all() { # config
    local id
    for id in 1 2 3 4 5 6; do stop_node "$id"; done
    for id in 1 2 3 4 5 6; do start_node "$id" bench "$1"; done
    local deadline=$((SECONDS + 60))
    until all_caught_up; do
        [ "$SECONDS" -lt "$deadline" ] || die "the cluster did not come back within 60 s under $1"
        sleep 0.1
    done
    # One short run so computed has its connections again before measuring.
    "$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=4k --iodepth=8 \
        --runtime=1 --output-format=json >/dev/null
}

# Priority passes on every node, back to back, until stop_scrub_loop.
start_scrub_loop() {
    setsid bash -c 'while :; do "$0" scrub --cluster "$1" --json >/dev/null 2>&1 || sleep 0.1; done' \
        "$BIN/storctl" "$CLUSTER" </dev/null >/dev/null 2>&1 &
    LOOP_PID=$!
    disown "$!"
}

stop_scrub_loop() {
    if [ -n "$LOOP_PID" ]; then
        # Its own process group: the loop and the storctl it runs.
        kill -TERM -- "-$LOOP_PID" 2>/dev/null || true
        while kill -0 "$LOOP_PID" 2>/dev/null; do sleep 0.05; done
        LOOP_PID=""
    fi
}

foreground() { # seconds → "p99_us commits_per_s"
    "$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=4k --iodepth=8 \
        --runtime="${1}" --output-format=json \
        | json '"%s %s" % (d["jobs"][0]["write"]["clat_ns"]["percentile"]["99.000000"] / 1000, d["jobs"][0]["write"]["iops"])'
}

# The time (Unix seconds) of node $1's "scrub pass done" line for pass $2.
pass_done_at() {
    python3 - "$RUN/logs/storaged-$1.bench.log" "$2" <<'EOF'
import datetime, re, sys
for line in open(sys.argv[1], errors="replace"):
    if "scrub pass done" in line and re.search(r"\bpass=%s\b" % sys.argv[2], line):
        stamp = line.split()[0]
        print(datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        break
EOF
}

DEVICE_BYTES=$(python3 -c "
s = '$DEVICE_SIZE'.lower(); m = {'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30}
print(int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s))")


fio_read() { # MB/s of fio's sequential read of node $NODE's device
    "$FIO" --name=seqread --filename="$RUN/dev$NODE" --readonly --direct=1 --rw=read --bs=1M \
        --ioengine=io_uring --iodepth=1 --size="$DEVICE_BYTES" --output-format=json \
        | json 'round(d["jobs"][0]["read"]["bw_bytes"] / 1e6, 1)'
}

timed_pass() { # a priority pass of node $NODE → "MB/s pass bytes seconds"
    local t0 report pass bytes done_at
    t0=$(now)
    report=$("$BIN/storctl" scrub --cluster "$CLUSTER" --node "$NODE" --json) || [ $? -le 1 ] \
        || die "storctl scrub failed: $report"
    read -r pass bytes < <(echo "$report" | json '"%d %d" % (d["nodes"][0]["pass"]["pass"], d["nodes"][0]["pass"]["bytes_read"])')
    done_at=$(pass_done_at "$NODE" "$pass")
    [ -n "$done_at" ] || die "node $NODE's log has no 'scrub pass done' line for pass $pass"
    python3 -c "print(round($bytes / ($done_at - $t0) / 1e6, 1), $pass, $bytes, round($done_at - $t0, 3))"
}

log "starting a 6-node dev cluster with one PG in $RUN (devices of $DEVICE_SIZE)"
"$BIN/storctl" dev-cluster up --dir "$RUN" --device-size "$DEVICE_SIZE" --pgs 1 >/dev/null
log "committing $MIB MiB of 8 KiB page writes"
"$BIN/storbench" --engine=cluster --cluster "$CLUSTER" --rw=commit --bs=8k --pages-per-txn=8 \
    --iodepth=256 --size="${MIB}m" --output-format=json >/dev/null

RATES=(); FIOS=(); PAIR_RATIOS=(); PASS_BYTES=0
declare -A P99=() CPS=()
MODES=(off default ceiling full)
for round in $(seq 1 "$ROUNDS"); do
    log "round $round: fio's sequential read of node $NODE's device and its pass at full speed, $PAIRS times"
    restart_all "$RUN/scrub-full.toml"
    pair_rates=(); pair_fios=()
    for pair in $(seq 1 "$PAIRS"); do
        fio_rate=$(fio_read)
        read -r rate pass bytes seconds < <(timed_pass)
        pair_rates+=("$rate"); pair_fios+=("$fio_rate"); PASS_BYTES=$bytes
        PAIR_RATIOS+=("$(python3 -c "print(round($rate / $fio_rate, 3))")")
        log "  fio $fio_rate MB/s; pass $pass: $bytes bytes in $seconds s ($rate MB/s): ${PAIR_RATIOS[-1]}"
    done
    RATES+=("$(median "${pair_rates[@]}")"); FIOS+=("$(median "${pair_fios[@]}")")

    if [ $((round % 2)) = 1 ]; then order=(off default ceiling full); else order=(default off ceiling full); fi
    for mode in "${order[@]}"; do
        case "$mode" in
            off) restart_all "$RUN/scrub-off.toml" ;;
            default) restart_all "$RUN/scrub-default.toml" ;;
            ceiling) start_scrub_loop; sleep 0.5 ;;
            full) restart_all "$RUN/scrub-full.toml"; start_scrub_loop; sleep 0.5 ;;
        esac
        read -r p99 cps < <(foreground "$FG_RUNTIME")
        stop_scrub_loop
        P99[$mode]+="$p99 "; CPS[$mode]+="$cps "
        log "  foreground, scrub $mode: p99 $p99 µs, $(python3 -c "print(round($cps))") commits/s"
    done
done

R=$(median "${RATES[@]}"); F=$(median "${FIOS[@]}")
RATIO=$(python3 -c "print(round($(median "${PAIR_RATIOS[@]}"), 2))")
declare -A MP99=() MCPS=() RP99=()
for mode in "${MODES[@]}"; do
    # shellcheck disable=SC2086
    MP99[$mode]=$(median ${P99[$mode]}); MCPS[$mode]=$(median ${CPS[$mode]})
done
for mode in "${MODES[@]}"; do
    RP99[$mode]=$(python3 -c "print(round(${MP99[$mode]} / ${MP99[off]}, 2))")
done
echo "scrub: $ROUNDS round(s), medians; devices of $DEVICE_SIZE, a pass reads $PASS_BYTES bytes"
printf '%-52s %10s\n' \
    "scrub pass at full speed (MB/s)" "$R" \
    "fio sequential read, same device (MB/s)" "$F" \
    "scrub / fio, median of the pairs (target >= 0.80)" "$RATIO"
printf '%-44s %10s %10s %8s\n' "foreground commits, 4 KiB, iodepth 8" "p99 (µs)" "commits/s" "p99/off"
for mode in "${MODES[@]}"; do
    case "$mode" in
        off) what="scrub off" ;;
        default) what="background pass, default pace (target <= 1.1)" ;;
        ceiling) what="priority passes, default ceiling 256 MiB/s" ;;
        full) what="priority passes, full speed" ;;
    esac
    printf '%-44s %10s %10.0f %8s\n' "$what" "${MP99[$mode]}" "${MCPS[$mode]}" "${RP99[$mode]}"
done
J=$(printf '{"rounds":%s,"pairs":%s,"device_size":"%s","mib":%s,"pass_bytes":%s,"scrub_mb_per_s":%s,"fio_mb_per_s":%s,"scrub_vs_fio":%s' \
    "$ROUNDS" "$PAIRS" "$DEVICE_SIZE" "$MIB" "$PASS_BYTES" "$R" "$F" "$RATIO")
for mode in "${MODES[@]}"; do
    J+=$(printf ',"fg_p99_us_%s":%s,"fg_commits_per_s_%s":%s,"fg_p99_ratio_%s":%s' \
        "$mode" "${MP99[$mode]}" "$mode" "${MCPS[$mode]}" "$mode" "${RP99[$mode]}")
done
J+="}"
if [ "$JSON_OUT" = "-" ]; then echo "$J"; elif [ -n "$JSON_OUT" ]; then echo "$J" >"$JSON_OUT"; fi
