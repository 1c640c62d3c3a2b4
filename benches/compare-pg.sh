#!/usr/bin/env bash
# Commits through storbench's cluster engine against PostgreSQL and the device
# limit, on one machine in one run: prints the figures side by side and the
# ratios storbench / PostgreSQL, as a table and as JSON.
# Benchmarks are not tests: exits 0 unless a tool is missing or a run fails; a
# storbench without the cluster engine is not a failure (its rows say n/a).
#
# Rows (each round runs them in this order; --rounds N gives medians):
#   fio-dsync-qd1/qd32  fio 4k write --sync=dsync --direct=1 --ioengine=io_uring,
#                       iodepth 1 and 32, on a file in the run's directory (the
#                       device limit); IOPS, clat p50/p99/mean
#   pg-1/pg-64          pgbench -M prepared, a custom script of one single-row
#                       INSERT of a 128-byte bytea, 1 client and 64 clients
#                       (-j 2), against a PostgreSQL started for the run
#                       (initdb in the run's directory, synchronous_commit=on,
#                       fsync=on); tps, pgbench's average latency, p50/p99
#                       from the per-transaction logs (-l)
#   pg-sync-1/-64       the same against the same primary with 5 synchronous
#                       standbys on this machine (pg_basebackup of the primary,
#                       streaming replication over --pg-conn, a physical slot
#                       each, synchronous_standby_names = 'ANY 3 (s1,...,s5)'):
#                       a commit waits until 4 of the 6 copies have flushed it,
#                       as a commit through the cluster waits for 4 of 6 segments
#   storbench-1/-64     storbench --engine cluster --local-cluster 6 --rw commit
#                       --bs 128, 1 committer and 64 (--iodepth 64, or spread
#                       over --sb-numjobs jobs); commits/s, clat p50/p99/mean
# Ratios, against PostgreSQL with one copy (with the project's targets) and
# against PostgreSQL with 4 of 6 copies (the same durability as the cluster):
#   storbench commits/s at 64 / PostgreSQL tps at 64           >= 2
#   storbench p99 at 64 / PostgreSQL average latency at 64     <= 1
#   storbench p50 at 1 / PostgreSQL average latency at 1       <= 2
#   the same three over the pg-sync rows                       (no target)
#
# Usage: benches/compare-pg.sh [options]
#   --runtime S           seconds per measurement (10)
#   --rounds N            rounds of all rows, alternating; medians (1)
#   --dir DIR             where the data goes, all of it on one filesystem
#                         (/var/tmp/compare-pg); a fresh run.* directory under
#                         it is removed at the end, even on error or Ctrl-C
#   --clients N           the "64" of the rows above (64)
#   --sb-numjobs J        storbench's N committers as --iodepth N/J --numjobs J
#                         --group_reporting (1)
#   --storbench-flags S   extra flags for every storbench run (word-split)
#   --pg-conn unix|tcp    pgbench and the standbys connect over the unix socket
#                         in the run's directory or to 127.0.0.1 (unix)
#   --json FILE           also write the JSON to FILE; `-` prints it on stdout
#                         and moves the table to stderr (repeatable)
#   --no-build            use the existing target/release binaries
#   -h, --help            this text
# Installs fio, postgresql and python3 with apt-get when missing (as root).
# Running as root, PostgreSQL runs as the user postgres (created if missing);
# otherwise as the current user. Env: CARGO_TARGET_DIR, FIO (fio).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUNTIME=10
ROUNDS=1
DIR=/var/tmp/compare-pg
CLIENTS=64
SB_NUMJOBS=1
SB_FLAGS=""
PG_CONN=unix
BUILD=1
JSON_OUTS=()
FIO="${FIO:-fio}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
STORBENCH="$CARGO_TARGET_DIR/release/storbench"

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "compare-pg: $*" >&2; exit 1; }
log() { echo "compare-pg: $*" >&2; }

