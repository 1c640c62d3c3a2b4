//! `storctl dev-cluster`: a whole cluster on 127.0.0.1 for development,
//! tests and `storbench --local-cluster`.
//!
//! `up` formats one file device per storage node under DIR (deleting the
//! devices of an earlier cluster there), starts N `storaged` and one
//! `computed` as detached background processes (own session, so they
//! outlive the tool and a Ctrl-C in its terminal), writes `DIR/cluster.toml`
//! and one pid file per process, and returns only once a real commit has
//! been acknowledged. `up` with `keep` starts the cluster of
//! `DIR/cluster.toml` again on its existing devices instead: computed
//! recovers the volume, and every commit acknowledged before is there.
//! Neither deletes nor reuses a device while any process holds a lock on
//! it (storaged locks its device for its life; see [`device_in_use`]), nor
//! while a pid file names a live daemon.
//! On any failure it stops what it started, by PID, and names the log of the
//! daemon at fault. `down` stops the processes named by the pid files.
//!
//! Layout of DIR:
//!
//! ```text
//! DIR/cluster.toml            the cluster file (docs/cli.md)
//! DIR/devN                    node N's file device
//! DIR/logs/storaged-N.log     stdout + stderr of each daemon
//! DIR/logs/computed.log
//! DIR/pids/storaged-N.pid     one PID per line-less file
//! DIR/pids/computed.pid
//! ```

use std::fs::File;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use computed::cluster::{Cluster, SEGMENTS_PER_PG, StorageNode, derive_placement};
use computed::core::PageWrite;
use storaged::log::layout;
use storaged::pagestore::Extent;

pub const NODES_DEFAULT: usize = 6;
/// Per node. Small enough to zero-fill quickly, big enough for a few
/// seconds of benchmark at full speed (the log is a quarter of it).
pub const DEVICE_BYTES_DEFAULT: u64 = 128 << 20;
pub const PGS_DEFAULT: u32 = 2;
pub const PAGE_BYTES: u32 = 8192;
pub const VOLUME_ID: u64 = 1;
/// A PG smaller than this is not worth a cluster: refuse the device size.
pub const PG_PAGES_MIN: u64 = 64;
/// Larger PGs only make extents (and start-up of coalescing state) bigger.
pub const PG_PAGES_MAX: u64 = 65536;

/// Formatting all devices, at most.
const FORMAT_TIMEOUT: Duration = Duration::from_secs(120);
/// A daemon printing "listening on", at most.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The first commit being acknowledged, at most.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM to exit, at most; then SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// Lines of a failed daemon's log quoted in the error.
const LOG_TAIL_LINES: usize = 5;

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub dir: PathBuf,
    pub nodes: usize,
    pub device_bytes: u64,
    pub pgs: u32,
    /// Use consecutive ports from here (nodes, then computed, then its
    /// metrics, then the nodes' metrics) instead of free ones the kernel picks.
    pub base_port: Option<u16>,
    /// Start the cluster of DIR/cluster.toml again on its existing devices
    /// (`nodes`, `device_bytes`, `pgs` and `base_port` are then the file's).
    pub keep: bool,
}

impl UpOptions {
    pub fn new(dir: PathBuf) -> UpOptions {
        UpOptions {
            dir,
            nodes: NODES_DEFAULT,
            device_bytes: DEVICE_BYTES_DEFAULT,
            pgs: PGS_DEFAULT,
            base_port: None,
            keep: false,
        }
    }
}

/// The volume's shape, chosen so every node's page store holds its extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub pgs: u32,
    pub pg_pages: u64,
    /// Segments on the busiest node.
    pub segments_per_node_max: u64,
}

/// A running dev cluster, as `up` left it.
#[derive(Debug)]
pub struct DevCluster {
    pub dir: PathBuf,
    pub nodes: usize,
    /// Started on the devices of an earlier run (`keep`).
    pub kept: bool,
    pub cluster_file: PathBuf,
    pub computed: SocketAddr,
    pub geometry: Geometry,
    /// The daemons, when started by this process: reaped after `down` so no
    /// zombie is left behind by a long-lived caller (storbench).
    pub children: Vec<Child>,
}

