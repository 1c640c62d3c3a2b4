#!/usr/bin/env bash
# fio and storbench side by side, in alternating rounds on the same files;
# prints medians and the ratios storbench / fio, as a table and as JSON.
# Benchmarks are not tests: exits 0 unless a tool is missing or a run fails.
#
# Pairs (issue 2's targets in brackets):
#   uring-randread-4k-qd32   storbench --engine uring vs fio io_uring  [>= 0.95 IOPS]
#   uring-write-4k-dsync-qd1                                           [>= 0.95]
#   uring-write-4k-dsync-qd32                                          [>= 0.95]
#   log-4k-qd1   storbench --engine log --bs 4k vs fio 4k dsync write  [>= 0.90 bytes/s]
#   log-4k-qd32                                                        [>= 0.90]
#   log-128-qd32 records/s against log-4k-qd1 records/s                [>> 10x]
#
# The log pairs use one formatted device file: storbench appends to its log
# region and fio writes to its (still unused) page-store region, so both run
# on the same file and filesystem without fio destroying the log.
#
# Env: ROUNDS (3), RUNTIME (seconds, 5), DIR (/var/tmp), FIO (fio), CASES
# (space-separated names to run a subset).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS="${ROUNDS:-3}"
RUNTIME="${RUNTIME:-5}"
DIR="${DIR:-/var/tmp}"
FIO="${FIO:-fio}"
RAW="$DIR/storbench-raw.dat"
LOGDEV="$DIR/storbench-log.dat"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
STORBENCH="$CARGO_TARGET_DIR/release/storbench"

if ! command -v "$FIO" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq fio >/dev/null
    else
        echo "compare-fio: $FIO not found (apt-get install fio)" >&2; exit 1
    fi
fi
command -v python3 >/dev/null || { echo "compare-fio: python3 not found" >&2; exit 1; }
(cd "$ROOT" && cargo build --release -q --bin storbench)

# Both files are created zero-filled (and the log one formatted) by storbench itself.
[ -f "$RAW" ] || "$STORBENCH" --filename="$RAW" --size=1g --rw=read --bs=1m --iodepth=1 --runtime=1 >/dev/null
[ -f "$LOGDEV" ] || "$STORBENCH" --engine=log --filename="$LOGDEV" --size=1g --bs=4k --runtime=1 >/dev/null
FIO_LOG="--filename=$LOGDEV --offset=512m --size=256m"

# name | fio flags | storbench flags
ALL=(
    "uring-randread-4k-qd32|--filename=$RAW --size=1g --rw=randread --bs=4k --iodepth=32|--engine=uring --filename=$RAW --size=1g --rw=randread --bs=4k --iodepth=32"
    "uring-write-4k-dsync-qd1|--filename=$RAW --size=1g --rw=write --bs=4k --iodepth=1 --sync=dsync|--engine=uring --filename=$RAW --size=1g --rw=write --bs=4k --iodepth=1 --sync=dsync"
    "uring-write-4k-dsync-qd32|--filename=$RAW --size=1g --rw=write --bs=4k --iodepth=32 --sync=dsync|--engine=uring --filename=$RAW --size=1g --rw=write --bs=4k --iodepth=32 --sync=dsync"
    "log-4k-qd1|$FIO_LOG --rw=write --bs=4k --iodepth=1 --sync=dsync|--engine=log --filename=$LOGDEV --bs=4k --iodepth=1"
    "log-4k-qd32|$FIO_LOG --rw=write --bs=4k --iodepth=32 --sync=dsync|--engine=log --filename=$LOGDEV --bs=4k --iodepth=32"
    "log-128-qd32||--engine=log --filename=$LOGDEV --bs=128 --iodepth=32"
)
SELECTED=()
for c in "${ALL[@]}"; do
    name="${c%%|*}"
    if [ -z "${CASES:-}" ] || [[ " $CASES " == *" $name "* ]]; then SELECTED+=("$c"); fi
done

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for round in $(seq 1 "$ROUNDS"); do
    for c in "${SELECTED[@]}"; do
        IFS='|' read -r name fio_flags sb_flags <<<"$c"
        if [ -n "$fio_flags" ]; then
            # shellcheck disable=SC2086
            "$FIO" --name="$name" --ioengine=io_uring --direct=1 $fio_flags \
                --runtime="$RUNTIME" --time_based --output-format=json >"$OUT/fio.$name.$round.json"
        fi
        # shellcheck disable=SC2086
        "$STORBENCH" --name="$name" $sb_flags --runtime="$RUNTIME" --output-format=json \
            >"$OUT/storbench.$name.$round.json"
        echo "round $round/$ROUNDS: $name done" >&2
    done
done

python3 - "$OUT" "$ROUNDS" "${SELECTED[@]}" <<'PY'
import json, os, statistics, sys
out, rounds, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def figures(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes first
    d = job["write"] if job["write"]["total_ios"] > 0 else job["read"]
    p = d["clat_ns"]["percentile"]
    return {"iops": d["iops"], "bw_bytes": d["bw_bytes"], "p50_us": p["50.000000"] / 1e3, "p99_us": p["99.000000"] / 1e3}

def median(runs, key):
    vals = [r[key] for r in runs if r]
    return statistics.median(vals) if vals else None

rows = {}
for case in cases:
    name = case.split("|")[0]
    fio = [figures(f"{out}/fio.{name}.{r}.json") for r in range(1, rounds + 1)]
    sb = [figures(f"{out}/storbench.{name}.{r}.json") for r in range(1, rounds + 1)]
    row = {k + "_" + w: median(runs, k) for w, runs in (("fio", fio), ("storbench", sb))
           for k in ("iops", "bw_bytes", "p50_us", "p99_us")}
    # uring pairs compare IOPS; log pairs compare bytes/s (one record of --bs
    # bytes of log against one fio write of --bs bytes): both are IOPS ratios here.
    if row["iops_fio"]:
        row["ratio"] = row["iops_storbench"] / row["iops_fio"]
    rows[name] = row

def fmt(v, spec):
    return format(v, spec) if v is not None else "-"

print(f"{'case':<26} {'fio IOPS':>10} {'storbench':>10} {'ratio':>6}  {'fio p50/p99 us':>15} {'sb p50/p99 us':>15}")
for name, r in rows.items():
    fio_lat = f"{fmt(r['p50_us_fio'], '.0f')}/{fmt(r['p99_us_fio'], '.0f')}"
    sb_lat = f"{fmt(r['p50_us_storbench'], '.0f')}/{fmt(r['p99_us_storbench'], '.0f')}"
    print(f"{name:<26} {fmt(r['iops_fio'], '>10.0f')} {fmt(r['iops_storbench'], '>10.0f')} "
          f"{fmt(r.get('ratio'), '>6.2f')}  {fio_lat:>15} {sb_lat:>15}")
if "log-128-qd32" in rows and "log-4k-qd1" in rows:
    packing = rows["log-128-qd32"]["iops_storbench"] / rows["log-4k-qd1"]["iops_storbench"]
    rows["packing"] = {"records_per_s_128_qd32_over_4k_qd1": packing}
    print(f"packing: log-128-qd32 records/s = {packing:.1f} x log-4k-qd1 records/s")
print(json.dumps({"rounds": rounds, "cases": rows}))
PY
exit 0