while [ $# -gt 0 ]; do
    opt="$1"; val=""; has_val=0
    case "$opt" in
        --*=*) val="${opt#*=}"; opt="${opt%%=*}"; has_val=1 ;;
    esac
    case "$opt" in
        --runtime|--rounds|--dir|--clients|--sb-numjobs|--storbench-flags|--pg-conn|--json)
            if [ "$has_val" = 0 ]; then
                [ $# -ge 2 ] || die "$opt needs a value (see --help)"
                val="$2"; shift
            fi ;;
        --no-build|-h|--help)
            [ "$has_val" = 0 ] || die "$opt takes no value" ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    case "$opt" in
        --runtime) RUNTIME="$val" ;;
        --rounds) ROUNDS="$val" ;;
        --dir) DIR="$val" ;;
        --clients) CLIENTS="$val" ;;
        --sb-numjobs) SB_NUMJOBS="$val" ;;
        --storbench-flags) SB_FLAGS="$val" ;;
        --pg-conn) PG_CONN="$val" ;;
        --json) JSON_OUTS+=("$val") ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
    esac
    shift
done
for n in RUNTIME ROUNDS CLIENTS SB_NUMJOBS; do
    [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "--$(echo "$n" | tr 'A-Z_' 'a-z-') must be a positive integer, not '${!n}'"
done
[ "$CLIENTS" -ge 2 ] || die "--clients must be at least 2"
[ $((CLIENTS % SB_NUMJOBS)) = 0 ] || die "--clients ($CLIENTS) must be a multiple of --sb-numjobs ($SB_NUMJOBS)"
case "$PG_CONN" in unix|tcp) ;; *) die "--pg-conn is unix or tcp, not '$PG_CONN'" ;; esac
JSON_STDOUT=0
for j in "${JSON_OUTS[@]+"${JSON_OUTS[@]}"}"; do [ "$j" != - ] || JSON_STDOUT=1; done

# ---------------------------------------------------------------- tools
IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
APT_UPDATED=0
apt_install() { # packages...
    if [ "$IS_ROOT" != 1 ] || ! command -v apt-get >/dev/null; then
        die "missing $*; install it (apt-get install $*) or run as root"
    fi
    local aptlog; aptlog="$(mktemp)"
    log "installing $* with apt-get"
    if { [ "$APT_UPDATED" = 1 ] || apt-get update -qq; } >"$aptlog" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "$@" >>"$aptlog" 2>&1; then
        APT_UPDATED=1; rm -f "$aptlog"
    else
        cat "$aptlog" >&2; rm -f "$aptlog"; die "apt-get install $* failed"
    fi
}
pg_bindir() { find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }

command -v "$FIO" >/dev/null || apt_install fio
command -v python3 >/dev/null || apt_install python3
PGBIN="$(pg_bindir)"
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/pgbench" ] || [ ! -x "$PGBIN/initdb" ]; then
    # Debian's package creates and starts a "main" cluster on port 5432
    # unless told not to; this script wants only its own.
    if [ "$IS_ROOT" = 1 ]; then
        mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/zz-compare-pg.conf
    fi
    apt_install postgresql
    rm -f /etc/postgresql-common/createcluster.d/zz-compare-pg.conf
    PGBIN="$(pg_bindir)"
    if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/pgbench" ]; then
        die "no pgbench under /usr/lib/postgresql/*/bin after installing postgresql"
    fi
fi
PGRUN=() # how to run PostgreSQL's server-side programs: never as root
if [ "$IS_ROOT" = 1 ]; then
    if ! id -u postgres >/dev/null 2>&1; then
        log "creating the system user postgres"
        useradd --system --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin postgres
    fi
    PGRUN=(runuser -u postgres --)
fi

if [ "$BUILD" = 1 ]; then
    log "building storbench, storaged, computed (release)"
    (cd "$ROOT" && cargo build --release -q --bin storbench --bin storaged --bin computed)
fi

# ---------------------------------------------------------------- cleanup
RUN=""          # this run's directory under $DIR; everything goes in it
MADE_DIR=0      # whether this script created $DIR
CHILD=""        # the measurement running now: its own session and process group
CHILD_STOP="TERM KILL"  # the signals that stop it, in order
PG_UP=0
STANDBYS="s1 s2 s3 s4 s5"  # application names, slot names and data directories under $PGDIR
SYNC_QUORUM=3              # ANY 3 of the 5, plus the primary: 4 of 6 copies
STANDBYS_UP=""             # the standbys running now