fn local_nodes(n: usize) -> Vec<StorageNode> {
    (0..n)
        .map(|i| StorageNode {
            id: i as u64 + 1,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            az: format!("az{}", i % 3 + 1),
            metrics: None,
        })
        .collect()
}

/// PG size for `nodes` nodes of `device_bytes` each: every segment's extent
/// (pg_pages × 2 version slots × the blocks of one version) must fit the
/// page store of the busiest node, which is the device less the metadata
/// and the log (a quarter).
pub fn plan_geometry(nodes: usize, pgs: u32, device_bytes: u64) -> Result<Geometry, String> {
    if nodes < SEGMENTS_PER_PG {
        return Err(format!(
            "--nodes {nodes}: a volume needs at least {SEGMENTS_PER_PG} storage nodes"
        ));
    }
    if pgs == 0 {
        return Err("--pgs must be at least 1".into());
    }
    let placement = derive_placement(&local_nodes(nodes), pgs)?;
    let mut per_node = vec![0u64; nodes + 1];
    for slots in &placement {
        for &id in slots {
            per_node[id as usize] += 1;
        }
    }
    let segments_per_node_max = per_node.iter().copied().max().unwrap_or(0).max(1);
    let pages_blocks = match layout::plan([0; 16], 0, device_bytes, None, 0) {
        Ok(sb) => sb.pages_blocks,
        Err(_) => 0,
    };
    let page_blocks = Extent::blocks_for(PAGE_BYTES, 1).unwrap_or(u64::MAX);
    let pg_pages = (pages_blocks / (segments_per_node_max * page_blocks)).min(PG_PAGES_MAX);
    if pg_pages < PG_PAGES_MIN {
        let min_bytes = (1u64..=1 << 20)
            .map(|mib| mib << 20)
            .find(|&b| {
                let blocks = layout::plan([0; 16], 0, b, None, 0).map_or(0, |sb| sb.pages_blocks);
                blocks / (segments_per_node_max * page_blocks) >= PG_PAGES_MIN
            })
            .unwrap_or(u64::MAX);
        return Err(format!(
            "--device-size {device_bytes} is too small: each node holds up to {segments_per_node_max} \
             segments of at least {PG_PAGES_MIN} pages of {PAGE_BYTES} bytes ({page_blocks} blocks of \
             4 KiB per page: two version slots), in what is left after the log (a quarter of the device) \
             and 1 MiB of metadata; use --device-size {}m or more",
            min_bytes >> 20
        ));
    }
    Ok(Geometry {
        pgs,
        pg_pages,
        segments_per_node_max,
    })
}

/// The cluster file `up` writes: the format of `computed::cluster`, with
/// computed's metrics endpoint (storctl status reads the VCL there) and
/// each node's (`node_metrics`, in the order of `nodes`).
pub fn cluster_toml(
    geometry: &Geometry,
    computed: SocketAddr,
    metrics: SocketAddr,
    nodes: &[SocketAddr],
    node_metrics: &[SocketAddr],
) -> String {
    let mut s = format!(
        "# Written by `storctl dev-cluster up`.\n\
         [volume]\nid = {VOLUME_ID}\npage_bytes = {PAGE_BYTES}\npg_pages = {}\npgs = {}\n\n\
         [computed]\naddress = \"{computed}\"\nmetrics = \"{metrics}\"\n",
        geometry.pg_pages, geometry.pgs
    );
    for (i, a) in nodes.iter().enumerate() {
        s.push_str(&format!(
            "\n[[nodes]]\nid = {}\naddress = \"{a}\"\naz = \"az{}\"\n",
            i + 1,
            i % 3 + 1
        ));
        if let Some(m) = node_metrics.get(i) {
            s.push_str(&format!("metrics = \"{m}\"\n"));
        }
    }
    s
}

