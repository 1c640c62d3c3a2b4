#!/usr/bin/env bash
# fio vs storbench --engine uring, side by side, alternating runs; prints
# medians and ratios (storbench / fio). Benchmarks are not tests: always exits 0
# unless a tool is missing or a run fails outright.
#
# Env: FILE (default /var/tmp/bench.dat, 1 GiB, created if missing),
#      ROUNDS (3), RUNTIME (seconds, 5), SIZE (1g), FIO (fio).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FILE="${FILE:-/var/tmp/bench.dat}"
ROUNDS="${ROUNDS:-3}"
RUNTIME="${RUNTIME:-5}"
SIZE="${SIZE:-1g}"
FIO="${FIO:-fio}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
STORBENCH="$CARGO_TARGET_DIR/release/storbench"

command -v "$FIO" >/dev/null || { echo "compare-uring: $FIO not found" >&2; exit 1; }
command -v python3 >/dev/null || { echo "compare-uring: python3 not found" >&2; exit 1; }
(cd "$ROOT" && cargo build --release -q -p tools --bin storbench)

if [ ! -f "$FILE" ]; then
    echo "compare-uring: creating $FILE ($SIZE, zero-filled)" >&2
    # storbench creates and zero-fills a missing file before its run.
    "$STORBENCH" --filename="$FILE" --size="$SIZE" --rw=read --bs=1m --iodepth=1 --runtime=1 >/dev/null
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# name | common fio-style flags
CASES=(
    "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
    "write-4k-dsync-qd1|--rw=write --bs=4k --iodepth=1 --sync=dsync"
    "write-4k-dsync-qd32|--rw=write --bs=4k --iodepth=32 --sync=dsync"
)

for round in $(seq 1 "$ROUNDS"); do
    for case in "${CASES[@]}"; do
        name="${case%%|*}"
        flags="${case#*|}"
        # shellcheck disable=SC2086
        "$FIO" --name="$name" --filename="$FILE" --size="$SIZE" --ioengine=io_uring --direct=1 \
            $flags --runtime="$RUNTIME" --time_based --output-format=json \
            >"$OUT/fio.$name.$round.json"
        # shellcheck disable=SC2086
        "$STORBENCH" --engine=uring --name="$name" --filename="$FILE" --size="$SIZE" \
            $flags --runtime="$RUNTIME" --output-format=json \
            >"$OUT/storbench.$name.$round.json"
        echo "round $round/$ROUNDS: $name done" >&2
    done
done

python3 - "$OUT" "$ROUNDS" "${CASES[@]}" <<'PY'
import json, statistics, sys
out, rounds, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def figures(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON object.
    job = json.loads(text[text.index("{"):])["jobs"][0]
    d = job["write"] if job["write"]["total_ios"] > 0 else job["read"]
    return d["iops"], d["clat_ns"]["percentile"]["99.000000"] / 1000.0

print(f"{'case':<22} {'fio IOPS':>10} {'storbench':>10} {'ratio':>6}   {'fio p99 us':>10} {'sb p99 us':>10}")
for case in cases:
    name = case.split("|")[0]
    fio = [figures(f"{out}/fio.{name}.{r}.json") for r in range(1, rounds + 1)]
    sb = [figures(f"{out}/storbench.{name}.{r}.json") for r in range(1, rounds + 1)]
    fio_iops = statistics.median(x[0] for x in fio)
    sb_iops = statistics.median(x[0] for x in sb)
    fio_p99 = statistics.median(x[1] for x in fio)
    sb_p99 = statistics.median(x[1] for x in sb)
    ratio = sb_iops / fio_iops if fio_iops else float("nan")
    print(f"{name:<22} {fio_iops:>10.0f} {sb_iops:>10.0f} {ratio:>6.2f}   {fio_p99:>10.1f} {sb_p99:>10.1f}")
PY
exit 0
