//! `--engine cluster`: transactions through computed, timed from send to
//! `Committed` (durable on a write quorum of every PG they touch: VDL ≥ their
//! commit LSN).
//!
//! The cluster is a running one (`--cluster FILE`) or a dev cluster started
//! for the run (`--local-cluster N`, stopped after, also on Ctrl-C: SIGINT
//! only raises the stop flag, and a drop guard runs `dev-cluster down`).
//!
//! `--rw commit`: `--iodepth` × `--numjobs` committers, each with one
//! transaction in flight at a time, as fast as the acks come back. A
//! transaction writes `--bs` bytes into each of `--pages-per-txn` pages.
//! Committer `c` of `C` owns the pages `c, c + C, c + 2C, ...` (at most
//! [`OWNED_PAGES_MAX`]) and walks through the byte ranges of its pages in
//! order (every page at offset 0, then every page at `bs`, ...), so each
//! commit writes ranges no other committer touches and the last writer of
//! every range is known. When the run time ends committers stop issuing;
//! commits still out get `--grace` more, then count as not committed.
//!
//! `--verify`: each write's bytes are unique — committer id, sequence number
//! and write index in the first 16 bytes, the rest a stream seeded by them
//! and the range — and the committer records, per range, the sequence
//! number of its last acknowledged write (8 bytes per range, never the
//! bytes). After the run every page is read back and every range compared
//! with its last acknowledged write. A commit that timed out may or may not
//! have landed: its bytes are accepted too.
//!
//! `--rw randread`: readers ask for random pages of the volume (each read is
//! one page, at the VDL).

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use tokio::sync::watch;

use computed::api::ClientErrorCode;
use computed::client::{Client, ClientError};
use computed::cluster::Cluster;
use computed::core::PageWrite;

use super::report;
use super::stats::{DirStats, JobStats, new_latency_histogram};
use super::{BenchArgs, Engine, OutputFormat, Rw};
use crate::devcluster::{self, DownOnDrop, UpOptions};

/// Pages one committer owns, at most: bounds --verify's memory (one u64 per
/// byte range of an owned page).
pub const OWNED_PAGES_MAX: u64 = 256;
/// Header of a verified payload: committer u32, sequence u64, write index u32.
const PAYLOAD_HEADER_BYTES: usize = 16;
/// Connecting to computed, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A Busy answer is retried after this.
const BUSY_RETRY: Duration = Duration::from_millis(1);
/// Committers past their grace are waited for this much longer, then dropped.
const JOIN_SLACK: Duration = Duration::from_secs(5);
/// Reading everything back for --verify, at most.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
/// Problems listed by --verify, at most (all are counted).
const VERIFY_LISTED_MAX: usize = 20;
/// Progress line refresh.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub struct ClusterBench;

