//! `--engine cluster`: transactions through computed, timed from send to
//! `Committed` (durable on a write quorum of every PG they touch: VDL ≥ their
//! commit LSN).
//!
//! The cluster is a running one (`--cluster FILE`) or a dev cluster started
//! for the run (`--local-cluster N`, stopped after, also on SIGINT, SIGTERM
//! or SIGHUP: a signal only raises the stop flag, a drop guard runs
//! `dev-cluster down`, and storbench then ends by that signal).
//!
//! `--rw commit`: `--iodepth` × `--numjobs` committers, each with one
//! transaction in flight at a time, as fast as the acks come back. A
//! transaction writes `--bs` bytes into each of `--pages-per-txn` pages.
//! Committer `c` of `C` owns the pages `c, c + C, c + 2C, ...` (at most
//! [`OWNED_PAGES_MAX`]) and walks through the byte ranges of its pages in
//! order (every page at offset 0, then every page at `bs`, ...), so each
//! commit writes ranges no other committer touches and the last writer of
//! every range is known. When the run time ends committers stop issuing;
//! commits still out get `--grace` more, then count as not committed
//! (`drop_ios`), and the run fails, as it does if nothing was acknowledged.
//!
//! `--verify`: each write's bytes are unique — committer id, sequence number
//! (from a random base per run) and write index in the first 16 bytes, the
//! rest a stream seeded by them and the range — and the committer records,
//! per range, the sequence number of its last acknowledged write (8 bytes
//! per range, never the bytes). After the run every page is read back and every range compared
//! with its last acknowledged write. A commit that timed out may or may not
//! have landed: its bytes are accepted too. `--verify-journal` also appends
//! each acknowledged commit to a file ([`verify_journal`]), which
//! `--verify-only` reads back later.
//!
//! `--rw randread`: readers ask for random pages of the volume (each read is
//! one page, at the VDL).

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use tokio::sync::watch;

use computed::api::ClientErrorCode;
use computed::client::{Client, ClientError};
use computed::cluster::Cluster;
use computed::core::PageWrite;

use storaged::errln;

use super::stats::{DirStats, JobStats, new_latency_histogram};
use super::validate::UsageError;
use super::verify_journal::{self, JournalWriter};
use super::{BenchArgs, Ended, Ending, Engine, OutputFormat, Rw};
use crate::devcluster::{self, DownOnDrop, UpOptions};

