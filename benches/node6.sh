# Shared by benches/catch-up.sh and benches/hydrate.sh, sourced once their
# options are read (it uses their ROOT, BIN, BUILD, DIR, log and die): what
# benches/lib.sh gives, and the helpers that kill, start and watch node 6 of
# the dev cluster in RUN. Not a command of its own.
. "$ROOT/benches/lib.sh"

kill_node6() { kill_node 6; }

# NODE6_CONFIG: a `storaged run --config` file for node 6 (e.g. another
# repair_rate_bytes_per_s), to see what a setting changes. Its log is
# $RUN/logs/storaged-6.round.log.
start_node6() { start_node 6 round "${NODE6_CONFIG:-}"; }

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