impl Engine for ClusterBench {
    fn run(&self, args: &BenchArgs) -> Result<Vec<JobStats>> {
        let rw = args.rw();
        if !matches!(rw, Rw::Commit | Rw::Randread) {
            bail!("--engine cluster runs --rw commit (the default) or --rw randread");
        }
        if args.verify && rw != Rw::Commit {
            bail!("--verify checks commits: use it with --rw commit");
        }
        if args.verify && (args.bs as usize) < PAYLOAD_HEADER_BYTES {
            bail!("--verify needs --bs of at least {PAYLOAD_HEADER_BYTES} bytes (a unique header in each write)");
        }
        if args.cluster.is_none() && args.local_cluster.is_none() {
            bail!("--engine cluster needs --cluster FILE (a running cluster) or --local-cluster N (start one)");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        // From here on SIGINT only raises `interrupted`: the run stops, and the
        // dev cluster (if any) is taken down by its guard.
        let interrupted = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = watch::channel(false);
        {
            let _enter = rt.enter();
            let mut sigint =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("watching SIGINT")?;
            let interrupted = interrupted.clone();
            let stop_tx = stop_tx.clone();
            rt.spawn(async move {
                if sigint.recv().await.is_some() {
                    eprintln!("\nstorbench: interrupted; stopping");
                    interrupted.store(true, Ordering::Relaxed);
                    let _ = stop_tx.send(true);
                }
            });
        }

        // Dropped in reverse order: the cluster goes down before its temp dir goes.
        let mut _tempdir = None;
        let mut _guard = DownOnDrop(None);
        let cluster_file = match (&args.cluster, args.local_cluster) {
            (Some(file), _) => file.clone(),
            (None, Some(nodes)) => {
                let dir = match &args.dir {
                    Some(d) => d.clone(),
                    None => {
                        let base = if std::path::Path::new("/var/tmp").is_dir() {
                            PathBuf::from("/var/tmp")
                        } else {
                            std::env::temp_dir()
                        };
                        let t = tempfile::Builder::new()
                            .prefix("storbench-cluster-")
                            .tempdir_in(&base)
                            .with_context(|| format!("creating a temp dir in {}", base.display()))?;
                        let p = t.path().to_owned();
                        _tempdir = Some(t);
                        p
                    }
                };
                eprintln!("storbench: starting a {nodes}-node dev cluster in {}", dir.display());
                let mut opts = UpOptions::new(dir);
                opts.nodes = nodes;
                opts.device_bytes = args.device_size;
                let c = devcluster::up(&opts).context("starting the local cluster")?;
                let file = c.cluster_file.clone();
                _guard.0 = Some(c);
                file
            }
            (None, None) => unreachable!("checked above"),
        };
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let cluster = Cluster::load(&cluster_file)?;
        let result = rt.block_on(run(args, rw, cluster.computed_address, stop_tx, stop_rx));
        if args.local_cluster.is_some() {
            eprintln!("storbench: stopping the local cluster");
        }
        result
    }
}

/// What one committer or reader did.
struct Worker {
    job: u64,
    stats: DirStats,
    /// Commits sent whose ack did not come before the grace ran out.
    unacked: u64,
    verify: Option<Ranges>,
    error: Option<String>,
}

/// A committer's view of its ranges for --verify: for each (owned page,
/// slot), the sequence number of its last acknowledged write (0: none), and
/// the ranges of the transaction left unacknowledged, if any.
struct Ranges {
    committer: u32,
    /// Index `j` of the committer's owned pages is page `committer + j * committers`.
    committers: u64,
    owned: u64,
    slots: u64,
    bs: usize,
    last_seq: Vec<u64>,
    unacked: Option<(u64, Vec<Touched>)>,
}

/// A range a transaction wrote: (owned page index, slot, write index).
type Touched = (u64, u64, u32);

impl Ranges {
    fn page(&self, j: u64) -> u64 {
        u64::from(self.committer) + j * self.committers
    }
}

/// The bytes write `index` of transaction `seq` of `committer` puts at
/// (`page`, `offset`): a header naming them, then a stream seeded by all of
/// it, so every write in a run has different bytes.
pub fn payload(committer: u32, seq: u64, index: u32, page: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut header = [0u8; PAYLOAD_HEADER_BYTES];
    header[0..4].copy_from_slice(&committer.to_le_bytes());
    header[4..12].copy_from_slice(&seq.to_le_bytes());
    header[12..16].copy_from_slice(&index.to_le_bytes());
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&header[..len.min(PAYLOAD_HEADER_BYTES)]);
    let mut x = (u64::from(committer) << 32 ^ seq)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(page.rotate_left(17) ^ offset ^ u64::from(index) << 48)
        | 1;
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let n = (len - out.len()).min(8);
        out.extend_from_slice(&v[..n]);
    }
    out
}