/// Pages one committer owns, at most: bounds --verify's memory (one u64 per
/// byte range of an owned page).
pub const OWNED_PAGES_MAX: u64 = 256;
/// Header of a verified payload: committer u32, sequence u64, write index u32.
pub const PAYLOAD_HEADER_BYTES: usize = super::validate::VERIFY_BS_MIN_BYTES as usize;
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        // From here on SIGINT, SIGTERM and SIGHUP only raise `signalled`
        // (and the stop flag): the run stops, the dev cluster (if any) is
        // taken down by its guard, and main ends the process by the signal.
        // The handlers stay for the process's life, so a second signal
        // cannot cut the cleanup short.
        let (signal_tx, signalled) = watch::channel(0);
        let (stop_tx, stop_rx) = watch::channel(false);
        {
            let _enter = rt.enter();
            use tokio::signal::unix::{SignalKind, signal};
            let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
            let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
            let mut hup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
            let stop_tx = stop_tx.clone();
            rt.spawn(async move {
                let (n, name) = tokio::select! {
                    _ = int.recv() => (libc::SIGINT, "interrupted (SIGINT)"),
                    _ = term.recv() => (libc::SIGTERM, "terminated (SIGTERM)"),
                    _ = hup.recv() => (libc::SIGHUP, "hung up (SIGHUP)"),
                };
                errln!("\nstorbench: {name}; stopping");
                let _ = signal_tx.send(n);
                let _ = stop_tx.send(true);
            });
        }
        let signal_ending = |jobs: Vec<JobStats>| -> anyhow::Error {
            Ended {
                jobs,
                why: Ending::Signal(*signalled.borrow()),
            }
            .into()
        };

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
                errln!("storbench: starting a {nodes}-node dev cluster in {}", dir.display());
                let mut opts = UpOptions::new(dir);
                opts.nodes = nodes;
                opts.device_bytes = args.device_size;
                // Off the runtime's thread, so a signal during start-up is
                // seen (and the cluster stopped once it is up).
                let up = rt.block_on(rt.spawn_blocking(move || devcluster::up(&opts)));
                let c = up
                    .context("starting the local cluster")?
                    .context("starting the local cluster")?;
                let file = c.cluster_file.clone();
                _guard.0 = Some(c);
                file
            }
            (None, None) => bail!("--engine cluster needs --cluster FILE or --local-cluster N"),
        };
        if *signalled.borrow() != 0 {
            errln!("storbench: stopping the local cluster");
            return Err(signal_ending(Vec::new()));
        }
        let cluster = Cluster::load(&cluster_file)?;
        let result = if args.verify_only {
            rt.block_on(verify_only(args, cluster.computed_address, signalled.clone()))
        } else {
            rt.block_on(run(
                args,
                rw,
                cluster.computed_address,
                stop_tx,
                stop_rx,
                signalled.clone(),
            ))
        };
        if args.local_cluster.is_some() {
            errln!("storbench: stopping the local cluster");
        }
        match result {
            Ok(jobs) if *signalled.borrow() != 0 => Err(signal_ending(jobs)),
            // A read-back cut short by a signal ends by the signal too.
            Err(e) if *signalled.borrow() != 0 => {
                errln!("storbench: {e:#}");
                Err(signal_ending(Vec::new()))
            }
            other => other,
        }
    }
}