# shellcheck disable=SC2317  # reached from the traps
stop_child() {
    [ -n "$CHILD" ] || return 0
    local sig
    for sig in $CHILD_STOP; do
        kill -0 -- "-$CHILD" 2>/dev/null || break
        kill -"$sig" -- "-$CHILD" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 -- "-$CHILD" 2>/dev/null || break
            sleep 0.2
        done
    done
    wait "$CHILD" 2>/dev/null || true
    CHILD=""
}
# shellcheck disable=SC2317
stop_pgdata() { # data directory
    "${PGRUN[@]}" "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 30 stop >/dev/null 2>&1 ||
        "${PGRUN[@]}" "$PGBIN/pg_ctl" -D "$1" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
    if [ -f "$1/postmaster.pid" ]; then
        local pid; pid="$(head -n 1 "$1/postmaster.pid")"
        if [[ "$pid" =~ ^[0-9]+$ ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
}
# shellcheck disable=SC2317
stop_standbys() {
    local s
    for s in $STANDBYS_UP; do stop_pgdata "$PGDIR/$s"; done
    STANDBYS_UP=""
}
# shellcheck disable=SC2317
stop_pg() {
    [ "$PG_UP" = 1 ] || return 0
    PG_UP=0
    stop_pgdata "$PGDATA"
}
# shellcheck disable=SC2317
cleanup() {
    trap - EXIT INT TERM
    stop_child
    stop_standbys
    stop_pg
    if [ -n "$RUN" ]; then rm -rf "$RUN"; fi
    if [ "$MADE_DIR" = 1 ]; then rmdir "$DIR" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# Runs "$@" in its own session (so that all it starts can be stopped as one
# group), stdout to $1's file, stderr to $2's; returns its exit status.
# Background jobs of a script start with SIGINT ignored; storbench installs its
# own handler (it brings its cluster down on Ctrl-C), so it gets INT first.
run_measured() { # out err cmd...
    local out="$1" err="$2" rc=0; shift 2
    case "$*" in *"$STORBENCH"*) CHILD_STOP="INT TERM KILL" ;; *) CHILD_STOP="TERM KILL" ;; esac
    setsid "$@" >"$out" 2>"$err" </dev/null &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# ---------------------------------------------------------------- the run's directory
[ -d "$DIR" ] || { mkdir -p "$DIR"; MADE_DIR=1; }
DIR="$(cd "$DIR" && pwd)"
RUN="$(mktemp -d "$DIR/run.XXXXXX")"
chmod 755 "$RUN"
OUT="$RUN/out"; mkdir "$OUT"
FSTYPE="$(findmnt -n -o FSTYPE -T "$RUN" 2>/dev/null || stat -f -c %T "$RUN")"
[ "$FSTYPE" != tmpfs ] || log "warning: $DIR is on tmpfs: nothing here measures a disk"

# PostgreSQL's directory belongs to the user it runs as, who must reach it.
PGDIR="$RUN/pg"; PGDATA="$PGDIR/data"
mkdir "$PGDIR"
if [ "$IS_ROOT" = 1 ]; then chown postgres: "$PGDIR"; fi
chmod 700 "$PGDIR"
"${PGRUN[@]}" test -w "$PGDIR" ||
    die "user postgres cannot write $PGDIR: a parent directory is not searchable by others; use --dir elsewhere"
[ ${#PGDIR} -lt 90 ] || die "$PGDIR is too long for a unix socket path; use a shorter --dir"

# ---------------------------------------------------------------- PostgreSQL
PGPORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log "initdb in $PGDATA (port $PGPORT)"
"${PGRUN[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C >"$OUT/initdb.log" 2>&1 ||
    { cat "$OUT/initdb.log" >&2; die "initdb failed"; }
MAX_CONN=$((CLIENTS + 20 > 100 ? CLIENTS + 20 : 100))
cat >>"$PGDATA/postgresql.conf" <<EOF

# compare-pg.sh: defaults except where to listen and the memory
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$PGDIR'
max_connections = $MAX_CONN
shared_buffers = 256MB
fsync = on
synchronous_commit = on
EOF
pg_start() {
    "${PGRUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDIR/server.log" -w -t 60 start >/dev/null 2>&1 || {
        cat "$PGDIR/server.log" >&2 2>/dev/null || true
        die "PostgreSQL did not start (log above)"
    }
    PG_UP=1
}
if [ "$PG_CONN" = unix ]; then PGHOST_ARG="$PGDIR"; else PGHOST_ARG=127.0.0.1; fi
psql_c() { # sql [psql flags...]
    local sql="$1"; shift
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST_ARG" -p "$PGPORT" -U postgres -d postgres "$@" -c "$sql"
}
pg_start
psql_c "create table t (id bigserial primary key, v bytea not null)" >/dev/null
PG_VERSION="$("$PGBIN/postgres" --version)"

# The standbys: copies of the primary taken now, each with a physical slot so
# the primary keeps the WAL a standby misses while it is stopped. They run
# only during the pg-sync rows, so they do not load the other rows.
if [ "$PG_CONN" = unix ]; then REPL_HOST="$PGDIR"; else REPL_HOST=127.0.0.1; fi
declare -A STANDBY_PORT
for s in $STANDBYS; do
    STANDBY_PORT[$s]="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    log "pg_basebackup into $PGDIR/$s (port ${STANDBY_PORT[$s]})"
    "${PGRUN[@]}" "$PGBIN/pg_basebackup" -h "$REPL_HOST" -p "$PGPORT" -U postgres -D "$PGDIR/$s" \
        -X stream -c fast -C -S "$s" >"$OUT/basebackup.$s.log" 2>&1 ||
        { cat "$OUT/basebackup.$s.log" >&2; die "pg_basebackup for standby $s failed"; }
    # The copy has the primary's postgresql.conf (same settings, fsync and
    # max_connections included); a standby differs in its port and its
    # conninfo. postgresql.auto.conf is read last, so these lines win.
    "${PGRUN[@]}" tee -a "$PGDIR/$s/postgresql.auto.conf" >/dev/null <<CONF
port = ${STANDBY_PORT[$s]}
primary_conninfo = 'host=$REPL_HOST port=$PGPORT user=postgres application_name=$s'
primary_slot_name = '$s'
CONF
    "${PGRUN[@]}" touch "$PGDIR/$s/standby.signal"
done
stop_pg

# Starts the standbys, waits until all of them stream from the primary (a
# standby streams once it has caught up), then makes every commit wait for
# SYNC_QUORUM of them.
standbys_start() {
    local s n=0
    for s in $STANDBYS; do
        STANDBYS_UP="$STANDBYS_UP $s"
        "${PGRUN[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/$s" -l "$PGDIR/$s.log" -w -t 120 start >/dev/null 2>&1 || {
            cat "$PGDIR/$s.log" >&2 2>/dev/null || true
            die "standby $s did not start (log above)"
        }
    done
    for _ in $(seq 1 600); do
        n="$(psql_c "select count(*) from pg_stat_replication where state = 'streaming'" -t -A)"
        [ "$n" != 5 ] || break
        sleep 0.2
    done
    [ "$n" = 5 ] || die "$n of 5 standbys stream after 120 s (logs: $PGDIR/s?.log)"
    local names; names="$(echo "$STANDBYS" | tr ' ' ',')"
    psql_c "alter system set synchronous_standby_names = 'ANY $SYNC_QUORUM ($names)'" >/dev/null
    psql_c "select pg_reload_conf()" >/dev/null
    for _ in $(seq 1 100); do
        n="$(psql_c "select count(*) from pg_stat_replication where sync_state = 'quorum'" -t -A)"
        [ "$n" != 5 ] || break
        sleep 0.1
    done
    [ "$n" = 5 ] || die "synchronous_standby_names did not take effect ($n of 5 standbys in the quorum)"
}
# Back to one copy: commits stop waiting for standbys before they go.
standbys_stop() {
    psql_c "alter system reset synchronous_standby_names" >/dev/null
    psql_c "select pg_reload_conf()" >/dev/null
    stop_standbys
}
# One row of 128 bytes per transaction, a different value each time.
cat >"$RUN/insert.sql" <<'EOF'
\set r random(1, 2147483647)
insert into t (v) values (decode(repeat(md5(:r::text), 8), 'hex'));
EOF

# ---------------------------------------------------------------- measurements
FIODAT="$RUN/fio.dat"
fio_run() { # name iodepth round
    run_measured "$OUT/$1.$3.json" "$OUT/$1.$3.err" \
        "$FIO" --name="$1" --filename="$FIODAT" --size=256m --rw=write --bs=4k --iodepth="$2" \
        --sync=dsync --direct=1 --ioengine=io_uring --runtime="$RUNTIME" --time_based \
        --output-format=json || { cat "$OUT/$1.$3.err" >&2; die "fio $1 failed"; }
}
pg_run() { # name clients round
    local jobs=1
    [ "$2" -lt 2 ] || jobs=2
    mkdir "$OUT/$1.$3.txlog"
    run_measured "$OUT/$1.$3.txt" "$OUT/$1.$3.err" \
        "$PGBIN/pgbench" -n -h "$PGHOST_ARG" -p "$PGPORT" -U postgres -M prepared -f "$RUN/insert.sql" \
        -c "$2" -j "$jobs" -T "$RUNTIME" -l --log-prefix="$OUT/$1.$3.txlog/tx" postgres ||
        { cat "$OUT/$1.$3.err" >&2; die "pgbench $1 failed"; }
}
SB_STATE=ok  # ok, notbuilt
sb_run() { # name committers round
    local name="$1" n="$2" round="$3" rc=0 shape
    if [ "$SB_STATE" = notbuilt ]; then echo notbuilt >"$OUT/$name.$round.status"; return 0; fi
    if [ ! -x "$STORBENCH" ]; then
        log "no $STORBENCH (build it, or run without --no-build)"
        SB_STATE=notbuilt; echo notbuilt >"$OUT/$name.$round.status"; return 0
    fi
    if [ "$n" = 1 ]; then shape=(--iodepth 1)
    else shape=(--iodepth $((n / SB_NUMJOBS)) --numjobs "$SB_NUMJOBS" --group_reporting); fi
    mkdir -p "$RUN/sb"
    # shellcheck disable=SC2086
    run_measured "$OUT/$name.$round.json" "$OUT/$name.$round.err" \
        env TMPDIR="$RUN/sb" "$STORBENCH" --name="$name" --engine cluster --local-cluster 6 --rw commit \
        --bs 128 "${shape[@]}" --runtime "$RUNTIME" --output-format=json $SB_FLAGS || rc=$?
    if [ "$rc" = 0 ]; then
        echo ok >"$OUT/$name.$round.status"
    elif [ "$rc" = 2 ] || grep -Eq "not built|unexpected argument '--local-cluster'|invalid value 'cluster'" "$OUT/$name.$round.err"; then
        log "storbench rejects the cluster engine: $(head -n 1 "$OUT/$name.$round.err")"
        SB_STATE=notbuilt; echo notbuilt >"$OUT/$name.$round.status"
    else
        log "storbench $name failed (exit $rc):"; tail -n 20 "$OUT/$name.$round.err" >&2
        echo failed >"$OUT/$name.$round.status"
    fi
}

for round in $(seq 1 "$ROUNDS"); do
    fio_run fio-dsync-qd1 1 "$round"
    log "round $round/$ROUNDS: fio 4k dsync qd1 done"
    fio_run fio-dsync-qd32 32 "$round"
    log "round $round/$ROUNDS: fio 4k dsync qd32 done"
    pg_start
    pg_run pg-1 1 "$round"
    log "round $round/$ROUNDS: pgbench 1 client done"
    pg_run pg-n "$CLIENTS" "$round"
    log "round $round/$ROUNDS: pgbench $CLIENTS clients done"
    standbys_start
    pg_run pg-sync-1 1 "$round"
    log "round $round/$ROUNDS: pgbench 1 client, 5 synchronous standbys done"
    pg_run pg-sync-n "$CLIENTS" "$round"
    log "round $round/$ROUNDS: pgbench $CLIENTS clients, 5 synchronous standbys done"
    standbys_stop
    stop_pg
    sb_run sb-1 1 "$round"
    sb_run sb-n "$CLIENTS" "$round"
    log "round $round/$ROUNDS: storbench ($SB_STATE) done"
done

# ---------------------------------------------------------------- report
SUMMARY="$RUN/summary.json"
TABLE_FD=1; [ "$JSON_STDOUT" = 0 ] || TABLE_FD=2
python3 - "$OUT" "$ROUNDS" "$RUNTIME" "$CLIENTS" "$SB_NUMJOBS" "$PG_CONN" "$PG_VERSION" \
    "$("$FIO" --version)" "$FSTYPE" "$DIR" "$SUMMARY" <<'PY' >&"$TABLE_FD"
import glob, json, os, platform, re, statistics, sys
(out, rounds, runtime, clients, numjobs, pg_conn, pg_version, fio_version,
 fstype, data_dir, summary) = sys.argv[1:]
rounds, runtime, clients, numjobs = int(rounds), int(runtime), int(clients), int(numjobs)

def load_json(path):
    with open(path) as f:
        text = f.read()
    return json.loads(text[text.index("{"):])  # fio may print notes first

def fio_shaped(path):
    w = load_json(path)["jobs"][0]["write"]
    c = w["clat_ns"]
    return {"ops_per_s": w["iops"], "mean_us": c["mean"] / 1e3,
            "p50_us": c["percentile"]["50.000000"] / 1e3, "p99_us": c["percentile"]["99.000000"] / 1e3}

def pgbench(name, r):
    with open(f"{out}/{name}.{r}.txt") as f:
        text = f.read()
    tps = float(re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", text, re.M).group(1))
    avg_ms = float(re.search(r"^latency average = ([0-9.]+) ms", text, re.M).group(1))
    lat = []
    for path in glob.glob(f"{out}/{name}.{r}.txlog/tx*"):
        with open(path) as f:
            lat.extend(int(line.split()[2]) for line in f if line.strip())
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None
    return {"ops_per_s": tps, "mean_us": avg_ms * 1e3, "p50_us": pct(0.50), "p99_us": pct(0.99),
            "transactions_logged": len(lat)}

def median_row(runs):
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    row = {}
    for k in keys:
        vals = [r[k] for r in runs if r.get(k) is not None]
        row[k] = statistics.median(vals) if vals else None
    if len(runs) > 1:
        row["rounds"] = runs
    return row

rows = {}
for name, label in (("fio-dsync-qd1", "fio 4k write dsync qd1"), ("fio-dsync-qd32", "fio 4k write dsync qd32")):
    rows[name] = dict(label=label, unit="IOPS", **median_row([fio_shaped(f"{out}/{name}.{r}.json") for r in range(1, rounds + 1)]))
for name, key, label in (("pg-1", "pg-1", "PostgreSQL pgbench 1 client"),
                         ("pg-n", f"pg-{clients}", f"PostgreSQL pgbench {clients} clients"),
                         ("pg-sync-1", "pg-sync-1", "PostgreSQL 4 of 6 copies, 1 client"),
                         ("pg-sync-n", f"pg-sync-{clients}", f"PostgreSQL 4 of 6 copies, {clients} clients")):
    rows[key] = dict(label=label, unit="tps", **median_row([pgbench(name, r) for r in range(1, rounds + 1)]))
sb_reason = None
for name, key, label in (("sb-1", "storbench-1", "storbench cluster 1 committer"),
                         ("sb-n", f"storbench-{clients}", f"storbench cluster {clients} committers")):
    states = [open(f"{out}/{name}.{r}.status").read().strip() for r in range(1, rounds + 1)]
    ok = [fio_shaped(f"{out}/{name}.{r}.json") for r, s in zip(range(1, rounds + 1), states) if s == "ok"]
    if ok:
        rows[key] = dict(label=label, unit="commits/s", **median_row(ok))
        if len(ok) < rounds:
            rows[key]["failed_rounds"] = rounds - len(ok)
    else:
        status = "n/a" if "notbuilt" in states else "failed"
        sb_reason = "storbench cluster engine not built" if status == "n/a" else "storbench failed"
        rows[key] = {"label": label, "unit": "commits/s", "status": status, "reason": sb_reason}

def ratio(a, ka, b, kb, target=None, op=None):
    x, y = rows[a].get(ka), rows[b].get(kb)
    goal = f"{op} {target}" if target is not None else None
    if x is None or y is None or not y:
        return {"value": None, "target": goal, "met": None, "reason": sb_reason}
    v = x / y
    met = None if target is None else (v >= target if op == ">=" else v <= target)
    return {"value": v, "target": goal, "met": met}

sbn, pgn, pgsn = f"storbench-{clients}", f"pg-{clients}", f"pg-sync-{clients}"
ratios = {
    f"commits_per_s_{clients}": dict(ratio(sbn, "ops_per_s", pgn, "ops_per_s", 2, ">="),
        label=f"storbench commits/s / PostgreSQL tps, {clients}"),
    f"p99_{clients}_vs_pg_mean_{clients}": dict(ratio(sbn, "p99_us", pgn, "mean_us", 1, "<="),
        label=f"storbench p99 / PostgreSQL avg latency, {clients}"),
    "p50_1_vs_pg_mean_1": dict(ratio("storbench-1", "p50_us", "pg-1", "mean_us", 2, "<="),
        label="storbench p50 / PostgreSQL avg latency, 1"),
    f"commits_per_s_{clients}_vs_pg_sync": dict(ratio(sbn, "ops_per_s", pgsn, "ops_per_s"),
        label=f"storbench commits/s / PostgreSQL 4-of-6 tps, {clients}"),
    f"p99_{clients}_vs_pg_sync_mean_{clients}": dict(ratio(sbn, "p99_us", pgsn, "mean_us"),
        label=f"storbench p99 / PostgreSQL 4-of-6 avg latency, {clients}"),
    "p50_1_vs_pg_sync_mean_1": dict(ratio("storbench-1", "p50_us", "pg-sync-1", "mean_us"),
        label="storbench p50 / PostgreSQL 4-of-6 avg latency, 1"),
}

def f(v, spec=".0f"):
    return format(v, spec) if v is not None else "-"

print(f"{'':<40} {'ops/s':>10} {'mean us':>9} {'p50 us':>9} {'p99 us':>9}")
for r in rows.values():
    if "status" in r:
        text = f"n/a ({r['reason']})" if r["status"] == "n/a" else "failed (see the messages above)"
        print(f"{r['label']:<40} {text}")
    else:
        print(f"{r['label']:<40} {f(r['ops_per_s']):>10} {f(r['mean_us']):>9} {f(r['p50_us']):>9} {f(r['p99_us']):>9}  {r['unit']}")
print()
for r in ratios.values():
    if r["value"] is None:
        verdict = f"n/a ({r['reason']})"
    else:
        verdict = f"{r['value']:.2f}"
        if r["target"] is not None:
            verdict += f"  target {r['target']}: {'met' if r['met'] else 'NOT met'}"
    print(f"{r['label']:<56} {verdict}")
print(f"\n{rounds} round(s) x {runtime} s, medians; {os.cpu_count()} CPUs, {fstype} under {data_dir}; "
      f"{pg_version}; pgbench over {pg_conn}")

doc = {"runtime_s": runtime, "rounds": rounds, "clients": clients, "storbench_numjobs": numjobs,
       "pg_conn": pg_conn, "dir": data_dir, "fstype": fstype, "cpus": os.cpu_count(),
       "kernel": platform.release(), "postgres": pg_version, "fio": fio_version,
       "rows": rows, "ratios": ratios}
with open(summary, "w") as fh:
    json.dump(doc, fh)
PY
for j in "${JSON_OUTS[@]+"${JSON_OUTS[@]}"}"; do
    if [ "$j" = - ]; then cat "$SUMMARY"; echo; else cp "$SUMMARY" "$j"; fi
done
if grep -qx failed "$OUT"/sb-*.status; then exit 1; fi
exit 0