async fn connect(addr: SocketAddr) -> Result<Client> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(addr)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(anyhow!("connecting to computed: {e}")),
        Err(_) => bail!(
            "connecting to computed at {addr}: no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

async fn run(
    args: &BenchArgs,
    rw: Rw,
    addr: SocketAddr,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
) -> Result<Vec<JobStats>> {
    let mut clients = Vec::new();
    for _ in 0..args.cluster_connections {
        clients.push(Arc::new(connect(addr).await?));
    }
    let info = clients[0].info;
    let page_bytes = u64::from(info.page_bytes);
    let committers = u64::from(args.iodepth) * u64::from(args.numjobs);
    let owned = (info.pages / committers).min(OWNED_PAGES_MAX);
    if rw == Rw::Commit {
        if args.bs > page_bytes {
            bail!("--bs {} is larger than the volume's page ({page_bytes} bytes)", args.bs);
        }
        if owned < u64::from(args.pages_per_txn) {
            bail!(
                "the volume has {} pages: too few for {committers} committers with {} distinct pages each \
                 (--pages-per-txn); use fewer committers or a larger volume (--device-size)",
                info.pages,
                args.pages_per_txn
            );
        }
    }
    let duration = args.duration();
    let per_worker = match (duration, args.size) {
        (None, Some(size)) => Some((size / args.bs.max(1) / u64::from(args.iodepth)).max(1)),
        _ => None,
    };
    // Abandon: raised `grace` after stop; commits still out are then dropped.
    let (abandon_tx, abandon_rx) = watch::channel(false);
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(args, done.clone());

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for job in 0..u64::from(args.numjobs) {
        for a in 0..u64::from(args.iodepth) {
            let c = job * u64::from(args.iodepth) + a;
            let client = clients[(c as usize) % clients.len()].clone();
            let ctx = WorkerCtx {
                job,
                committer: c as u32,
                committers,
                owned,
                pages: info.pages,
                page_bytes,
                bs: args.bs as usize,
                pages_per_txn: u64::from(args.pages_per_txn),
                verify: args.verify,
                quota: per_worker,
                stop: stop_rx.clone(),
                abandon: abandon_rx.clone(),
                done: done.clone(),
                interval: progress.as_ref().map(|p| p.interval.clone()),
            };
            match rw {
                Rw::Commit => tasks.spawn(commit_loop(client, ctx)),
                _ => tasks.spawn(read_loop(client, ctx)),
            };
        }
    }
    // The clock: stop at the run time; abandon `grace` after any stop.
    let clock = {
        let mut stop = stop_rx.clone();
        let grace = args.grace;
        tokio::spawn(async move {
            match duration {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = stop.wait_for(|&s| s) => {}
                    }
                    let _ = stop_tx.send(true);
                }
                None => {
                    let _ = stop.wait_for(|&s| s).await;
                }
            }
            tokio::time::sleep(grace).await;
            let _ = abandon_tx.send(true);
        })
    };

    let mut workers = Vec::new();
    loop {
        let next = if *abandon_rx.borrow() {
            match tokio::time::timeout(JOIN_SLACK, tasks.join_next()).await {
                Ok(n) => n,
                Err(_) => {
                    eprintln!(
                        "storbench: {} workers did not stop after the grace; dropping them",
                        tasks.len()
                    );
                    tasks.abort_all();
                    break;
                }
            }
        } else {
            let mut abandon = abandon_rx.clone();
            tokio::select! {
                n = tasks.join_next() => n,
                _ = abandon.wait_for(|&a| a) => continue,
            }
        };
        let Some(joined) = next else { break };
        workers.push(joined.context("worker task")?);
    }
    let elapsed = start.elapsed();
    clock.abort();
    if let Some(p) = progress {
        p.finish();
    }

    let mut per_job: Vec<DirStats> = (0..args.numjobs).map(|_| DirStats::default()).collect();
    let mut unacked = 0;
    let mut errors = Vec::new();
    for w in &workers {
        per_job[w.job as usize].merge(&w.stats);
        per_job[w.job as usize].dropped += w.unacked;
        unacked += w.unacked;
        if let Some(e) = &w.error {
            errors.push(e.clone());
        }
    }
    let io_bytes = match rw {
        Rw::Commit => args.bs * u64::from(args.pages_per_txn),
        _ => page_bytes,
    };
    let jobs: Vec<JobStats> = per_job
        .into_iter()
        .map(|mut d| {
            d.bytes = d.ios * io_bytes;
            d.runtime = elapsed;
            match rw {
                Rw::Commit => JobStats {
                    read: DirStats::default(),
                    write: d,
                },
                _ => JobStats {
                    read: d,
                    write: DirStats::default(),
                },
            }
        })
        .collect();
    let acked: u64 = jobs.iter().map(|j| j.write.ios + j.read.ios).sum();
    if unacked > 0 {
        eprintln!(
            "storbench: {unacked} commits not acknowledged within the {} s grace: counted as not committed",
            args.grace.as_secs_f64()
        );
    }
    if acked == 0 {
        eprintln!(
            "storbench: nothing was acknowledged: is computed running with a write quorum of every PG? (storctl status --cluster FILE)"
        );
    }
    if let Some(e) = errors.first() {
        bail!("{} of {} workers failed; the first: {e}", errors.len(), workers.len());
    }
    if args.verify {
        let ranges: Vec<Ranges> = workers.into_iter().filter_map(|w| w.verify).collect();
        let outcome = tokio::time::timeout(VERIFY_TIMEOUT, verify(&clients[0], ranges, page_bytes))
            .await
            .map_err(|_| {
                anyhow!(
                    "--verify: reading back did not finish within {} s",
                    VERIFY_TIMEOUT.as_secs()
                )
            })??;
        eprintln!(
            "storbench: verify: {} acknowledged commits; read back the latest write of {} byte ranges: {} missing, {} wrong",
            acked, outcome.checked, outcome.missing, outcome.wrong
        );
        if outcome.missing + outcome.wrong > 0 {
            for line in &outcome.listed {
                eprintln!("storbench: verify: {line}");
            }
            if outcome.listed.len() < (outcome.missing + outcome.wrong) as usize {
                eprintln!("storbench: verify: (only the first {VERIFY_LISTED_MAX} listed)");
            }
            // The report still goes out; the error makes the exit status 1.
            print_report(args, &jobs);
            bail!(
                "--verify: {} of {} byte ranges missing or wrong",
                outcome.missing + outcome.wrong,
                outcome.checked
            );
        }
    }
    Ok(jobs)
}

