//! The scrub shell: one tokio task per device that runs a [`ScrubCore`]
//! over the node ([`Store`]) and fetches copies from peers ([`Peers`]).
//!
//! It reads the progress from the two slots first (nothing runs before),
//! then at each step gives the core the node's layout and the time, and
//! carries out what it asks: a range to verify and a copy to fetch run in
//! tasks of their own whose outcomes come back on a bounded channel (the
//! core bounds how many are out); progress is written in the loop, one
//! write at a time, to the slot not holding the newest state. Every
//! [`FOREGROUND_SAMPLE`] the foreground's appends since the last sample
//! are given to the core, which slows down when they slow down.
//!
//! A request to a peer is given up after [`REQUEST_TIMEOUT`] and the next
//! peer is asked. Damage left is logged at ERROR with its location,
//! damage repaired at WARN.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use super::bufs::BufPool;
use super::core::{Action, CopyOutcome, Millis, RANGE_BLOCKS_MAX, ScrubCore, pick_peer};
use super::progress;
use super::{Area, Checked, Filter, Finding, NeedCopy, Peers, Status, Store};
use crate::log::format::DeviceId;
use crate::log::layout::SCRUB_STATE_BLOCKS;

pub use super::core::ScrubConfig;

/// How often the foreground's latency is sampled.
const FOREGROUND_SAMPLE: Duration = Duration::from_millis(200);
/// A peer's answer for a page is waited for this long at most.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Outcomes waiting to be taken (the core has at most a few out).
const OUTCOMES_MAX: usize = 16;
/// Reads of a progress slot before it counts as unreadable, and the pause between.
const LOAD_ATTEMPTS: u32 = 3;
const LOAD_RETRY: Duration = Duration::from_millis(100);
/// The loop looks at the layout at least this often.
const STEP_MAX: Duration = Duration::from_secs(1);
/// At stop, work out (a read, a copy being installed) is waited for this
/// long at most: a copy half installed is harmless (the node verifies
/// before it uses one), but letting it finish is tidier.
const STOP_WAIT: Duration = Duration::from_secs(15);

struct Shared {
    core: Mutex<ScrubCore>,
    /// A request came: step now.
    wake: Notify,
    start: Instant,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, ScrubCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }
}