/// `--verify-only`: read back what the journal holds.
async fn verify_only(args: &BenchArgs, addr: SocketAddr, mut signalled: watch::Receiver<i32>) -> Result<Vec<JobStats>> {
    let path = args
        .verify_journal
        .as_deref()
        .context("--verify-only needs --verify-journal FILE")?;
    let journal = verify_journal::read(path)?;
    if journal.torn_tail {
        errln!(
            "storbench: verify-only: {}: ignoring a torn last line (a crash while it was written)",
            path.display()
        );
    }
    let client = connect(addr).await?;
    let outcome = tokio::select! {
        r = tokio::time::timeout(VERIFY_TIMEOUT, verify_journal::check(&client, &journal)) => r.map_err(|_| {
            anyhow!(
                "--verify-only: reading back did not finish within {} s",
                VERIFY_TIMEOUT.as_secs()
            )
        })??,
        _ = signalled.wait_for(|&s| s != 0) => bail!("--verify-only: stopped by a signal before it finished"),
    };
    errln!(
        "storbench: verify-only: {} journaled commits; read back the latest write of {} byte ranges on {} pages: \
         {} missing, {} wrong{}",
        journal.entries.len(),
        outcome.checked,
        outcome.pages,
        outcome.missing,
        outcome.wrong,
        if outcome.later > 0 {
            format!(" ({} hold a later write sent but not acknowledged)", outcome.later)
        } else {
            String::new()
        }
    );
    let bad = outcome.missing + outcome.wrong;
    if bad > 0 {
        for line in &outcome.listed {
            errln!("storbench: verify-only: {line}");
        }
        if outcome.listed.len() < bad as usize {
            errln!(
                "storbench: verify-only: (only the first {} listed)",
                verify_journal::LISTED_MAX
            );
        }
        bail!(
            "--verify-only: {bad} of {} byte ranges missing or wrong",
            outcome.checked
        );
    }
    Ok(Vec::new())
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
    mut signalled: watch::Receiver<i32>,
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
            return Err(UsageError(format!(
                "--bs {} is larger than the volume's page ({page_bytes} bytes)",
                args.bs
            ))
            .into());
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
    let journal = match &args.verify_journal {
        Some(path) => Some(Arc::new(Mutex::new(JournalWriter::open(
            path,
            verify_journal::Header {
                volume: info.volume,
                page_bytes: info.page_bytes,
            },
        )?))),
        None => None,
    };
    // Sequence numbers start at a random base, so this run's payloads differ
    // from every earlier run's on the same ranges (a lost write cannot pass
    // for an older run's identical bytes).
    let seq_base = fastrand::u64(1..1 << 62);
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
                journal: journal.clone(),
                seq_base,
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
                    errln!(
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
    // Every acknowledged commit is in the journal before the run reports.
    if let Some(j) = &journal {
        j.lock().unwrap_or_else(|e| e.into_inner()).sync()?;
    }
    if let Some(e) = errors.first() {
        bail!("{} of {} workers failed; the first: {e}", errors.len(), workers.len());
    }
    let mut failures = Vec::new();
    if unacked > 0 {
        failures.push(format!(
            "{unacked} commits not acknowledged within the {} s grace (counted as not committed: drop_ios)",
            args.grace.as_secs_f64()
        ));
    }
    if acked == 0 {
        failures.push(format!(
            "nothing was {}: is computed running with a write quorum of every PG? (storctl status --cluster FILE)",
            if rw == Rw::Commit { "acknowledged" } else { "read" }
        ));
    }
    let ranges: Vec<Ranges> = workers.into_iter().filter_map(|w| w.verify).collect();
    let outcome = if !args.verify {
        None
    } else if *signalled.borrow() != 0 {
        errln!("storbench: verify: stopped by a signal; not reading back (--verify-only with a journal can, later)");
        None
    } else {
        tokio::select! {
            r = tokio::time::timeout(VERIFY_TIMEOUT, verify(&clients[0], ranges, page_bytes)) => Some(r.map_err(|_| {
                anyhow!(
                    "--verify: reading back did not finish within {} s",
                    VERIFY_TIMEOUT.as_secs()
                )
            })??),
            _ = signalled.wait_for(|&s| s != 0) => {
                errln!("storbench: verify: stopped by a signal while reading back; not finished");
                None
            }
        }
    };
    if let Some(outcome) = outcome {
        errln!(
            "storbench: verify: {} acknowledged commits; read back the latest write of {} byte ranges: {} missing, {} wrong",
            acked,
            outcome.checked,
            outcome.missing,
            outcome.wrong
        );
        if outcome.missing + outcome.wrong > 0 {
            for line in &outcome.listed {
                errln!("storbench: verify: {line}");
            }
            if outcome.listed.len() < (outcome.missing + outcome.wrong) as usize {
                errln!("storbench: verify: (only the first {VERIFY_LISTED_MAX} listed)");
            }
            failures.push(format!(
                "--verify: {} of {} byte ranges missing or wrong",
                outcome.missing + outcome.wrong,
                outcome.checked
            ));
        }
    }
    // A signal's ending is decided by the caller, once the cluster is down.
    if *signalled.borrow() == 0 && !failures.is_empty() {
        // The report still goes out (main prints it); the exit status is 1.
        return Err(Ended {
            jobs,
            why: Ending::Failed(failures.join("; ")),
        }
        .into());
    }
    Ok(jobs)
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
    journal: Option<Arc<Mutex<JournalWriter>>>,
    /// The run's first sequence number, less one.
    seq_base: u64,
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

    /// Records an acknowledged commit in --verify-journal, if any.
    fn journal(&self, seq: u64, touched: &[Touched]) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let entry = verify_journal::Entry {
            committer: self.committer,
            seq,
            bs: self.bs as u32,
            ranges: touched
                .iter()
                .map(|&(j, slot, _)| (u64::from(self.committer) + j * self.committers, slot * self.bs as u64))
                .collect(),
        };
        journal.lock().unwrap_or_else(|e| e.into_inner()).append(&entry)
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
    let mut seq: u64 = ctx.seq_base;
    'run: while !ctx.finished(seq - ctx.seq_base) {
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
                    if let Err(e) = ctx.journal(seq, &touched) {
                        w.error = Some(format!("committer {}: {e:#}", ctx.committer));
                        break 'run;
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