fn print_report(args: &BenchArgs, jobs: &[JobStats]) {
    match args.output_format {
        OutputFormat::Json => {
            let r = report::fio_report(&args.name, jobs, args.group_reporting);
            if let Ok(text) = serde_json::to_string_pretty(&r) {
                println!("{text}");
            }
        }
        OutputFormat::Normal => print!("{}", report::normal_report(&args.name, jobs, args.group_reporting)),
    }
}

struct WorkerCtx {
    job: u64,
    committer: u32,
    committers: u64,
    owned: u64,
    pages: u64,
    page_bytes: u64,
    bs: usize,
    pages_per_txn: u64,
    verify: bool,
    quota: Option<u64>,
    stop: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
    done: Arc<AtomicU64>,
    interval: Option<Arc<Mutex<Histogram<u64>>>>,
}

impl WorkerCtx {
    fn record(&self, stats: &mut DirStats, t: Instant) {
        let ns = (t.elapsed().as_nanos() as u64).max(1);
        stats.latency_ns.saturating_record(ns);
        stats.ios += 1;
        self.done.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = &self.interval {
            h.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(ns);
        }
    }

    fn finished(&self, n: u64) -> bool {
        *self.stop.borrow() || self.quota.is_some_and(|q| n >= q)
    }
}

async fn commit_loop(client: Arc<Client>, mut ctx: WorkerCtx) -> Worker {
    let slots = (ctx.page_bytes / ctx.bs as u64).max(1);
    let mut ranges = Ranges {
        committer: ctx.committer,
        committers: ctx.committers,
        owned: ctx.owned,
        slots,
        bs: ctx.bs,
        last_seq: if ctx.verify {
            vec![0; (ctx.owned * slots) as usize]
        } else {
            Vec::new()
        },
        unacked: None,
    };
    let mut w = Worker {
        job: ctx.job,
        stats: DirStats::default(),
        unacked: 0,
        verify: None,
        error: None,
    };
    // Position in the walk over (slot, owned page).
    let mut cursor: u64 = 0;
    let mut seq: u64 = 0;
    'run: while !ctx.finished(seq) {
        seq += 1;
        let mut writes = Vec::with_capacity(ctx.pages_per_txn as usize);
        let mut touched = Vec::with_capacity(ctx.pages_per_txn as usize);
        for index in 0..ctx.pages_per_txn {
            let j = cursor % ctx.owned;
            let slot = (cursor / ctx.owned) % slots;
            cursor += 1;
            let page = ranges.page(j);
            let offset = slot * ctx.bs as u64;
            writes.push(PageWrite::Range {
                page,
                offset: offset as u32,
                bytes: payload(ctx.committer, seq, index as u32, page, offset, ctx.bs),
            });
            touched.push((j, slot, index as u32));
        }
        loop {
            let t = Instant::now();
            let reply = tokio::select! {
                r = client.commit(writes.clone()) => r,
                _ = ctx.abandon.wait_for(|&a| a) => {
                    w.unacked += 1;
                    ranges.unacked = Some((seq, touched));
                    break 'run;
                }
            };
            match reply {
                Ok(_lsn) => {
                    ctx.record(&mut w.stats, t);
                    if ctx.verify {
                        for &(j, slot, _) in &touched {
                            ranges.last_seq[(j * slots + slot) as usize] = seq;
                        }
                    }
                    break;
                }
                Err(ClientError::Refused {
                    code: ClientErrorCode::Busy,
                    ..
                }) => tokio::time::sleep(BUSY_RETRY).await,
                Err(e) => {
                    w.error = Some(format!("committer {}: {e}", ctx.committer));
                    break 'run;
                }
            }
        }
    }
    if ctx.verify {
        w.verify = Some(ranges);
    }
    w
}

