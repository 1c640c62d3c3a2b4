//! The storage node: its segments, its log and its segment table, and what
//! each request does to them. The network shell ([`server`]) decodes frames
//! and calls in here; the protocol logic per segment is [`crate::segment`].
//!
//! Locking: one `std::sync::Mutex` over the in-memory state, never held
//! across an await. The segment table has its own async mutex, because a
//! table write is I/O and table writes must not interleave.

pub mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::hot::{ApplyError, HotRecords, check_body};
use crate::io::BlockIo;
use crate::log::format::DeviceId;
use crate::log::{AppendError, LogConfig, LogEngine, OpenError};
use crate::record::{RedoRecord, SegmentId};
use crate::segment::{Segment, SegmentError};
use crate::segtable::{self, SegmentEntry, SegmentTable, TableError};

/// Limits a node enforces; memory is bounded by these, whatever the load.
#[derive(Debug, Clone, Copy)]
pub struct NodeConfig {
    pub log: LogConfig,
    /// Records a segment holds past its SCL while a gap lasts.
    pub gap_records_max: usize,
    /// Requests one connection may have in flight; beyond, it is not read.
    pub requests_per_connection_max: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
    /// Largest frame accepted.
    pub frame_bytes_max: usize,
    /// Page size of the volumes this node serves.
    pub page_bytes: usize,
    /// Payload bytes of records held in memory until coalesced, at most;
    /// appends beyond are refused (Overloaded).
    pub hot_bytes_max: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            log: LogConfig::default(),
            gap_records_max: 100_000,
            requests_per_connection_max: 256,
            connections_max: 256,
            frame_bytes_max: crate::proto::FRAME_BYTES_MAX,
            page_bytes: 8192,
            hot_bytes_max: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("log: {0}")]
    Log(#[from] AppendError),
    #[error("segment table: {0}")]
    Table(#[from] TableError),
    #[error("unknown segment (volume {0}, pg {1})")]
    UnknownSegment(u64, u32),
    #[error("record at LSN {lsn}: {source}")]
    BadRecord { lsn: u64, source: ApplyError },
    #[error("read point {read_point} is above the segment's SCL {scl}: ask a segment that has caught up")]
    ReadPointAboveScl { read_point: u64, scl: u64 },
    #[error("{held} bytes of records wait to be coalesced, the node's limit; try again later")]
    Overloaded { held: usize },
    #[error("the log is full ({free_blocks} of {log_blocks} blocks free) and nothing can be released yet")]
    LogFull { free_blocks: u64, log_blocks: u64 },
}

/// What `GetSegmentStatus` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentStatus {
    pub epoch: u64,
    pub scl: u64,
    pub highest_lsn: u64,
    pub lowest_lsn: u64,
    pub pgmrpl: u64,
    pub records: u64,
    pub log_bytes: u64,
    pub page_store_bytes: u64,
}

type Ticket = oneshot::Sender<()>;

/// Appends are refused while less than 1/this of the log is free.
const LOG_RESERVE_FRACTION: u64 = 32;

struct State {
    segments: HashMap<SegmentId, Segment<Ticket>>,
    /// Epoch per segment that the segment table holds durably.
    durable_epoch: HashMap<SegmentId, u64>,
    pgmrpl: HashMap<SegmentId, u64>,
    hot: HashMap<SegmentId, HotRecords>,
    hot_bytes: usize,
}

pub struct Node {
    pub node_id: u64,
    config: NodeConfig,
    log: LogEngine,
    state: Mutex<State>,
    device_id: DeviceId,
    table: tokio::sync::Mutex<SegmentTable>,
    write_table: Box<dyn Fn(DeviceId, SegmentTable) -> TableWrite + Send + Sync>,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

type TableWrite = std::pin::Pin<Box<dyn std::future::Future<Output = Result<SegmentTable, TableError>> + Send>>;

/// What recovery found, for the start-up log line and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovered {
    pub segments: usize,
    pub records: u64,
    pub undecodable: u64,
}

