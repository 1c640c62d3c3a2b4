# Shared by the benches that run a dev cluster (catch-up.sh, hydrate.sh,
# move.sh, scrub.sh), sourced once their options are read (it uses their
# ROOT, BIN, BUILD, DIR, log and die): builds the release binaries, makes
# the run directory RUN (CLUSTER is its cluster file) with its cleanup, and
# the helpers to read JSON, take medians, and stop, start and give a new
# device to a node of the dev cluster in RUN. Not a command of its own.
if [ "$BUILD" = 1 ]; then
    log "building storaged, computed, storctl, storbench (release)"
    (cd "$ROOT" && cargo build --release -q --bin storaged --bin computed --bin storctl --bin storbench)
fi
for b in storaged computed storctl storbench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing (run without --no-build)"
done

mkdir -p "$DIR"
RUN="$(mktemp -d "$DIR/run.XXXXXX")"
CLUSTER="$RUN/cluster.toml"
# The nodes a bench started itself, by id: stopped by PID at exit.
declare -A NODE_PIDS=()
# Commands a bench adds to run first at exit (e.g. stopping a loop it started).
AT_EXIT=()
cleanup() {
    local hook pid
    for hook in "${AT_EXIT[@]}"; do "$hook" || true; done
    for pid in "${NODE_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    "$BIN/storctl" dev-cluster down --dir "$RUN" >/dev/null 2>&1 || true
    [ -n "${KEEP_RUN:-}" ] || rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

node_addr() {
    python3 - "$CLUSTER" "$1" <<'EOF'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
print(next(n["address"] for n in c["nodes"] if n["id"] == int(sys.argv[2])))
EOF
}

node_pid() { echo "${NODE_PIDS[$1]:-$(cat "$RUN/pids/storaged-$1.pid")}"; }

# kill -9 node $1 (a crash, a lost machine) and wait until it is gone.
kill_node() {
    local pid
    pid=$(node_pid "$1")
    kill -9 "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    unset "NODE_PIDS[$1]"
}

# Stop node $1 as an operator would (SIGTERM; -9 after 10 s).
stop_node() {
    local pid
    pid=$(node_pid "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill_node "$1"
}

# Start node $1 on its device, its output in $RUN/logs/storaged-$1.$2.log
# (emptied first), with `storaged run --config $3` if given; returns once
# it listens.
start_node() {
    local id="$1" logf="$RUN/logs/storaged-$1.$2.log" config=()
    [ -z "${3:-}" ] || config=(--config "$3")
    : >"$logf"
    RUST_LOG=info NO_COLOR=1 setsid "$BIN/storaged" run --device "$RUN/dev$id" --listen "$(node_addr "$id")" \
        "${config[@]}" </dev/null >"$logf" 2>&1 &
    NODE_PIDS[$id]=$!
    # Killed by PID later; not a job whose end bash reports.
    disown "$!" 2>/dev/null || true
    # `storctl dev-cluster down` stops it too.
    echo "$!" >"$RUN/pids/storaged-$id.pid"
    until grep -q "listening on" "$logf"; do
        kill -0 "${NODE_PIDS[$id]}" 2>/dev/null || die "node $id did not start: $(tail -5 "$logf")"
        sleep 0.01
    done
}

# A new disk for node $1: zeros over the whole device file of $2 MiB (a
# disk has its blocks: an O_DIRECT write into a sparse file's hole makes
# the file system allocate under it, a third of the rate, measured), then
# formatted.
new_device() {
    dd if=/dev/zero of="$RUN/dev$1" bs=1M count="$2" oflag=direct conv=notrunc status=none \
        || die "zeroing $RUN/dev$1 failed"
    "$BIN/storaged" format --device "$RUN/dev$1" --node-id "$1" >/dev/null 2>&1 \
        || die "formatting $RUN/dev$1 failed"
}

# Bytes of page versions node $1 hydrated, by its log $RUN/logs/storaged-$1.$2.log.
hydrated_bytes() {
    grep -o 'segment hydrated.*bytes=[0-9]*' "$RUN/logs/storaged-$1.$2.log" \
        | sed 's/.*bytes=//' | awk '{s+=$1} END {print s+0}'
}