async fn read_loop(client: Arc<Client>, mut ctx: WorkerCtx) -> Worker {
    let mut w = Worker {
        job: ctx.job,
        stats: DirStats::default(),
        unacked: 0,
        verify: None,
        error: None,
    };
    let mut n = 0;
    let mut rng = fastrand::Rng::with_seed(u64::from(ctx.committer) + 1);
    while !ctx.finished(n) {
        n += 1;
        let page = rng.u64(0..ctx.pages);
        let t = Instant::now();
        let reply = tokio::select! {
            r = client.read(page) => r,
            _ = ctx.abandon.wait_for(|&a| a) => break,
        };
        match reply {
            Ok(_) => ctx.record(&mut w.stats, t),
            Err(ClientError::Refused {
                code: ClientErrorCode::Busy,
                ..
            }) => tokio::time::sleep(BUSY_RETRY).await,
            Err(e) => {
                w.error = Some(format!("reader {}: {e}", ctx.committer));
                break;
            }
        }
    }
    w
}

struct VerifyOutcome {
    checked: u64,
    missing: u64,
    wrong: u64,
    listed: Vec<String>,
}

/// Read every owned page back and compare each range with its last
/// acknowledged write (or the unacknowledged one after it, which may have landed).
async fn verify(client: &Client, ranges: Vec<Ranges>, page_bytes: u64) -> Result<VerifyOutcome> {
    let mut out = VerifyOutcome {
        checked: 0,
        missing: 0,
        wrong: 0,
        listed: Vec::new(),
    };
    let mut reads = futures_util::stream::FuturesOrdered::new();
    let mut wanted = Vec::new();
    for r in &ranges {
        for j in 0..r.owned {
            if (0..r.slots).any(|s| r.last_seq[(j * r.slots + s) as usize] != 0) {
                reads.push_back(client.read(r.page(j)));
                wanted.push((r, j));
            }
        }
    }
    use futures_util::StreamExt as _;
    let mut i = 0;
    while let Some(read) = reads.next().await {
        let (r, j) = wanted[i];
        i += 1;
        let page = r.page(j);
        let got = read.with_context(|| format!("--verify: reading page {page}"))?;
        if got.bytes.len() as u64 != page_bytes {
            bail!("--verify: page {page} came back with {} bytes", got.bytes.len());
        }
        for slot in 0..r.slots {
            let seq = r.last_seq[(j * r.slots + slot) as usize];
            if seq == 0 {
                continue;
            }
            out.checked += 1;
            let offset = slot * r.bs as u64;
            let have = &got.bytes[offset as usize..offset as usize + r.bs];
            // The write index is in the header; a wrong one fails the comparison anyway.
            let index = u32::from_le_bytes(have[12..16].try_into().unwrap_or([0; 4]));
            let matches = |seq: u64| have == payload(r.committer, seq, index, page, offset, r.bs).as_slice();
            if matches(seq) {
                continue;
            }
            let landed_unacked = r
                .unacked
                .as_ref()
                .is_some_and(|(s, touched)| touched.iter().any(|&(tj, ts, _)| tj == j && ts == slot) && matches(*s));
            if landed_unacked {
                continue;
            }
            let holder_committer = u32::from_le_bytes(have[0..4].try_into().unwrap_or([0; 4]));
            let holder_seq = u64::from_le_bytes(have[4..12].try_into().unwrap_or([0; 8]));
            let older = have.iter().all(|&b| b == 0) || (holder_committer == r.committer && holder_seq < seq);
            let what = if older {
                out.missing += 1;
                "missing"
            } else {
                out.wrong += 1;
                "wrong"
            };
            if out.listed.len() < VERIFY_LISTED_MAX {
                out.listed.push(format!(
                    "{what}: committer {} commit {seq}: page {page} bytes {offset}..{} (read point {}, the page \
                     holds committer {holder_committer} commit {holder_seq} there)",
                    r.committer,
                    offset + r.bs as u64,
                    got.read_point
                ));
            }
        }
    }
    Ok(out)
}

