//! Helpers for the real-process tests: running a tool with a time limit,
//! a dev cluster in a temp dir that is stopped (by PID) on drop, finding a
//! test's processes, and stdout into a pipe nobody reads.
#![allow(dead_code)] // each test crate uses a part

use std::net::SocketAddr;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Any one command of a test, at most.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub const STORCTL: &str = env!("CARGO_BIN_EXE_storctl");
pub const STORBENCH: &str = env!("CARGO_BIN_EXE_storbench");

/// Builds `storaged` and `computed` next to storctl (the dev cluster runs
/// the ones found there) if they are missing or older than their sources:
/// `cargo test -p tools` builds storctl, not them, and a test would
/// otherwise run daemons built from other code than it was. Once a
/// process; `cargo test --workspace` has just built them, so it never
/// builds here. (A change to a test module under `src` leaves them older
/// with nothing to rebuild: cargo then checks and returns, each process.)
pub fn ensure_daemons() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let dir = Path::new(STORCTL).parent().unwrap().to_owned();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let sources: Vec<PathBuf> = [
            "storaged/src",
            "storaged/Cargo.toml",
            "computed/src",
            "computed/Cargo.toml",
        ]
        .iter()
        .map(|p| workspace.join(p))
        .collect();
        let newest_source = newest_mtime(&sources);
        let stale = ["storaged", "computed"].iter().any(|bin| {
            std::fs::metadata(dir.join(bin))
                .and_then(|m| m.modified())
                .map_or(true, |built| Some(built) < newest_source)
        });
        if !stale {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "storaged", "-p", "computed"]);
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                build.arg("--release");
            }
            Some(profile) => {
                build.args(["--profile", profile]);
            }
        }
        if let Some(target) = dir.parent() {
            build.arg("--target-dir").arg(target);
        }
        let status = build.status().unwrap();
        assert!(status.success(), "building storaged and computed");
    });
}

/// The newest modification time of any file under `paths`.
fn newest_mtime(paths: &[PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut todo: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::metadata(&p) else { continue };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                todo.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(m) = meta.modified() {
            newest = newest.max(Some(m));
        }
    }
    newest
}

/// Waits for `child` at most `limit`; kills it by PID past that.
pub fn wait_bounded(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: our own child, by PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("pid {pid} did not finish within {limit:?}");
        }
    }
}

/// Runs a tool with a time limit; killed by PID past it.
pub fn run(bin: &str, args: &[&str]) -> Output {
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, COMMAND_TIMEOUT)
}

/// `storbench --verify-only` of a journal against the cluster of `cluster_file`.
pub fn verify_only(cluster_file: &str, journal: &Path) -> Output {
    let journal = journal.to_string_lossy();
    run(
        STORBENCH,
        &[
            "--engine=cluster",
            "--cluster",
            cluster_file,
            "--verify-only",
            "--verify-journal",
            &journal,
        ],
    )
}

pub fn storctl(args: &[&str]) -> Output {
    run(STORCTL, args)
}

pub fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// The write end of a pipe whose read end is already closed: whatever is
/// written to it fails with EPIPE, as `cmd | head -c0` would.
pub fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both fds on success; each is owned once below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds from pipe2, owned here and nowhere else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

/// Runs a tool with stdout into a closed pipe and stderr captured.
pub fn run_into_closed_pipe(bin: &str, args: &[&str]) -> Output {
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, COMMAND_TIMEOUT)
}

/// The process ended as a closed pipe ends `cat`: by SIGPIPE, saying nothing of it.
pub fn assert_quiet_sigpipe(what: &str, out: &Output) {
    use std::os::unix::process::ExitStatusExt as _;
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{what}: {:?}: {stderr}",
        out.status
    );
    for noise in ["panicked", "failed printing", "Broken pipe", "error"] {
        assert!(!stderr.contains(noise), "{what}: `{noise}` on stderr: {stderr}");
    }
}

pub fn signal_of(status: &ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt as _;
    status.signal()
}

/// Whether `pid` is gone (or a zombie: exited, not yet reaped).
pub fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