/// Where the daemons' binaries are: next to the running executable, as
/// `cargo build` leaves them.
pub fn daemon_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    let bin = dir.join(name);
    if !bin.is_file() {
        bail!(
            "{name} not found at {}: the dev cluster runs the binaries next to {}; \
             run `cargo build --release` (or `cargo build` for debug binaries) first",
            bin.display(),
            exe.file_name().map_or("this tool".into(), |f| f.to_string_lossy()),
        );
    }
    Ok(bin)
}

fn pids_dir(dir: &Path) -> PathBuf {
    dir.join("pids")
}

fn logs_dir(dir: &Path) -> PathBuf {
    dir.join("logs")
}

/// Whether a process holds a lock on the device at `path`, and who
/// (`Some("pid N (storaged)")`, or less when the holder cannot be seen).
/// storaged holds an exclusive lock on its device for its life, so a running
/// node is found even when its pid file is gone. A missing file is not in use.
pub fn device_in_use(path: &Path) -> std::io::Result<Option<String>> {
    match storaged::io::lock::device_lock_holder(path) {
        Ok(holder) => Ok(holder.map(|h| h.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The device files of DIR (`devN`).
fn devices_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix("dev")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// A process named by a pid file.
#[derive(Debug, Clone)]
pub struct PidFile {
    pub name: String,
    pub path: PathBuf,
    pub pid: i32,
}

/// The pid files in DIR/pids (unreadable ones are skipped).
pub fn pid_files(dir: &Path) -> Vec<PidFile> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(pids_dir(dir)) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Ok(pid) = text.trim().parse::<i32>()
            && pid > 0
        {
            out.push(PidFile { name, path, pid });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Is `pid` a live (not zombie) process whose command line mentions `dir`?
/// The second check keeps a reused PID from being signalled.
pub fn pid_is_ours(pid: i32, dir: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = format!("{}/", dir.to_string_lossy());
    cmdline
        .split(|&b| b == 0)
        .any(|arg| String::from_utf8_lossy(arg).starts_with(&needle))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PID we started (checked by pid_is_ours).
    unsafe { libc::kill(pid, sig) };
}

/// What `down` did.
#[derive(Debug, Default)]
pub struct DownReport {
    /// Processes that exited on SIGTERM.
    pub stopped: Vec<String>,
    /// Processes that needed SIGKILL.
    pub killed: Vec<String>,
    /// Pid files whose process was already gone.
    pub stale: Vec<String>,
}

/// Stop every process named by DIR's pid files: SIGTERM, a bounded wait,
/// SIGKILL for stragglers; then remove the pid files. Idempotent.
pub fn down(dir: &Path) -> Result<DownReport> {
    let mut report = DownReport::default();
    if !dir.exists() {
        return Ok(report);
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let mut running = Vec::new();
    for pf in pid_files(&dir) {
        if pid_is_ours(pf.pid, &dir) {
            signal(pf.pid, libc::SIGTERM);
            running.push(pf);
        } else {
            report.stale.push(pf.name.clone());
            let _ = std::fs::remove_file(&pf.path);
        }
    }
    let left = wait_gone(&running, &dir, STOP_TIMEOUT);
    for pf in &running {
        if !left.iter().any(|l| l.pid == pf.pid) {
            report.stopped.push(pf.name.clone());
        }
    }
    for pf in &left {
        signal(pf.pid, libc::SIGKILL);
    }
    let still = wait_gone(&left, &dir, KILL_TIMEOUT);
    for pf in &left {
        report.killed.push(pf.name.clone());
    }
    if let Some(pf) = still.first() {
        bail!("{} (pid {}) is still running after SIGKILL", pf.name, pf.pid);
    }
    for pf in &running {
        let _ = std::fs::remove_file(&pf.path);
    }
    Ok(report)
}

/// Wait until none of `procs` is alive or `timeout` passes; returns those left.
fn wait_gone(procs: &[PidFile], dir: &Path, timeout: Duration) -> Vec<PidFile> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<PidFile> = procs.iter().filter(|p| pid_is_ours(p.pid, dir)).cloned().collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(POLL);
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    if tail.is_empty() {
        "(the log is empty)".into()
    } else {
        tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
    }
}

/// One daemon started by `up`.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    pid_file: PathBuf,
}

/// What `up` has started so far; stopped (by PID) unless disarmed.
struct Started {
    daemons: Vec<Daemon>,
    armed: bool,
}

impl Started {
    fn stop_all(&mut self) {
        for d in &self.daemons {
            signal(d.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for d in &mut self.daemons {
            loop {
                match d.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = d.child.kill();
                        let _ = d.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(POLL),
                }
            }
            let _ = std::fs::remove_file(&d.pid_file);
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if self.armed {
            self.stop_all();
        }
    }
}

fn spawn_daemon(started: &mut Started, dir: &Path, name: &str, bin: &Path, args: &[String]) -> Result<()> {
    let log = logs_dir(dir).join(format!("{name}.log"));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log file")?;
    let mut cmd = Command::new(bin);
    // Plain text logs: tracing colours its output unless told not to.
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe; it runs in the child before exec.
    // Its own session: the daemon outlives us and a Ctrl-C in our terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({})", bin.display()))?;
    let pid_file = pids_dir(dir).join(format!("{name}.pid"));
    let write = std::fs::write(&pid_file, format!("{}\n", child.id()));
    started.daemons.push(Daemon {
        name: name.to_owned(),
        child,
        log,
        pid_file: pid_file.clone(),
    });
    write.with_context(|| format!("writing {}", pid_file.display()))
}

/// Wait until every daemon's log says "listening on"; fail naming the log
/// of one that exits or stays silent.
/// Whether a daemon's log holds its ready line ("storaged: node N listening
/// on ADDR", "computed: listening on ADDR"). Not any "listening on": the
/// error a daemon dies with when its port is taken says "error: listening
/// on ADDR: Address already in use", and a log read between that line and
/// the exit took the dead daemon for a live one.
fn announces_listening(log: &str) -> bool {
    log.lines().any(|line| {
        let ready = line
            .strip_prefix("storaged: node ")
            .and_then(|rest| rest.split_once(' '))
            .is_some_and(|(id, rest)| id.parse::<u64>().is_ok() && rest.starts_with("listening on "));
        ready || line.starts_with("computed: listening on ")
    })
}

fn wait_listening(started: &mut Started, from: usize) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut ready = vec![false; started.daemons.len()];
    loop {
        for (i, d) in started.daemons.iter_mut().enumerate().skip(from) {
            if ready[i] {
                continue;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                bail!(
                    "{} exited during start-up ({status}); its log, {}, ends with:\n{}",
                    d.name,
                    d.log.display(),
                    log_tail(&d.log)
                );
            }
            let text = std::fs::read_to_string(&d.log).unwrap_or_default();
            ready[i] = announces_listening(&text);
        }
        if ready.iter().skip(from).all(|&r| r) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let d = ready
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, r)| !**r)
                .map(|(i, _)| &started.daemons[i]);
            let (name, log) = d.map_or(("?".into(), PathBuf::new()), |d| (d.name.clone(), d.log.clone()));
            bail!(
                "{name} did not start listening within {} s; see its log, {}:\n{}",
                START_TIMEOUT.as_secs(),
                log.display(),
                log_tail(&log)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Ports a new cluster takes for `nodes` nodes: each node's, computed's,
/// computed's metrics, then each node's metrics.
fn ports_needed(nodes: usize) -> usize {
    2 * nodes + 2
}

/// Ports for the nodes, computed and the metrics: free ones the kernel
/// picks (all held at once so they differ, then released: a daemon that
/// loses the race to another process fails to bind, and `up` tries again
/// on others), or consecutive ones from `base`.
fn pick_ports(count: usize, base: Option<u16>) -> Result<Vec<SocketAddr>> {
    if let Some(base) = base {
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let port = u16::try_from(usize::from(base) + i)
                .map_err(|_| anyhow!("--base-port {base} leaves no room for {count} ports"))?;
            out.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        return Ok(out);
    }
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?);
    }
    held.iter()
        .map(|l| l.local_addr().context("reading a free port"))
        .collect()
}

/// Start a dev cluster (see the module header). Returns once a commit has
/// been acknowledged.
pub fn up(opts: &UpOptions) -> Result<DevCluster> {
    let storaged = daemon_binary("storaged")?;
    let computed_bin = daemon_binary("computed")?;
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = opts
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.dir.display()))?;
    let alive: Vec<String> = pid_files(&dir)
        .into_iter()
        .filter(|p| pid_is_ours(p.pid, &dir))
        .map(|p| format!("{} (pid {})", p.name, p.pid))
        .collect();
    if !alive.is_empty() {
        bail!(
            "a dev cluster is running in {}: {}; stop it first with `storctl dev-cluster down --dir {}`",
            dir.display(),
            alive.join(", "),
            dir.display()
        );
    }
    // The pid files may be gone or stale while a daemon still serves a
    // device: its lock says so.
    for dev in devices_in(&dir) {
        let holder = device_in_use(&dev).with_context(|| format!("checking whether {} is in use", dev.display()))?;
        if let Some(who) = holder {
            bail!(
                "device {} is in use by {who}: a daemon still runs on it; stop it first \
                 (`storctl dev-cluster down --dir {}`, or kill it)",
                dev.display(),
                dir.display()
            );
        }
    }
    let cluster_file = dir.join("cluster.toml");
    // With `keep`, the file's cluster; else a new one, and the file to write.
    let (geometry, devices, kept_addrs, new_file) = if opts.keep {
        let cluster = Cluster::load(&cluster_file).with_context(|| {
            format!(
                "--keep restarts the cluster of {}; start a new one without --keep",
                cluster_file.display()
            )
        })?;
        let devices: Vec<PathBuf> = cluster.nodes.iter().map(|n| dir.join(format!("dev{}", n.id))).collect();
        for dev in &devices {
            if !dev.is_file() {
                bail!(
                    "--keep: the device {} of {} is missing; start a new cluster without --keep",
                    dev.display(),
                    cluster_file.display()
                );
            }
        }
        let geometry = Geometry {
            pgs: cluster.pgs,
            pg_pages: cluster.pg_pages,
            segments_per_node_max: 0,
        };
        let nodes = cluster.nodes.iter().map(|n| (n.address, n.metrics)).collect::<Vec<_>>();
        (geometry, devices, Some((nodes, cluster.computed_address)), false)
    } else {
        let geometry = plan_geometry(opts.nodes, opts.pgs, opts.device_bytes).map_err(|e| anyhow!(e))?;
        let devices: Vec<PathBuf> = (1..=opts.nodes).map(|n| dir.join(format!("dev{n}"))).collect();
        // Ports are picked once the devices are formatted, just before the
        // daemons bind them: the less time between, the less chance another
        // process takes one. A `--base-port` without room is refused now.
        if opts.base_port.is_some() {
            pick_ports(ports_needed(opts.nodes), opts.base_port)?;
        }
        (geometry, devices, None, true)
    };
    // Old logs and pid files go; with `keep`, nothing else.
    for sub in [pids_dir(&dir), logs_dir(&dir)] {
        if sub.exists() {
            std::fs::remove_dir_all(&sub).with_context(|| format!("removing {}", sub.display()))?;
        }
        std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
    }
    if new_file {
        for dev in devices_in(&dir) {
            std::fs::remove_file(&dev).with_context(|| format!("removing the old device {}", dev.display()))?;
        }
        format_devices(&storaged, &dir, &devices, opts.device_bytes)?;
    }
    // Ports the kernel picked are free when picked and bound a moment
    // later: another process (an outgoing connection's port) can take one
    // between. A new cluster on such ports is started again on others.
    let repick = kept_addrs.is_none() && opts.base_port.is_none();
    let mut attempt = 1;
    let (mut started, computed_addr) = loop {
        let result = start_daemons(
            opts,
            &dir,
            &storaged,
            &computed_bin,
            &geometry,
            &devices,
            &cluster_file,
            kept_addrs.clone(),
        );
        match result {
            Err(e) if repick && attempt < PORT_ATTEMPTS && e.to_string().contains(PORT_TAKEN) => attempt += 1,
            other => break other?,
        }
    };
    first_commit(computed_addr, geometry.pgs as u64 * geometry.pg_pages).with_context(|| {
        format!(
            "the cluster did not take a commit; see the logs in {}",
            logs_dir(&dir).display()
        )
    })?;
    started.armed = false;
    let children = std::mem::take(&mut started.daemons)
        .into_iter()
        .map(|d| d.child)
        .collect();
    Ok(DevCluster {
        dir,
        nodes: devices.len(),
        kept: opts.keep,
        cluster_file,
        computed: computed_addr,
        geometry,
        children,
    })
}

/// Each node's address and metrics address, and computed's address.
type Addresses = (Vec<(SocketAddr, Option<SocketAddr>)>, SocketAddr);

/// Tries `dev-cluster up` makes on ports the kernel picks.
const PORT_ATTEMPTS: u32 = 3;
/// What a daemon's log says when its port was taken.
const PORT_TAKEN: &str = "Address already in use";

/// The nodes on `devices` and then computed, started and listening: on the
/// kept cluster's addresses, else on ports picked now, written into a new
/// `cluster_file`. A daemon that fails stops those started (by the
/// returned value's drop until it is disarmed).
#[allow(clippy::too_many_arguments)]
fn start_daemons(
    opts: &UpOptions,
    dir: &Path,
    storaged: &Path,
    computed_bin: &Path,
    geometry: &Geometry,
    devices: &[PathBuf],
    cluster_file: &Path,
    kept_addrs: Option<Addresses>,
) -> Result<(Started, SocketAddr)> {
    let (node_addrs, computed_addr) = match kept_addrs {
        Some(kept) => kept,
        None => {
            let addrs = pick_ports(ports_needed(opts.nodes), opts.base_port)?;
            let (node_addrs, rest) = addrs.split_at(opts.nodes);
            let (computed, rest) = rest.split_at(2);
            let text = cluster_toml(geometry, computed[0], computed[1], node_addrs, rest);
            Cluster::parse(&text).map_err(|e| anyhow!("the cluster file storctl wrote is invalid (a bug): {e}"))?;
            std::fs::write(cluster_file, &text).with_context(|| format!("writing {}", cluster_file.display()))?;
            let nodes = node_addrs.iter().zip(rest).map(|(&a, &m)| (a, Some(m))).collect();
            (nodes, computed[0])
        }
    };

    let mut started = Started {
        daemons: Vec::new(),
        armed: true,
    };
    for (dev, (addr, metrics)) in devices.iter().zip(&node_addrs) {
        let mut args = vec![
            "run".into(),
            "--device".into(),
            dev.to_string_lossy().into_owned(),
            "--listen".into(),
            addr.to_string(),
        ];
        if let Some(m) = metrics {
            args.extend(["--metrics".into(), m.to_string()]);
        }
        let name = dev
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        let name = format!("storaged-{}", name.trim_start_matches("dev"));
        spawn_daemon(&mut started, dir, &name, storaged, &args)?;
    }
    wait_listening(&mut started, 0)?;
    let args = vec![
        "run".into(),
        "--cluster".into(),
        cluster_file.to_string_lossy().into_owned(),
        "--listen".into(),
        computed_addr.to_string(),
    ];
    spawn_daemon(&mut started, dir, "computed", computed_bin, &args)?;
    wait_listening(&mut started, devices.len())?;
    Ok((started, computed_addr))
}

/// `storaged format` every device, in parallel (zero-filling is disk-bound).
fn format_devices(storaged: &Path, dir: &Path, devices: &[PathBuf], device_bytes: u64) -> Result<()> {
    let mut running = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let log = logs_dir(dir).join(format!("format-{}.log", i + 1));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        let child = Command::new(storaged)
            .args(["format", "--device"])
            .arg(dev)
            .args(["--node-id", &(i + 1).to_string(), "--size", &device_bytes.to_string()])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("running {} format", storaged.display()))?;
        running.push((child, log));
    }
    let deadline = Instant::now() + FORMAT_TIMEOUT;
    let mut failure = None;
    for (child, log) in &mut running {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && failure.is_none() {
                        failure = Some(anyhow!(
                            "storaged format failed ({status}); its log, {}, ends with:\n{}",
                            log.display(),
                            log_tail(log)
                        ));
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if failure.is_none() {
                        failure = Some(anyhow!(
                            "storaged format did not finish within {} s; see {}",
                            FORMAT_TIMEOUT.as_secs(),
                            log.display()
                        ));
                    }
                    break;
                }
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Connect to computed and have one commit acknowledged (a marker in the
/// last page of the volume), within [`COMMIT_TIMEOUT`].
fn first_commit(computed: SocketAddr, pages: u64) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let attempt = async {
            let client = loop {
                match computed::client::Client::connect(computed).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(POLL).await,
                }
            };
            client
                .commit(vec![PageWrite::Range {
                    page: pages - 1,
                    offset: 0,
                    bytes: b"storctl dev-cluster up".to_vec(),
                }])
                .await
                .context("committing")
        };
        match tokio::time::timeout(COMMIT_TIMEOUT, attempt).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => bail!("no commit acknowledged within {} s", COMMIT_TIMEOUT.as_secs()),
        }
    })
}