/// fio-style live line on stderr: elapsed, rate, p50 of the last second.
struct Progress {
    bar: indicatif::ProgressBar,
    interval: Arc<Mutex<Histogram<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Only on a terminal, and never with JSON output.
    fn start(args: &BenchArgs, done: Arc<AtomicU64>) -> Option<Progress> {
        if args.output_format == OutputFormat::Json || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        let interval = Arc::new(Mutex::new(new_latency_histogram()));
        let (b, h) = (bar.clone(), interval.clone());
        let what = if args.rw() == Rw::Commit { "commits" } else { "reads" };
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut last = 0;
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let now = done.load(Ordering::Relaxed);
                let p50 = {
                    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
                    let v = h.value_at_quantile(0.5);
                    h.reset();
                    v
                };
                b.set_message(format!(
                    "[{:.0}s] {what}: {now} ({}/s), p50 {:.2} ms",
                    start.elapsed().as_secs_f64(),
                    now - last,
                    p50 as f64 / 1e6
                ));
                last = now;
            }
        });
        Some(Progress { bar, interval, task })
    }

    fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_unique_and_name_their_writer() {
        let a = payload(3, 7, 0, 10, 0, 128);
        assert_eq!(a.len(), 128);
        assert_eq!(u32::from_le_bytes(a[0..4].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(a[4..12].try_into().unwrap()), 7);
        assert_ne!(a, payload(3, 8, 0, 10, 0, 128));
        assert_ne!(a, payload(4, 7, 0, 10, 0, 128));
        assert_ne!(a, payload(3, 7, 1, 10, 0, 128));
        assert_ne!(a[16..], payload(3, 7, 0, 11, 0, 128)[16..]);
        assert_eq!(a, payload(3, 7, 0, 10, 0, 128));
        assert_eq!(payload(1, 1, 0, 0, 0, 5).len(), 5);
    }
}
