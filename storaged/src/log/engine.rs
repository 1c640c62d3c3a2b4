//! The log engine: a tokio task that drives [`LogCore`] against a [`BlockIo`].
//!
//! Appenders send entries over a bounded channel and wait on a oneshot for
//! the durable acknowledgement. The driver packs whatever is queued whenever
//! the device has room for another write (group commit without a timer), and
//! stops reading the channel while its queue is full, so a flood of appenders
//! waits in the channel instead of growing memory.

use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::io::{AlignedBuf, BlockIo, IoError};

use super::core::{AppendError, IoRequest, LogConfig, LogCore, LogGeometry, LogStart, LogStats};
use super::format::Superblock;
use super::recovery::{OpenError, ScanReport, read_anchor, read_superblock, scan_log};

/// Append calls waiting in the channel before the driver takes them, at most.
pub const CHANNEL_APPENDS_MAX: usize = 4096;
/// Entry bytes waiting in the channel, at most. With the core's queue
/// (`LogConfig::queue_bytes_max`) and its write buffers this bounds the
/// engine's memory whatever the number of appenders or the size of entries.
pub const CHANNEL_BYTES_MAX: usize = 16 * 1024 * 1024;

type Reply = oneshot::Sender<Result<u64, AppendError>>;

/// What travels with each queued entry through the core.
struct Token {
    /// First entry of its append call: its start seq is the call's position.
    first: bool,
    /// Last entry of its append call: the call is answered when it is durable.
    reply: Option<Reply>,
}

enum Cmd {
    /// The permit holds the entries' bytes against [`CHANNEL_BYTES_MAX`]
    /// until the driver has taken them into its queue.
    Append {
        entries: Vec<Vec<u8>>,
        reply: Reply,
        _bytes: OwnedSemaphorePermit,
    },
}

/// A handle to the log. Cheap to clone; the engine stops (after finishing
/// the writes it accepted) when the last handle is dropped.
#[derive(Clone)]
pub struct LogEngine {
    tx: mpsc::Sender<Cmd>,
    stats: watch::Receiver<LogStats>,
    channel_bytes: Arc<Semaphore>,
    /// The highest release asked for. Not in the append channel: a full
    /// log waits for a release, and appends queued behind it must not
    /// delay or drop the release that frees it.
    release: Arc<watch::Sender<u64>>,
}

/// What opening found.
pub struct Opened {
    pub engine: LogEngine,
    pub superblock: Superblock,
    pub scan: ScanReport,
    /// The driver task; it ends when every handle is dropped and the
    /// accepted writes are done.
    pub driver: tokio::task::JoinHandle<()>,
}

impl LogEngine {
    /// Recover the log on `dev`, handing every entry found to `on_entry` in
    /// order with the seq of the block it starts in, then start the engine.
    /// Returns once the new generation is durable and appends can be taken.
    pub async fn open<D: BlockIo>(
        dev: Arc<D>,
        config: LogConfig,
        on_entry: impl FnMut(u64, Vec<u8>),
    ) -> Result<Opened, OpenError> {
        let sb = read_superblock(dev.as_ref()).await?.superblock;
        let anchor = read_anchor(dev.as_ref(), &sb).await?;
        let geometry = LogGeometry {
            device_id: sb.device_id,
            start_block: sb.log_start_block,
            blocks: sb.log_blocks,
        };
        for (slot, read) in anchor.slots.iter().enumerate() {
            if let Err(e) = read {
                // Both slots get every anchor: the other one holds the
                // newest, and the next anchor write rewrites this one.
                tracing::warn!(
                    slot,
                    offset = super::layout::block_offset(super::layout::ANCHOR_BLOCKS[slot]),
                    error = %e,
                    "log anchor slot unreadable (a torn write or damage); the other slot is used"
                );
            }
        }
        let mut a = anchor.anchor;
        let scan = scan_log(&dev, &sb, anchor, on_entry).await?;
        if let Some((seq, found)) = scan.future_generation {
            return Err(OpenError::AnchorBehindLog {
                seq,
                found,
                anchor: a.generation,
            });
        }
        for d in &scan.damaged {
            tracing::error!(
                first_seq = d.first_seq,
                blocks = d.blocks,
                offset = d.offset,
                why = %d.why,
                "damaged log blocks inside the live log; the entries in them are lost, the entries after them are kept"
            );
        }
        let level_info = scan.damaged.is_empty();
        if level_info {
            tracing::info!(
                generation = a.generation,
                tail_seq = a.tail_seq,
                next_seq = scan.next_seq,
                entries = scan.entries,
                end = %scan.end,
                dropped_past_torn = scan.dropped_past_torn,
                "log recovered"
            );
        } else {
            tracing::warn!(
                generation = a.generation,
                tail_seq = a.tail_seq,
                next_seq = scan.next_seq,
                entries = scan.entries,
                end = %scan.end,
                damaged_runs = scan.damaged.len(),
                "log recovered with damage"
            );
        }
        if scan.next_seq < scan.durable_floor {
            return Err(OpenError::LogCut {
                end: scan.next_seq,
                floor: scan.durable_floor,
                why: scan.end.to_string(),
            });
        }
        // Never reuse a generation number, even one only debris carries.
        a.generation = a.generation.max(scan.highest_generation);
        if a.generation == u32::MAX {
            return Err(OpenError::BadAnchor(a));
        }
        let start = LogStart {
            anchor: a,
            next_seq: scan.next_seq,
        };
        let mut core: LogCore<Token> = LogCore::new(geometry, config, start);
        // Make the new generation durable before anything else is written.
        while let Some(req) = core.poll_io() {
            let (id, buf, result) = run_io(dev.as_ref(), req).await;
            core.complete(id, buf, result);
        }
        if let Some(why) = core.failed() {
            return Err(OpenError::Failed(why.to_string()));
        }
        let (tx, rx) = mpsc::channel(CHANNEL_APPENDS_MAX);
        let (stats_tx, stats_rx) = watch::channel(core.stats());
        let (release, release_rx) = watch::channel(0u64);
        let driver = tokio::spawn(drive(dev, core, rx, release_rx, stats_tx));
        let channel_bytes = Arc::new(Semaphore::new(CHANNEL_BYTES_MAX));
        Ok(Opened {
            engine: LogEngine {
                tx,
                stats: stats_rx,
                channel_bytes,
                release: Arc::new(release),
            },
            superblock: sb,
            scan,
            driver,
        })
    }