/// A dev cluster that is taken down when dropped (storbench --local-cluster, tests).
pub struct DownOnDrop(pub Option<DevCluster>);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if let Err(e) = down(&c.dir) {
                storaged::errln!("dev cluster in {}: stopping it: {e:#}", c.dir.display());
            }
            for child in &mut c.children {
                // Gone by now (down waits); reap them so no zombie is left.
                if let Ok(None) = child.try_wait() {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_daemons_ready_line_counts_as_listening() {
        use super::announces_listening;
        assert!(announces_listening(
            "INFO recovered\nstoraged: node 3 listening on 127.0.0.1:7103\n"
        ));
        assert!(announces_listening("computed: listening on 127.0.0.1:7100\n"));
        assert!(!announces_listening(
            "storaged: error: listening on 127.0.0.1:7103: Address already in use (os error 98)\n"
        ));
        assert!(!announces_listening(
            "computed: error: listening on 127.0.0.1:7100: Address already in use (os error 98)\n"
        ));
        assert!(!announces_listening(""));
    }

    use super::*;
    use std::os::fd::AsRawFd as _;

    /// Take an exclusive OFD write lock on `file`, as storaged does on its device.
    fn ofd_lock(file: &File) {
        // SAFETY: struct flock is plain data; all-zero is valid (and l_pid
        // must be 0 for OFD locks).
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: fcntl on an fd we own, with a pointer to a live flock.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_locked_device_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev1");
        assert_eq!(device_in_use(&dev).unwrap(), None, "a missing device is not in use");
        std::fs::write(&dev, [0u8; 4096]).unwrap();
        assert_eq!(device_in_use(&dev).unwrap(), None);
        let holder = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
        // Open but not locked: not in use.
        assert_eq!(device_in_use(&dev).unwrap(), None);
        ofd_lock(&holder);
        let who = device_in_use(&dev).unwrap().expect("in use");
        assert!(!who.is_empty());
        drop(holder);
        assert_eq!(device_in_use(&dev).unwrap(), None, "the lock goes with its holder");
    }

    #[test]
    fn only_dev_n_files_are_devices() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["dev1", "dev12", "dev", "devices", "dev1.bak", "cluster.toml"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let names: Vec<String> = devices_in(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["dev1", "dev12"]);
    }

    #[test]
    fn geometry_fits_the_page_store() {
        for (nodes, pgs, bytes) in [(6, 2, 128u64 << 20), (6, 4, 32 << 20), (9, 3, 64 << 20)] {
            let g = plan_geometry(nodes, pgs, bytes).expect("fits");
            let sb = layout::plan([0; 16], 0, bytes, None, 0).unwrap();
            let extent = Extent::blocks_for(PAGE_BYTES, g.pg_pages).unwrap();
            assert!(g.segments_per_node_max * extent <= sb.pages_blocks, "{g:?}");
            assert!(g.pg_pages >= PG_PAGES_MIN);
        }
    }

    /// `up --nodes 8 --pgs 1`: the PG on six nodes, two in each AZ, and
    /// two nodes spare for `storctl repair --replace/--node ... --with`;
    /// a spare's page store has room for a segment moved onto it.
    #[test]
    fn eight_nodes_and_one_pg_leave_two_nodes_spare() {
        let placement = derive_placement(&local_nodes(8), 1).unwrap();
        let mut placed = placement[0].to_vec();
        placed.sort_unstable();
        placed.dedup();
        assert_eq!(placed.len(), SEGMENTS_PER_PG);
        let spare: Vec<u64> = (1..=8).filter(|id| !placed.contains(id)).collect();
        assert_eq!(spare, vec![7, 8]);
        for az in 1..=3u64 {
            let in_az = placed.iter().filter(|&&id| (id - 1) % 3 + 1 == az).count();
            assert_eq!(in_az, 2, "AZ {az}: {placed:?}");
        }
        let g = plan_geometry(8, 1, 32 << 20).expect("fits");
        assert_eq!(g.segments_per_node_max, 1);
    }

    #[test]
    fn too_small_devices_and_too_few_nodes_are_refused() {
        let e = plan_geometry(6, 2, 4 << 20).unwrap_err();
        assert!(e.contains("too small") && e.contains("or more"), "{e}");
        let suggested: u64 = e
            .split("--device-size ")
            .nth(2)
            .and_then(|s| s.split('m').next())
            .and_then(|s| s.parse().ok())
            .expect("a suggested size");
        assert!(plan_geometry(6, 2, suggested << 20).is_ok());
        assert!(plan_geometry(6, 2, (suggested - 1) << 20).is_err());
        assert!(plan_geometry(5, 2, 128 << 20).unwrap_err().contains("at least 6"));
    }

    #[test]
    fn the_cluster_file_is_valid_and_has_metrics() {
        let g = plan_geometry(6, 2, 64 << 20).unwrap();
        let nodes: Vec<SocketAddr> = (1..=6).map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i))).collect();
        let metrics: Vec<SocketAddr> = (1..=6).map(|i| SocketAddr::from(([127, 0, 0, 1], 7300 + i))).collect();
        let text = cluster_toml(
            &g,
            "127.0.0.1:7100".parse().unwrap(),
            "127.0.0.1:7200".parse().unwrap(),
            &nodes,
            &metrics,
        );
        let c = Cluster::parse(&text).unwrap();
        assert_eq!(c.pg_pages, g.pg_pages);
        assert_eq!(c.metrics_address, Some("127.0.0.1:7200".parse().unwrap()));
        for (n, m) in c.nodes.iter().zip(&metrics) {
            assert_eq!(n.metrics, Some(*m), "node {}", n.id);
        }
    }
}