/// The running scrubber of one device.
pub struct Handle {
    shared: Arc<Shared>,
    ready: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Handle {
    /// Ask for a priority pass over the log and `filter`'s segments; returns
    /// the pass's number (the running priority pass's if it covers
    /// `filter`, else the next one's). 0 — no pass — only until the progress
    /// is read, a moment after [`spawn`] ([`Handle::ready`] waits for it):
    /// pass numbers are durable, so none is given before.
    pub fn request(&self, filter: Filter) -> u64 {
        let number = self.shared.core().request(filter);
        self.shared.wake.notify_one();
        number.unwrap_or(0)
    }

    /// Wait until the progress is read and requests are taken.
    pub async fn ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    pub fn status(&self) -> Status {
        self.shared.core().status()
    }

    /// Passes completed since start.
    pub fn passes_completed(&self) -> u64 {
        self.shared.core().passes_completed()
    }

    /// The last completed pass's counts. [`Status::last`] has them by area,
    /// except after a restart: the kept progress holds only the totals.
    pub fn last_summary(&self) -> Option<progress::PassSummary> {
        self.shared.core().last_summary().cloned()
    }

    /// Stop the task: what is out is waited for (bounded), and the
    /// progress is kept so a restart reads nothing again.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Start scrubbing the device `device_id` names (its blocks carry it).
/// Call from inside a tokio runtime.
pub fn spawn<S: Store, P: Peers>(store: Arc<S>, peers: Arc<P>, config: ScrubConfig, device_id: DeviceId) -> Handle {
    let start = Instant::now();
    let unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // Each device and each start begins its tour somewhere else.
    let seed =
        unix_ms ^ u64::from_le_bytes(device_id[..8].try_into().expect("8 bytes")) ^ u64::from(std::process::id());
    let shared = Arc::new(Shared {
        core: Mutex::new(ScrubCore::new(config.clone(), seed, 0, unix_ms)),
        wake: Notify::new(),
        start,
    });
    let (ready_tx, ready) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let device: String = device_id[..4].iter().map(|b| format!("{b:02x}")).collect();
    let span = tracing::info_span!("scrub", device = %device);
    let task = tokio::spawn(tracing::Instrument::instrument(
        run(
            shared.clone(),
            store,
            peers,
            device_id,
            config.ranges_inflight_max,
            ready_tx,
            stop_rx,
        ),
        span,
    ));
    Handle {
        shared,
        ready,
        stop,
        task: Mutex::new(Some(task)),
    }
}

enum Outcome {
    Scrubbed { id: u64, result: Result<Checked, String> },
    Copy { repair: u64, outcome: CopyOutcome },
}

async fn run<S: Store, P: Peers>(
    shared: Arc<Shared>,
    store: Arc<S>,
    peers: Arc<P>,
    device_id: DeviceId,
    ranges_inflight_max: usize,
    ready: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut counter = load(&shared, &*store, &device_id).await;
    let _ = ready.send(true);
    let (tx, mut rx) = mpsc::channel::<Outcome>(OUTCOMES_MAX);
    // One buffer for each range that may be out.
    let bufs = Arc::new(BufPool::new(ranges_inflight_max, RANGE_BLOCKS_MAX as usize));
    let mut work = JoinSet::new();
    let mut sampled_at = Instant::now();
    let mut foreground = store.foreground_totals();
    let mut actions = Vec::new();
    loop {
        if *stop.borrow() {
            break;
        }
        if sampled_at.elapsed() >= FOREGROUND_SAMPLE {
            sampled_at = Instant::now();
            let now = store.foreground_totals();
            let appends = now.0.saturating_sub(foreground.0);
            let latency_us = now.1.saturating_sub(foreground.1);
            foreground = now;
            shared.core().observe_foreground(appends, latency_us);
        }
        let layout = store.layout();
        let wake = {
            let mut core = shared.core();
            let now = shared.now();
            actions.extend(core.poll(now, &layout));
            core.wake_at(now)
        };
        while !actions.is_empty() {
            for action in std::mem::take(&mut actions) {
                match action {
                    Action::Persist(p) => {
                        let result = persist(&*store, &device_id, &p, counter + 1).await;
                        if result.is_ok() {
                            counter += 1;
                        }
                        shared.core().on_persisted(shared.now(), result);
                    }
                    other => carry_out(other, &store, &peers, &bufs, &tx, &mut work),
                }
            }
            // A result just taken (a failed write) may want a step at once.
            let now = shared.now();
            actions.extend(shared.core().poll(now, &layout));
        }
        while work.try_join_next().is_some() {}
        let wait = Duration::from_millis(wake.saturating_sub(shared.now())).min(STEP_MAX);
        tokio::select! {
            _ = stop.changed() => {}
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(wait.min(FOREGROUND_SAMPLE)) => {}
            Some(o) = rx.recv() => {
                take(&shared, o, &mut actions);
                while let Ok(o) = rx.try_recv() {
                    take(&shared, o, &mut actions);
                }
            }
        }
    }
    // What is out finishes (bounded); its outcome is not needed.
    drop(rx);
    if tokio::time::timeout(STOP_WAIT, async { while work.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("scrub work still out at stop; left to finish on its own");
        work.detach_all();
    }
    let progress = shared.core().progress();
    if let Err(e) = persist(&*store, &device_id, &progress, counter + 1).await {
        tracing::warn!(error = %e, "scrub progress not kept at stop; the pass resumes from the last kept");
    }
}

/// Read the two progress slots and give the core what they hold; returns
/// the write counter to go on from.
async fn load<S: Store>(shared: &Shared, store: &S, device_id: &DeviceId) -> u64 {
    let mut reads = Vec::with_capacity(2);
    for block in SCRUB_STATE_BLOCKS {
        // A read that fails is tried again: taking a slot for unreadable
        // and starting afresh would number passes from 1 again.
        let mut read = None;
        for attempt in 1..=LOAD_ATTEMPTS {
            match store.read_meta_block(block).await {
                Ok(bytes) => {
                    read = Some(bytes);
                    break;
                }
                Err(e) => {
                    tracing::warn!(block, attempt, error = %e, "scrub progress slot unreadable");
                    tokio::time::sleep(LOAD_RETRY).await;
                }
            }
        }
        reads.push(read);
    }
    let (loaded, errors) = progress::choose([reads[0].as_deref(), reads[1].as_deref()], device_id);
    for (slot, error) in errors.iter().enumerate() {
        match error {
            None | Some(progress::ProgressError::Block(crate::log::format::BlockError::Zero)) => {}
            Some(e) => tracing::warn!(block = SCRUB_STATE_BLOCKS[slot], error = %e, "scrub progress slot not valid"),
        }
    }
    if loaded.counter == 0 {
        tracing::info!("no scrub progress kept: starting afresh");
    } else if let Some(t) = &loaded.progress.tour {
        tracing::info!(
            pass = t.pass,
            bytes_done = t.bytes_done,
            "resuming the scrub pass where it was kept"
        );
    }
    let counter = loaded.counter;
    let mut core = shared.core();
    core.restore(shared.now(), loaded.progress);
    counter
}

async fn persist<S: Store>(
    store: &S,
    device_id: &DeviceId,
    progress: &progress::Progress,
    counter: u64,
) -> Result<(), String> {
    let (block, bytes) = progress::encode(progress, device_id, counter);
    let result = store.write_meta_block(block, bytes).await;
    if let Err(e) = &result {
        tracing::warn!(block, error = %e, "scrub progress not written; tried again later");
    }
    result
}

fn take(shared: &Shared, o: Outcome, actions: &mut Vec<Action>) {
    let mut core = shared.core();
    match o {
        Outcome::Scrubbed { id, result } => {
            let now = shared.now();
            actions.extend(core.on_scrubbed(now, id, result));
        }
        Outcome::Copy { repair, outcome } => actions.extend(core.on_copy(repair, outcome)),
    }
}

fn carry_out<S: Store, P: Peers>(
    action: Action,
    store: &Arc<S>,
    peers: &Arc<P>,
    bufs: &Arc<BufPool>,
    tx: &mpsc::Sender<Outcome>,
    work: &mut JoinSet<()>,
) {
    match action {
        Action::Scrub { id, pass, area, range } => {
            let (store, tx, bufs) = (store.clone(), tx.clone(), bufs.clone());
            work.spawn(async move {
                let result = store.scrub_range(area, range.clone(), &bufs).await;
                if let Err(e) = &result {
                    tracing::warn!(pass, ?area, blocks = ?range, error = %e, "scrub read failed");
                }
                let _ = tx.send(Outcome::Scrubbed { id, result }).await;
            });
        }
        Action::Fetch {
            repair,
            need,
            start,
            attempt,
        } => {
            let (store, peers, tx) = (store.clone(), peers.clone(), tx.clone());
            work.spawn(async move {
                let outcome = fetch(&*store, &*peers, need, start, attempt).await;
                let _ = tx.send(Outcome::Copy { repair, outcome }).await;
            });
        }
        Action::Repaired { area, finding } => log_repaired(area, &finding),
        Action::Left { area, finding } => log_left(area, &finding),
        Action::Unread {
            pass,
            area,
            range,
            error,
        } => {
            tracing::error!(pass, ?area, blocks = ?range, %error, "scrub could not read these blocks; passed over until the next pass");
        }
        Action::Finished(report) => {
            let (found, repaired): (u64, u64) = report
                .areas
                .iter()
                .fold((0, 0), |(f, r), (_, a)| (f + a.found, r + a.repaired));
            tracing::info!(
                pass = report.pass,
                priority = report.priority,
                bytes_read = report.bytes_read,
                found,
                repaired,
                left = found - repaired,
                "scrub pass done"
            );
        }
        Action::Persist(_) => debug_assert!(false, "persisted in the loop"),
    }
}

/// Ask one peer (the `attempt`-th from `start`) for the page, and install it.
async fn fetch<S: Store, P: Peers>(store: &S, peers: &P, need: NeedCopy, start: u32, attempt: u32) -> CopyOutcome {
    let Some((list, installed_epoch, membership_epoch)) = store.peers(need.segment) else {
        return CopyOutcome::NoMorePeers;
    };
    let Some(peer) = pick_peer(&list, start, attempt) else {
        return CopyOutcome::NoMorePeers;
    };
    let asked = peers.page_at(
        peer,
        need.segment,
        (installed_epoch, membership_epoch),
        need.page,
        need.lsn,
    );
    let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, asked).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return CopyOutcome::Failed(format!("node {}: {e}", peer.0)),
        Err(_) => return CopyOutcome::Failed(format!("node {} did not answer within {REQUEST_TIMEOUT:?}", peer.0)),
    };
    match store.install_copy(need, bytes).await {
        Ok(()) => CopyOutcome::Installed,
        Err(e) => {
            tracing::warn!(
                peer = peer.0,
                volume = need.segment.volume,
                pg = need.segment.pg,
                page = need.page,
                lsn = need.lsn,
                error = %e,
                "a peer's copy was not used"
            );
            CopyOutcome::Failed(format!("node {}'s copy: {e}", peer.0))
        }
    }
}

fn log_repaired(area: Area, f: &Finding) {
    tracing::warn!(?area, offset = f.offset, what = ?f.what, error = %f.error, "scrub repaired damage");
}

fn log_left(area: Area, f: &Finding) {
    tracing::error!(?area, offset = f.offset, what = ?f.what, error = %f.error, "scrub found damage it could not repair");
}