    /// Append one entry; resolves with the seq of the block it starts in once
    /// it is durable.
    pub async fn append(&self, entry: Vec<u8>) -> Result<u64, AppendError> {
        self.append_many(vec![entry]).await
    }

    /// Append entries that become durable in order; resolves once the last is
    /// durable, with the seq of the block the first starts in.
    pub async fn append_many(&self, entries: Vec<Vec<u8>>) -> Result<u64, AppendError> {
        if entries.is_empty() {
            return Err(AppendError::BadSize(0));
        }
        let stopped = || AppendError::Failed("the log engine has stopped".into());
        let bytes: usize = entries.iter().map(Vec::len).sum();
        // A call larger than the whole budget takes all of it, alone.
        let permits = bytes.clamp(1, CHANNEL_BYTES_MAX) as u32;
        let permit = self
            .channel_bytes
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| stopped())?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Append {
                entries,
                reply,
                _bytes: permit,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Free the log below `upto` (a seq an append returned): the owner no
    /// longer needs any entry that starts before it.
    pub fn release(&self, upto: u64) {
        self.release.send_if_modified(|wanted| {
            let raise = upto > *wanted;
            if raise {
                *wanted = upto;
            }
            raise
        });
    }

    pub fn stats(&self) -> LogStats {
        *self.stats.borrow()
    }
}

async fn run_io<D: BlockIo>(dev: &D, req: IoRequest) -> (u64, Option<AlignedBuf>, Result<(), IoError>) {
    match req {
        IoRequest::Write {
            id,
            offset,
            buf,
            durability,
        } => {
            let (buf, result) = dev.write(offset, buf, durability).await;
            (id, Some(buf), result)
        }
        IoRequest::Flush { id } => (id, None, dev.flush().await),
    }
}

async fn drive<D: BlockIo>(
    dev: Arc<D>,
    mut core: LogCore<Token>,
    mut rx: mpsc::Receiver<Cmd>,
    mut release: watch::Receiver<u64>,
    stats: watch::Sender<LogStats>,
) {
    // The device futures are polled right here rather than spawned: no task
    // per write, and a completion wakes the driver directly.
    let mut io = FuturesUnordered::new();
    let mut closed = false;
    let mut release_open = true;
    let mut batch_start = 0u64;
    loop {
        while let Some(req) = core.poll_io() {
            io.push(run_io(dev.as_ref(), req));
        }
        while let Some((token, start_seq)) = core.poll_acked() {
            if token.first {
                batch_start = start_seq;
            }
            if let Some(reply) = token.reply {
                let _ = reply.send(Ok(batch_start));
            }
        }
        if let Some(why) = core.failed() {
            let err = AppendError::Failed(why.to_string());
            for token in core.drain_failed() {
                if let Some(reply) = token.reply {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
        stats.send_replace(core.stats());
        let s = core.stats();
        if closed && io.is_empty() && (s.queued_entries == 0 || core.failed().is_some()) {
            if core.close() {
                // A last anchor records the durable end: see `LogCore::close`.
                let mut started = false;
                while let Some(req) = core.poll_io() {
                    io.push(run_io(dev.as_ref(), req));
                    started = true;
                }
                if started {
                    continue;
                }
            }
            return;
        }
        let take_more = !closed && core.has_room(0);
        tokio::select! {
            biased;
            Some((id, buf, result)) = io.next(), if !io.is_empty() => {
                core.complete(id, buf, result);
            }
            cmd = rx.recv(), if take_more => {
                match cmd {
                    Some(cmd) => handle(&mut core, cmd),
                    None => closed = true,
                }
                // Group commit: everything already waiting rides in the next write.
                while core.has_room(0) {
                    match rx.try_recv() {
                        Ok(cmd) => handle(&mut core, cmd),
                        Err(_) => break,
                    }
                }
            }
            changed = release.changed(), if release_open => {
                match changed {
                    Ok(()) => core.release(*release.borrow_and_update()),
                    Err(_) => release_open = false,
                }
            }
            else => {
                // No write in flight, no append can be taken and no release
                // can come (every handle is gone): what is queued can never
                // be written. Fail it rather than wait forever.
                core.abort("the log is full and no release can come".into());
                closed = true;
            }
        }
    }
}

fn handle(core: &mut LogCore<Token>, cmd: Cmd) {
    match cmd {
        Cmd::Append { entries, reply, _bytes } => {
            // All or nothing: a bad entry fails the call before any is queued.
            for entry in &entries {
                if let Err(e) = core.check(entry.len()) {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
            let n = entries.len();
            let mut reply = Some(reply);
            for (i, entry) in entries.into_iter().enumerate() {
                let token = Token {
                    first: i == 0,
                    reply: if i + 1 == n { reply.take() } else { None },
                };
                if let Err((err, token)) = core.append(entry, token) {
                    // Checked above; only a failure of the log lands here.
                    if let Some(reply) = token.reply.or(reply.take()) {
                        let _ = reply.send(Err(err));
                    }
                    return;
                }
            }
        }
    }
}