/// PIDs of live processes whose command line mentions `dir`.
pub fn procs_in(dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid_gone(pid) {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmd
            .split(|&b| b == 0)
            .any(|a| String::from_utf8_lossy(a).starts_with(&needle))
        {
            out.push(pid);
        }
    }
    out
}

/// Polls `done` every 50 ms for at most `limit`.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// A temp dir for a dev cluster, with everything in it stopped on drop.
pub struct ClusterDir {
    dir: tempfile::TempDir,
}

impl ClusterDir {
    pub fn new() -> ClusterDir {
        ensure_daemons();
        // On a disk filesystem: the devices are opened with O_DIRECT.
        let dir = tempfile::Builder::new()
            .prefix("devcluster-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        ClusterDir { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    pub fn arg(&self) -> String {
        self.path().to_string_lossy().into_owned()
    }

    pub fn cluster_file(&self) -> String {
        self.path().join("cluster.toml").to_string_lossy().into_owned()
    }

    pub fn up(&self, extra: &[&str]) -> Output {
        let dir = self.arg();
        let mut args = vec!["dev-cluster", "up", "--dir", &dir, "--device-size", "32m"];
        args.extend_from_slice(extra);
        storctl(&args)
    }

    pub fn pid(&self, name: &str) -> i32 {
        pid_in(&self.path(), name).unwrap()
    }
}

/// The PID in `dir/pids/NAME.pid`, if the file is there and whole.
pub fn pid_in(dir: &Path, name: &str) -> Option<i32> {
    let p = dir.join("pids").join(format!("{name}.pid"));
    std::fs::read_to_string(&p).ok()?.trim().parse().ok()
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        let _ = Command::new(STORCTL)
            .args(["dev-cluster", "down", "--dir", &self.arg()])
            .output();
        for pid in procs_in(&self.path()) {
            // SAFETY: processes started for this test's directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

// Handling the nodes of a dev cluster one by one.

pub fn storaged_bin() -> std::path::PathBuf {
    Path::new(STORCTL).with_file_name("storaged")
}

/// A dev cluster whose computed holds little for a lagging segment, so a
/// node down for a few seconds of commits needs repair to catch up.
pub fn cluster_with_small_hold() -> ClusterDir {
    let c = ClusterDir::new();
    let out = c.up(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let down = storctl(&["dev-cluster", "down", "--dir", &c.arg()]);
    assert_eq!(down.status.code(), Some(0), "{}", text(&down.stderr));
    let file = c.cluster_file();
    let toml = std::fs::read_to_string(&file).unwrap();
    let toml = toml.replacen("[computed]\n", "[computed]\npg_held_bytes_max = \"64k\"\n", 1);
    std::fs::write(&file, toml).unwrap();
    let out = storctl(&["dev-cluster", "up", "--dir", &c.arg(), "--keep"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    c
}

pub fn node_address(c: &ClusterDir, node: u64) -> SocketAddr {
    let cluster = computed::cluster::Cluster::load(Path::new(&c.cluster_file())).unwrap();
    cluster.nodes.iter().find(|n| n.id == node).unwrap().address
}

pub fn kill_node(c: &ClusterDir, node: u64) {
    let pid = node_pid(c, node).unwrap_or_else(|| c.pid(&format!("storaged-{node}")));
    // SAFETY: a daemon this test started, by its PID.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(10), || pid_gone(pid)),
        "storaged-{node} did not die"
    );
}

/// The PID of the storaged serving `DIR/devN`, however it was started.
pub fn node_pid(c: &ClusterDir, node: u64) -> Option<i32> {
    let dev = format!("{}/dev{node}", c.arg());
    procs_in(&c.path()).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmd| cmd.split(|&b| b == 0).any(|a| a == dev.as_bytes()))
            .unwrap_or(false)
    })
}

/// Start node `node` again on its device, as the dev cluster did; returns
/// once it listens.
pub fn start_node(c: &ClusterDir, node: u64) {
    start_node_with(c, node, &[]);
}

/// [`start_node`] with `extra` arguments to `storaged run`.
pub fn start_node_with(c: &ClusterDir, node: u64, extra: &[&str]) {
    let dev = format!("{}/dev{node}", c.arg());
    let addr = node_address(c, node).to_string();
    let mut args = vec!["run", "--device", &dev, "--listen", &addr];
    args.extend_from_slice(extra);
    spawn_daemon(c, &format!("storaged-{node}"), &storaged_bin(), &args);
}

/// Start computed again on the cluster file, as the dev cluster did;
/// returns once it listens (it serves once it has recovered the volume).
pub fn start_computed(c: &ClusterDir) {
    let cluster = computed::cluster::Cluster::load(Path::new(&c.cluster_file())).unwrap();
    let file = c.cluster_file();
    let addr = cluster.computed_address.to_string();
    spawn_daemon(
        c,
        "computed",
        &Path::new(STORCTL).with_file_name("computed"),
        &["run", "--cluster", &file, "--listen", &addr],
    );
}

/// Run `program` with `args` in the background, its output in
/// `DIR/logs/NAME.again.log`, until that log says it listens.
fn spawn_daemon(c: &ClusterDir, name: &str, program: &Path, args: &[&str]) {
    let log = c.path().join("logs").join(format!("{name}.again.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    // Reaped by the ClusterDir's drop (by PID), like the dev cluster's own.
    std::mem::forget(child);
    let up = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
    });
    assert!(
        up,
        "{name} did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// The last lines of a daemon's log, for a failure's message.
pub fn log_tail(c: &ClusterDir, name: &str) -> String {
    let text = std::fs::read_to_string(c.path().join("logs").join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- {name}.log:\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

pub fn status(c: &ClusterDir) -> serde_json::Value {
    let out = storctl(&["status", "--cluster", &c.cluster_file(), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Commits for a few seconds, each acknowledged one journaled; with
/// `kill_midway`, that node is killed (SIGKILL) half way through.
pub fn commit_with_journal(c: &ClusterDir, journal: &Path, seconds: u64, kill_midway: Option<u64>) {
    let runtime = format!("--runtime={seconds}");
    let journal = journal.to_string_lossy();
    let child = Command::new(STORBENCH)
        .args([
            "--engine=cluster",
            "--cluster",
            &c.cluster_file(),
            &runtime,
            "--iodepth=8",
            "--bs=4096",
            "--verify",
            "--verify-journal",
            &journal,
            "--output-format=json",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(node) = kill_midway {
        std::thread::sleep(Duration::from_millis(seconds * 500));
        kill_node(c, node);
    }
    let out = wait_bounded(child, COMMAND_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Every segment of `node` is at its PG's PGCL, with no holes.
pub fn caught_up(c: &ClusterDir, node: u64) -> bool {
    let v = status(c);
    let Some(pgs) = v["pgs"].as_array() else { return false };
    pgs.iter().all(|pg| {
        let pgcl = pg["pgcl"].as_u64().unwrap_or(u64::MAX);
        pg["segments"].as_array().is_some_and(|segs| {
            segs.iter().filter(|s| s["node"] == node).all(|s| {
                s["scl"].as_u64().is_some_and(|scl| scl >= pgcl) && s["holes"].as_array().is_none_or(|h| h.is_empty())
            })
        })
    })
}

/// With `down` stopped for good, the journal's commits all read back and
/// new commits are acknowledged (they need `node` for 4 of 6).
pub fn carries_the_quorum(c: &ClusterDir, node: u64, down: [u64; 2], journal: &Path) {
    for other in down {
        kill_node(c, other);
    }
    let verify = verify_only(&c.cluster_file(), journal);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify.stderr));
    assert!(
        text(&verify.stderr).contains("0 missing, 0 wrong"),
        "{}",
        text(&verify.stderr)
    );
    let more = run(
        STORBENCH,
        &[
            "--engine=cluster",
            "--cluster",
            &c.cluster_file(),
            "--runtime=2",
            "--iodepth=4",
            "--bs=512",
            "--verify",
        ],
    );
    assert_eq!(
        more.status.code(),
        Some(0),
        "commits with node {node} and three others: {}",
        text(&more.stderr)
    );
}

/// `n` distinct addresses on 127.0.0.1 that nothing listens on (as tests
/// leave them): all bound at once, so the kernel gives `n` different
/// ports, then released. One at a time, it may give the same one twice.
pub fn closed_ports(n: usize) -> Vec<SocketAddr> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}