impl Node {
    /// Open the node's device: recover the log and the segment table and
    /// rebuild every segment's chain.
    pub async fn open<D: BlockIo>(dev: Arc<D>, config: NodeConfig) -> Result<(Arc<Node>, Recovered), OpenError> {
        config.log.validate().map_err(OpenError::Failed)?;
        let mut segments: HashMap<SegmentId, Segment<Ticket>> = HashMap::new();
        let mut recovered = Recovered::default();
        let mut conflicts = Vec::new();
        let mut hot: HashMap<SegmentId, HotRecords> = HashMap::new();
        let gap_max = config.gap_records_max;
        let opened = LogEngine::open(dev.clone(), config.log, |seq, entry| match RedoRecord::decode(&entry) {
            Ok(record) => {
                recovered.records += 1;
                let seg = segments
                    .entry(record.segment)
                    .or_insert_with(|| Segment::new(record.segment, 0, gap_max));
                match seg.recover(&record, &entry, seq) {
                    Ok(()) => hot.entry(record.segment).or_default().insert(&record),
                    Err(e) => conflicts.push(e),
                }
            }
            // Checked by CRC on the way in; a record that does not decode
            // was written by another program and is not ours to serve.
            Err(_) => recovered.undecodable += 1,
        })
        .await?;
        for e in conflicts {
            tracing::error!(error = %e, "record in the log conflicts with another; keeping the first");
        }
        let table = segtable::read(dev.as_ref(), &opened.superblock.device_id).await?;
        let mut durable_epoch = HashMap::new();
        let mut pgmrpl = HashMap::new();
        for e in &table.entries {
            let seg = segments
                .entry(e.id)
                .or_insert_with(|| Segment::new(e.id, e.epoch, gap_max));
            // The table's epoch is durable; adopt it (never older than the segment's).
            let _ = seg.check_epoch(e.epoch);
            durable_epoch.insert(e.id, e.epoch);
            pgmrpl.insert(e.id, e.pgmrpl);
        }
        recovered.segments = segments.len();
        let dev_for_table = dev.clone();
        let node = Node {
            node_id: opened.superblock.node_id,
            config,
            log: opened.engine,
            state: Mutex::new(State {
                segments,
                durable_epoch,
                pgmrpl,
                hot_bytes: hot.values().map(HotRecords::bytes).sum(),
                hot,
            }),
            device_id: opened.superblock.device_id,
            table: tokio::sync::Mutex::new(table),
            write_table: Box::new(move |device_id, mut table| {
                let dev = dev_for_table.clone();
                Box::pin(async move {
                    segtable::write(dev.as_ref(), device_id, &mut table).await?;
                    Ok(table)
                })
            }),
            driver: Mutex::new(Some(opened.driver)),
        };
        Ok((Arc::new(node), recovered))
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug that already aborted the
        // process (panic = "abort" in release); in tests, carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make sure the segment table durably holds `id` at `epoch` or later
    /// before a request at that epoch is answered.
    async fn ensure_epoch_durable(&self, id: SegmentId, epoch: u64) -> Result<(), NodeError> {
        if self.state().durable_epoch.get(&id).is_some_and(|&e| e >= epoch) {
            return Ok(());
        }
        let mut table = self.table.lock().await;
        let (current, pgmrpl) = {
            let st = self.state();
            if st.durable_epoch.get(&id).is_some_and(|&e| e >= epoch) {
                return Ok(()); // another request persisted it meanwhile
            }
            let current = st.segments.get(&id).map_or(epoch, |s| s.epoch().max(epoch));
            (current, st.pgmrpl.get(&id).copied().unwrap_or(0))
        };
        let mut next = table.clone();
        next.upsert(SegmentEntry {
            id,
            epoch: current,
            pgmrpl,
        });
        *table = (self.write_table)(self.device_id, next).await?;
        self.state().durable_epoch.insert(id, current);
        Ok(())
    }

    /// Append a batch of one segment's records (LSNs increasing, all of
    /// `id`); returns the segment's SCL once every record of the batch is
    /// durable.
    pub async fn append(&self, id: SegmentId, epoch: u64, records: Vec<RedoRecord>) -> Result<u64, NodeError> {
        let batch: Vec<(RedoRecord, Vec<u8>)> = records
            .into_iter()
            .map(|r| {
                let e = r.encode();
                (r, e)
            })
            .collect();
        for (r, _) in &batch {
            check_body(&r.body, self.config.page_bytes)
                .map_err(|source| NodeError::BadRecord { lsn: r.lsn, source })?;
        }
        {
            let mut st = self.state();
            let gap_max = self.config.gap_records_max;
            let seg = st
                .segments
                .entry(id)
                .or_insert_with(|| Segment::new(id, epoch, gap_max));
            seg.check_epoch(epoch)?;
        }
        // The epoch is durable before any record is let in: were that to
        // fail after admission, the admitted copies would never be written
        // and re-sends would wait on them forever.
        self.ensure_epoch_durable(id, epoch).await?;
        let admitted = {
            let mut st = self.state();
            if st.hot_bytes > self.config.hot_bytes_max {
                return Err(NodeError::Overloaded { held: st.hot_bytes });
            }
            // Until coalescing frees the log, a full log would make appends
            // wait forever: refuse them while little room is left instead.
            let log = self.log.stats();
            if log.free_blocks < log.log_blocks / LOG_RESERVE_FRACTION {
                return Err(NodeError::LogFull {
                    free_blocks: log.free_blocks,
                    log_blocks: log.log_blocks,
                });
            }
            let seg = st
                .segments
                .get_mut(&id)
                .ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
            // Again, under the same lock as the admission: a newer epoch may
            // have arrived while this one was being made durable.
            seg.check_epoch(epoch)?;
            seg.admit(&batch)?
        };
        if !admitted.new.is_empty() {
            let lsns: Vec<u64> = admitted.new.iter().map(|&i| batch[i].0.lsn).collect();
            let mut batch = batch;
            let entries: Vec<Vec<u8>> = admitted.new.iter().map(|&i| std::mem::take(&mut batch[i].1)).collect();
            let seq = match self.log.append_many(entries).await {
                Ok(seq) => seq,
                Err(e) => {
                    if let Some(seg) = self.state().segments.get_mut(&id) {
                        seg.abandon(&lsns);
                    }
                    return Err(e.into());
                }
            };
            let (ready, linked) = {
                let mut st = self.state();
                // Durable now: readable at read points the SCL reaches.
                let hot = st.hot.entry(id).or_default();
                let before = hot.bytes();
                for &i in &admitted.new {
                    hot.insert(&batch[i].0);
                }
                let added = hot.bytes() - before;
                st.hot_bytes += added;
                let seg = st
                    .segments
                    .get_mut(&id)
                    .ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                // Every record of the call starts at or after `seq`: a safe
                // position to keep the log from.
                let durable: Vec<(u64, u64)> = lsns.iter().map(|&l| (l, seq)).collect();
                seg.on_durable(&durable)
            };
            for ticket in ready {
                let _ = ticket.send(());
            }
            linked?;
        }
        if !admitted.waits_for.is_empty() {
            let (tx, rx) = oneshot::channel();
            let deferred = {
                let mut st = self.state();
                let seg = st
                    .segments
                    .get_mut(&id)
                    .ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                seg.defer_ack(admitted.waits_for, tx).is_none()
            };
            if deferred {
                // The first copies' writer wakes us once they are durable;
                // if it failed, its error went to its own caller.
                rx.await
                    .map_err(|_| AppendError::Failed("the first copy of a re-sent record failed".into()))?;
            }
        }
        Ok(self.scl(id))
    }

    /// The page as of `read_point`, and the LSN of the last change in it
    /// (0 and zeros for a page never written).
    pub fn get_page(&self, id: SegmentId, epoch: u64, page: u64, read_point: u64) -> Result<(Vec<u8>, u64), NodeError> {
        let st = self.state();
        let seg = st
            .segments
            .get(&id)
            .ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
        seg.check_epoch_read(epoch)?;
        if read_point > seg.scl() {
            return Err(NodeError::ReadPointAboveScl {
                read_point,
                scl: seg.scl(),
            });
        }
        let empty = HotRecords::default();
        let hot = st.hot.get(&id).unwrap_or(&empty);
        hot.page_at(page, read_point, None, self.config.page_bytes)
            .map_err(|source| NodeError::BadRecord {
                lsn: read_point,
                source,
            })
    }

    pub fn scl(&self, id: SegmentId) -> u64 {
        self.state().segments.get(&id).map_or(0, |s| s.scl())
    }

    pub fn status(&self, id: SegmentId, epoch: u64) -> Result<SegmentStatus, NodeError> {
        let log = self.log.stats();
        let st = self.state();
        let pgmrpl = st.pgmrpl.get(&id).copied().unwrap_or(0);
        let seg = st
            .segments
            .get(&id)
            .ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
        seg.check_epoch_read(epoch)?;
        Ok(SegmentStatus {
            epoch: seg.epoch(),
            scl: seg.scl(),
            highest_lsn: seg.highest_lsn(),
            lowest_lsn: seg.lowest_lsn().unwrap_or(0),
            pgmrpl,
            records: seg.records_held() as u64,
            log_bytes: (log.next_seq - log.tail_seq) * crate::io::BLOCK_SIZE as u64,
            page_store_bytes: 0,
        })
    }

    /// Record the lowest read point any reader of the segment still holds.
    /// It only moves forward; it is durable when this returns.
    pub async fn set_pgmrpl(&self, id: SegmentId, epoch: u64, lsn: u64) -> Result<u64, NodeError> {
        {
            let mut st = self.state();
            let seg = st
                .segments
                .get_mut(&id)
                .ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
            seg.check_epoch(epoch)?;
        }
        let mut table = self.table.lock().await;
        let (current, epoch_now) = {
            let st = self.state();
            let current = st.pgmrpl.get(&id).copied().unwrap_or(0);
            let epoch_now = st.segments.get(&id).map_or(epoch, |s| s.epoch());
            (current, epoch_now)
        };
        if lsn <= current && self.state().durable_epoch.get(&id).is_some_and(|&e| e >= epoch_now) {
            return Ok(current);
        }
        let pgmrpl = lsn.max(current);
        let mut next = table.clone();
        next.upsert(SegmentEntry {
            id,
            epoch: epoch_now,
            pgmrpl,
        });
        *table = (self.write_table)(self.device_id, next).await?;
        let mut st = self.state();
        st.pgmrpl.insert(id, pgmrpl);
        st.durable_epoch.insert(id, epoch_now);
        Ok(pgmrpl)
    }

    /// Stop: the log finishes the writes it accepted. Call after the server
    /// stopped taking requests; the node is not usable afterwards.
    pub async fn shutdown(self: Arc<Self>) {
        let driver = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(self);
        if let Some(driver) = driver {
            // The log's driver ends when the last engine handle goes, which
            // is when the last Arc<Node> goes; give in-flight handlers a moment.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), driver).await;
        }
    }
}
