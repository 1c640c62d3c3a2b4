# Shared by benches/catch-up.sh and benches/hydrate.sh, sourced once their
# options are read (it uses their ROOT, BIN, BUILD, DIR, log and die): builds
# the release binaries, makes the run directory RUN with its cleanup, and
# the helpers that kill, start and watch node 6 of the dev cluster in RUN.
# Not a command of its own.
if [ "$BUILD" = 1 ]; then
    log "building storaged, computed, storctl, storbench (release)"
    (cd "$ROOT" && cargo build --release -q --bin storaged --bin computed --bin storctl --bin storbench)
fi
for b in storaged computed storctl storbench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing (run without --no-build)"
done

mkdir -p "$DIR"
RUN="$(mktemp -d "$DIR/run.XXXXXX")"
cleanup() {
    "$BIN/storctl" dev-cluster down --dir "$RUN" >/dev/null 2>&1 || true
    if [ -n "${NODE6_PID:-}" ]; then kill -9 "$NODE6_PID" 2>/dev/null || true; fi
    [ -n "${KEEP_RUN:-}" ] || rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CLUSTER="$RUN/cluster.toml"
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
now() { date +%s.%N; }

node6_addr() {
    python3 - "$CLUSTER" <<'EOF'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
print(next(n["address"] for n in c["nodes"] if n["id"] == 6))
EOF
}

kill_node6() {
    local pid
    pid="${NODE6_PID:-$(cat "$RUN/pids/storaged-6.pid")}"
    kill -9 "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    NODE6_PID=""
}

start_node6() {
    local logf="$RUN/logs/storaged-6.round.log"
    : >"$logf"
    local config=()
    # NODE6_CONFIG: a `storaged run --config` file for node 6 (e.g. another
    # repair_rate_bytes_per_s), to see what a setting changes.
    if [ -n "${NODE6_CONFIG:-}" ]; then config=(--config "$NODE6_CONFIG"); fi
    RUST_LOG=info NO_COLOR=1 setsid "$BIN/storaged" run --device "$RUN/dev6" --listen "$(node6_addr)" \
        "${config[@]}" </dev/null >"$logf" 2>&1 &
    NODE6_PID=$!
    # Killed by PID later; not a job whose end bash reports.
    disown "$NODE6_PID" 2>/dev/null || true
    until grep -q "listening on" "$logf"; do
        kill -0 "$NODE6_PID" 2>/dev/null || die "node 6 did not start: $(tail -5 "$logf")"
        sleep 0.01
    done
}

# Node 6's segment is at the PGCL, with no holes.
node6_caught_up() {
    "$BIN/storctl" status --cluster "$CLUSTER" --json 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)
ok = all(
    s.get("scl") is not None and s["scl"] >= pg["pgcl"] and not (s.get("holes") or [])
    for pg in v["pgs"] for s in pg["segments"] if s["node"] == 6
)
sys.exit(0 if ok else 1)' 2>/dev/null
}

# Wait (at most 120 s) until nodes 1 to 5 stop coalescing: their coalesced
# LSNs (from their metrics) the same two seconds apart. A write phase
# leaves them a backlog to fold into page versions, and a hydration that
# starts meanwhile measures their coalescing too.
donors_settle() {
    python3 - "$CLUSTER" <<'EOF2'
import sys, time, tomllib, urllib.request
c = tomllib.load(open(sys.argv[1], "rb"))
addrs = [n["metrics"] for n in c["nodes"] if n["id"] != 6 and "metrics" in n]
def coalesced():
    out = []
    for a in addrs:
        try:
            text = urllib.request.urlopen(f"http://{a}/metrics", timeout=2).read().decode()
        except OSError:
            out.append(None)
            continue
        out.append(sorted(l for l in text.splitlines() if l.startswith("storaged_segment_coalesced_lsn")))
    return out
deadline = time.time() + 120
before = coalesced()
while time.time() < deadline:
    time.sleep(2)
    now = coalesced()
    if now == before:
        break
    before = now
EOF2
}
