//! The storage node: its segments, its log, its page store and its segment
//! table, and what each request does to them. The network shell
//! ([`server`]) decodes frames and calls in here; the protocol logic per
//! segment is [`crate::segment`], the page store's format [`crate::pagestore`],
//! and the background work that turns redo into page versions [`coalesce`].
//!
//! Locking: one `std::sync::Mutex` over the in-memory state, never held
//! across an await. The segment table has its own async mutex, because a
//! table write is I/O and table writes must not interleave. Page versions
//! are guarded by striped async read-write locks: a reader holds its page's
//! stripe from reading the version until it has applied the hot records, so
//! the coalescer never replaces a version under it.

mod coalesce;
mod gossip;
mod hydrate;
mod index;
mod metrics;
mod scrub;
mod scrub_api;
pub mod server;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, RwLock, oneshot};

use crate::hot::{ApplyError, HotRecords, check_body};
use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo, Durability, IoError, IoOutcome};
use crate::log::format::DeviceId;
use crate::log::layout::block_offset;
use crate::log::recovery::read_superblock;
use crate::log::{AppendError, LogConfig, LogEngine, OpenError};
use crate::membership::Membership;
use crate::pagestore::{self, Current, Extent, SlotError};
use crate::proto::{self, ErrorCode, ProtoError};
use crate::record::{LogEntry, RedoRecord, SegmentId, WireRecord};
use crate::segment::{DAMAGED_PAGES_REPORTED_MAX, LsnRange, Segment, SegmentError};
use crate::segtable::{self, SegmentEntry, SegmentTable, TableError};

pub use metrics::{LogGauges, SegmentGauges};
pub use scrub_api::ScrubError;

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
    /// Payload bytes of records held in memory until coalesced, at most;
    /// appends beyond are refused (Overloaded).
    pub hot_bytes_max: usize,
    /// Pages one coalescing round takes at most (a round ends with one
    /// segment table write, and frees the log behind it).
    pub coalesce_round_pages_max: usize,
    /// Page versions written per second at most while there is no pressure
    /// (log or memory more than half full); 0: no limit.
    pub coalesce_pages_per_sec_max: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            log: LogConfig::default(),
            gap_records_max: 100_000,
            requests_per_connection_max: 256,
            connections_max: 256,
            frame_bytes_max: crate::proto::FRAME_BYTES_MAX,
            hot_bytes_max: 256 * 1024 * 1024,
            // A round stops at its first page past this many. With records
            // spread over many pages, a cap of a fraction of a segment's
            // pages ends a round after about one record per page; 512 (on
            // 2 026-page segments) kept coalescing from keeping up with the
            // appends and the log filled (docs/performance.md).
            coalesce_round_pages_max: 8192,
            coalesce_pages_per_sec_max: 50_000,
        }
    }
}

/// The page geometry of a segment's volume, as the writer states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageGeometry {
    pub page_bytes: u32,
    pub pg_pages: u64,
}

impl PageGeometry {
    pub const PAGE_BYTES_MIN: u32 = 512;
    pub const PAGE_BYTES_MAX: u32 = 65536;

    /// The local index of `page` in segment `pg`, or why it is not there.
    fn local(&self, pg: u32, page: u64) -> Result<u64, NodeError> {
        // Where the extent is does not matter for the arithmetic.
        let extent = Extent {
            start_block: 0,
            page_bytes: self.page_bytes,
            pg_pages: self.pg_pages,
        };
        extent.local(pg, page).ok_or_else(|| {
            let first = (pg as u64).saturating_mul(self.pg_pages);
            NodeError::PageOutOfRange {
                page,
                pg,
                first,
                end: first.saturating_add(self.pg_pages),
            }
        })
    }

    fn check(&self) -> Result<(), NodeError> {
        let ok_size = self.page_bytes.is_power_of_two()
            && (Self::PAGE_BYTES_MIN..=Self::PAGE_BYTES_MAX).contains(&self.page_bytes);
        if !ok_size || self.pg_pages == 0 {
            return Err(NodeError::BadGeometry(format!(
                "pages of {} bytes, {} per PG: the page size must be a power of two from {} to {}, and a PG at least one page",
                self.page_bytes,
                self.pg_pages,
                Self::PAGE_BYTES_MIN,
                Self::PAGE_BYTES_MAX
            )));
        }
        Ok(())
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
    #[error("page store: {0}")]
    Io(#[from] IoError),
    #[error("unknown segment (volume {0}, pg {1})")]
    UnknownSegment(u64, u32),
    #[error("record at LSN {lsn}: {source}")]
    BadRecord { lsn: u64, source: ApplyError },
    #[error("{0}")]
    BadGeometry(String),
    #[error("{0}")]
    BadBatch(ProtoError),
    #[error("page {page} is not in pg {pg} (it holds pages {first}..{end})")]
    PageOutOfRange { page: u64, pg: u32, first: u64, end: u64 },
    #[error("read point {read_point} is above the segment's SCL {scl}: ask a segment that has caught up")]
    ReadPointAboveScl { read_point: u64, scl: u64 },
    #[error("{0}")]
    BadTruncation(String),
    #[error("read point {read_point} is below the segment's PGMRPL {pgmrpl}: versions it needs may be gone")]
    ReadPointBelowPgmrpl { read_point: u64, pgmrpl: u64 },
    #[error(
        "page {page}: its stored version (at device offset {offset}) is damaged ({source}); read it from another segment"
    )]
    PageDamaged { page: u64, offset: u64, source: SlotError },
    #[error("the segment is being rebuilt from its peers' page versions: read another segment")]
    Rebuilding,
    #[error(
        "page {page}: the segment holds its version at LSN {lsn}, above read point {read_point} (the PGMRPL moved, or a hydration took a peer's): read another segment"
    )]
    VersionAboveReadPoint { page: u64, lsn: u64, read_point: u64 },
    #[error("{0}")]
    BadPageVersion(String),
    #[error("records of the segment still being written after {0:?}; the truncation is not applied, try again")]
    TruncationWaited(std::time::Duration),
    #[error("{held} bytes of records wait to be coalesced, the node's limit; try again later")]
    Overloaded { held: usize },
    #[error("the segment is dropping the records it held from before its node rejoined the PG; try again")]
    Forgetting,
    #[error(
        "the log is full for this batch: it needs {needed_blocks} blocks, and {free_blocks} of the log's {log_blocks} are free and not taken by appends under way, {reserve_blocks} of them kept back; coalescing frees the log as far as PGMRPL allows"
    )]
    LogFull {
        needed_blocks: u64,
        free_blocks: u64,
        reserve_blocks: u64,
        log_blocks: u64,
    },
    #[error(
        "the page store has no room for a segment of {pg_pages} pages of {page_bytes} bytes ({needed_blocks} blocks needed, {free_blocks} free)"
    )]
    PageStoreFull {
        pg_pages: u64,
        page_bytes: u32,
        needed_blocks: u64,
        free_blocks: u64,
    },
    #[error("node {node} is not a member of volume {volume} pg {pg} at membership epoch {membership_epoch}")]
    NotMember {
        node: u64,
        volume: u64,
        pg: u32,
        /// The receiver's membership epoch (0: the writer never set one).
        membership_epoch: u64,
    },
    #[error("membership epoch {got} differs from the segment's membership epoch {current}")]
    StaleMembership { got: u64, current: u64 },
    #[error("bad membership: {0}")]
    BadMembership(#[from] crate::membership::MembershipError),
    #[error("{0}")]
    MembershipConflict(String),
    #[error(
        "pulled record at LSN {lsn} is in the segment's annulled range {lo}..={hi}: a truncated record never comes back"
    )]
    PulledAnnulled { lsn: u64, lo: u64, hi: u64 },
    #[error(transparent)]
    Scrub(#[from] scrub_api::ScrubError),
    #[error(
        "volume {0} pg {1}: the segment holds no membership yet (no writer has told it its PG), so it knows no peers to fill its gaps from"
    )]
    NoMembership(u64, u32),
}

impl NodeError {
    /// The error code a reply carries, and the current epoch for a stale one.
    pub fn wire_code(&self) -> (ErrorCode, u64) {
        match self {
            NodeError::Segment(SegmentError::StaleEpoch { current, .. }) => (ErrorCode::StaleEpoch, *current),
            NodeError::Segment(SegmentError::Conflict { .. } | SegmentError::Fork { .. }) => (ErrorCode::Conflict, 0),
            NodeError::Segment(SegmentError::Full { .. }) => (ErrorCode::Overloaded, 0),
            NodeError::Segment(SegmentError::EpochNotInstalled { .. }) => (ErrorCode::EpochNotInstalled, 0),
            NodeError::Segment(SegmentError::TooManyRanges(_)) | NodeError::BadTruncation(_) => {
                (ErrorCode::BadRequest, 0)
            }
            NodeError::UnknownSegment(..) | NodeError::NoMembership(..) => (ErrorCode::UnknownSegment, 0),
            NodeError::Log(_) | NodeError::Table(_) | NodeError::Io(_) => (ErrorCode::Internal, 0),
            NodeError::BadRecord { .. }
            | NodeError::BadGeometry(_)
            | NodeError::BadBatch(_)
            | NodeError::BadPageVersion(_) => (ErrorCode::BadRequest, 0),
            NodeError::PageOutOfRange { .. } => (ErrorCode::PageOutOfRange, 0),
            NodeError::ReadPointAboveScl { .. } => (ErrorCode::ReadPointAboveScl, 0),
            // The same to the reader: the versions it needs are not here.
            NodeError::ReadPointBelowPgmrpl { .. } | NodeError::VersionAboveReadPoint { .. } => {
                (ErrorCode::ReadPointBelowPgmrpl, 0)
            }
            NodeError::PageDamaged { .. } => (ErrorCode::PageDamaged, 0),
            NodeError::Rebuilding => (ErrorCode::Rebuilding, 0),
            NodeError::Overloaded { .. }
            | NodeError::LogFull { .. }
            | NodeError::PageStoreFull { .. }
            | NodeError::TruncationWaited(_)
            | NodeError::Forgetting => (ErrorCode::Overloaded, 0),
            NodeError::NotMember { .. } => (ErrorCode::NotMember, 0),
            NodeError::StaleMembership { current, .. } => (ErrorCode::StaleMembership, *current),
            NodeError::BadMembership(_) | NodeError::MembershipConflict(_) | NodeError::PulledAnnulled { .. } => {
                (ErrorCode::BadRequest, 0)
            }
            NodeError::Scrub(e) => (e.wire_code(), 0),
        }
    }
}

/// What `GetSegmentStatus` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentStatus {
    pub epoch: u64,
    pub scl: u64,
    pub highest_lsn: u64,
    pub lowest_lsn: u64,
    pub pgmrpl: u64,
    pub records: u64,
    pub log_bytes: u64,
    pub page_store_bytes: u64,
    /// Every record at or below it is in page versions.
    pub coalesced_lsn: u64,
    pub installed_epoch: u64,
    pub annulled: Vec<LsnRange>,
    /// LSN ranges the segment lacks (see [`Segment::holes`]).
    pub holes: Vec<LsnRange>,
    /// Pages found damaged, and whether the table had a damaged slot at open.
    pub damage: proto::Damage,
    /// The PG's membership, as the writer last set it.
    pub membership: Option<crate::membership::Membership>,
    /// The hydration under way, or the last one since start-up.
    pub hydration: Option<proto::Hydration>,
}

type Ticket = oneshot::Sender<()>;

/// Appends are refused that would leave less than 1/this of the log free.
const LOG_RESERVE_FRACTION: u64 = 32;
/// Records past a gap are refused that would leave less than 1/this of the
/// log free: the rest is for what fills the gap.
const LOG_GAP_RESERVE_FRACTION: u64 = 8;
/// A segment's geometry is fixed at creation: a request naming another is refused.
fn same_geometry(id: SegmentId, held: PageGeometry, asked: PageGeometry, what: &str) -> Result<(), NodeError> {
    if held == asked {
        return Ok(());
    }
    Err(NodeError::BadGeometry(format!(
        "segment (volume {}, pg {}) holds {} pages of {} bytes; the {what} says {} pages of {} bytes",
        id.volume, id.pg, held.pg_pages, held.page_bytes, asked.pg_pages, asked.page_bytes
    )))
}

/// How long a truncation waits for the segment's records already let in to
/// reach the log before it gives up (the recovering writer asks again).
pub(super) const TRUNCATE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// Striped locks over page versions; a power of two. A hydration's write
/// of a run of pages takes each page's stripe, and the runs of its streams
/// are written at once: many stripes keep them from waiting on each other.
const PAGE_STRIPES: usize = 1024;

/// Which slot holds a page's current version, as far as the node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum SlotState {
    /// Not read since start-up: read both slots.
    Unknown = 0,
    Never = 1,
    Slot0 = 2,
    Slot1 = 3,
    /// Its current version was found damaged: read both slots again (and
    /// counted once in [`SegState::damaged_pages`]).
    Damaged = 4,
}

impl SlotState {
    fn of(c: &Current) -> SlotState {
        match c {
            Current::Never => SlotState::Never,
            Current::Version { slot, .. } => SlotState::holding(*slot),
        }
    }

    /// The current version is in slot `slot` (0 or 1).
    fn holding(slot: usize) -> SlotState {
        if slot == 0 { SlotState::Slot0 } else { SlotState::Slot1 }
    }

    fn from_u8(v: u8) -> SlotState {
        match v {
            1 => SlotState::Never,
            2 => SlotState::Slot0,
            3 => SlotState::Slot1,
            4 => SlotState::Damaged,
            _ => SlotState::Unknown,
        }
    }
}

/// One segment as the node holds it.
struct SegState {
    seg: Segment<Ticket>,
    hot: HotRecords,
    geometry: PageGeometry,
    /// The table durably holds the segment at this epoch (None: not yet in
    /// the table, no extent).
    durable_epoch: Option<u64>,
    extent: Option<Extent>,
    pgmrpl: u64,
    coalesced_lsn: u64,
    round_lsn: u64,
    /// `Some(coalesced_lsn)` when the table said at start-up that a round
    /// was open: that round may have torn one slot of the pages it wrote,
    /// and a page not looked at since may show it (`pagestore::current`).
    torn_after: Option<u64>,
    /// The lowest LSN of a record of a page whose stored version is damaged:
    /// coalescing stops below it, so those records stay in memory and in
    /// the log (a version is never built on a damaged one).
    damaged_from: Option<u64>,
    /// Pages whose current version was found damaged since start-up (by a
    /// read or by coalescing); their slot state is `Damaged`.
    damaged_pages: u32,
    /// The lowest of them, as local indices: at most
    /// [`DAMAGED_PAGES_REPORTED_MAX`], so the status stays small.
    damaged_listed: BTreeSet<u64>,
    /// Per local page: a [`SlotState`]. One byte a page; allocated with the extent.
    slots: Vec<u8>,
    /// A hydration is under way (see [`hydrate`]): pages are not served.
    hydration: Option<hydrate::Hydration>,
    /// How the hydration under way, or the last one since start-up, stands:
    /// what `SegmentStatus` reports to an operator.
    hydrated: Option<proto::Hydration>,
    /// Records are being dropped because the node rejoins the PG
    /// (`Node::forget_before_rejoining`): appends wait until it is done.
    forgetting: bool,
    /// The PG's membership as the table durably holds it (see [`gossip`]).
    membership: Option<Membership>,
    /// The page-version index (see [`index`]), and its blocks changed in
    /// memory since last written.
    index: crate::pagemap::PageMap,
    index_dirty: BTreeSet<u64>,
    /// Peers hydrating from the segment (see [`hydrate`]).
    holds: hydrate::Holds,
}

impl SegState {
    fn new(id: SegmentId, epoch: u64, geometry: PageGeometry, gap_records_max: usize) -> SegState {
        SegState {
            seg: Segment::new(id, epoch, gap_records_max),
            hot: HotRecords::default(),
            geometry,
            durable_epoch: None,
            extent: None,
            pgmrpl: 0,
            coalesced_lsn: 0,
            round_lsn: 0,
            torn_after: None,
            damaged_from: None,
            damaged_pages: 0,
            damaged_listed: BTreeSet::new(),
            slots: Vec::new(),
            hydration: None,
            hydrated: None,
            forgetting: false,
            membership: None,
            index: Default::default(),
            index_dirty: BTreeSet::new(),
            holds: hydrate::Holds::default(),
        }
    }

    /// What a crash may have left in the slots of page `local`: only a page
    /// not read or written since start-up can show it.
    fn torn_after(&self, local: u64) -> Option<u64> {
        self.torn_after.filter(|_| self.slot_state(local) == SlotState::Unknown)
    }

    /// Coalescing may go up to here: PGMRPL, SCL, below any record of a
    /// page whose version is damaged, and not past a floor a hydrating
    /// peer was served.
    fn coalesce_target(&self) -> u64 {
        let target = self.pgmrpl.min(self.seg.scl()).min(self.hold_target());
        self.damaged_from
            .map_or(target, |lsn| target.min(lsn.saturating_sub(1)))
    }

    fn slot_state(&self, local: u64) -> SlotState {
        self.slots
            .get(local as usize)
            .map_or(SlotState::Unknown, |&v| SlotState::from_u8(v))
    }

    fn set_slot_state(&mut self, local: u64, s: SlotState) {
        let Some(v) = self.slots.get_mut(local as usize) else {
            return;
        };
        let was = SlotState::from_u8(*v);
        *v = s as u8;
        if was == s {
            return;
        }
        if s == SlotState::Damaged {
            self.damaged_pages += 1;
            self.damaged_listed.insert(local);
            if self.damaged_listed.len() > DAMAGED_PAGES_REPORTED_MAX {
                self.damaged_listed.pop_last();
            }
        } else if was == SlotState::Damaged {
            // A valid version of the page was read or written.
            self.damaged_pages -= 1;
            if self.damaged_listed.remove(&local) && self.damaged_listed.len() < self.damaged_pages as usize {
                // One kept fewer than there are: find the next lowest (rare).
                self.damaged_listed = (self.slots.iter().enumerate())
                    .filter(|&(_, &v)| v == SlotState::Damaged as u8)
                    .map(|(i, _)| i as u64)
                    .take(DAMAGED_PAGES_REPORTED_MAX)
                    .collect();
            }
        }
    }
}

struct State {
    segments: HashMap<SegmentId, SegState>,
    hot_bytes: usize,
    /// Log positions that records admitted but not yet marked durable may
    /// start at or after (a multiset): the log is never released past them.
    pins: BTreeMap<u64, usize>,
    /// Log blocks the appends admitted and not yet durable may still take
    /// (at most): room in the log already spoken for. See `Node::append`.
    log_promised: u64,
}

impl State {
    /// The segment `id`, created at `epoch` with `geometry` if the node
    /// does not hold it; `what` names the request in a geometry mismatch.
    fn seg_or_create(
        &mut self,
        id: SegmentId,
        epoch: u64,
        geometry: PageGeometry,
        gap_max: usize,
        what: &str,
    ) -> Result<&mut SegState, NodeError> {
        let s = self
            .segments
            .entry(id)
            .or_insert_with(|| SegState::new(id, epoch, geometry, gap_max));
        same_geometry(id, s.geometry, geometry, what)?;
        Ok(s)
    }

    fn seg(&self, id: SegmentId) -> Result<&SegState, NodeError> {
        self.segments
            .get(&id)
            .ok_or(NodeError::UnknownSegment(id.volume, id.pg))
    }

    fn seg_mut(&mut self, id: SegmentId) -> Result<&mut SegState, NodeError> {
        self.segments
            .get_mut(&id)
            .ok_or(NodeError::UnknownSegment(id.volume, id.pg))
    }

    /// An append admitted at log position `at`, promised `blocks`, is
    /// written (or failed): neither holds the log back any more.
    fn unpin(&mut self, at: u64, blocks: u64) {
        self.log_promised -= blocks;
        if let Some(n) = self.pins.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&at);
            }
        }
    }
}

/// `s`'s chain above `after`, up to its SCL and about `max_bytes` (at least
/// one record if any), with its SCL. Records at or below the coalesced LSN
/// are in page versions, no longer records: asking for them is refused.
fn chain_records(s: &SegState, after: u64, max_bytes: usize) -> Result<(u64, Vec<RedoRecord>), NodeError> {
    if after < s.coalesced_lsn && s.seg.scl() > after {
        return Err(NodeError::ReadPointBelowPgmrpl {
            read_point: after,
            pgmrpl: s.coalesced_lsn,
        });
    }
    let out = s.hot.chain_records(&s.seg, after, max_bytes).map_err(|lsn| {
        // Held in the chain but not in memory: only a bug does this.
        NodeError::BadTruncation(format!("record {lsn} of the chain has no body in memory"))
    })?;
    Ok((s.seg.scl(), out))
}

type IoFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The device, behind an object-safe face so that `Node` is not generic.
trait PageIo: Send + Sync {
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome>;
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome>;
    /// A read for repair (serving or taking a hydration): bounded in
    /// flight, behind the foreground's I/O ([`crate::io::IoClass`]).
    fn read_background(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome>;
    /// A write durable only after a later [`PageIo::flush`]: hydration
    /// writes many versions and makes them durable at once. Background
    /// work, as [`PageIo::read_background`].
    fn write_volatile(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome>;
    fn flush(&self) -> IoFuture<Result<(), IoError>>;
    fn write_table(&self, device_id: DeviceId, table: SegmentTable) -> IoFuture<Result<SegmentTable, TableError>>;
}

struct DevIo<D>(Arc<D>);

impl<D: BlockIo> PageIo for DevIo<D> {
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome> {
        let dev = self.0.clone();
        Box::pin(async move { dev.read(offset, buf).await })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome> {
        let dev = self.0.clone();
        Box::pin(async move { dev.write(offset, buf, Durability::Durable).await })
    }

    fn read_background(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome> {
        let dev = self.0.clone();
        Box::pin(async move { dev.read_background(offset, buf).await })
    }

    fn write_volatile(&self, offset: u64, buf: AlignedBuf) -> IoFuture<IoOutcome> {
        let dev = self.0.clone();
        Box::pin(async move { dev.write_background(offset, buf, Durability::Volatile).await })
    }

    fn flush(&self) -> IoFuture<Result<(), IoError>> {
        let dev = self.0.clone();
        Box::pin(async move { dev.flush().await })
    }

    fn write_table(&self, device_id: DeviceId, mut table: SegmentTable) -> IoFuture<Result<SegmentTable, TableError>> {
        let dev = self.0.clone();
        Box::pin(async move {
            segtable::write(dev.as_ref(), device_id, &mut table).await?;
            Ok(table)
        })
    }
}

pub struct Node {
    pub node_id: u64,
    /// Drawn at each open of the device and carried by every reply that
    /// states an SCL: computed takes the highest SCL a segment reported
    /// within one incarnation, and what it reports under a new one (which
    /// may be less than it acknowledged before: damage found at open, a
    /// replaced disk). Random, so a reformatted device never repeats one.
    pub incarnation: u64,
    config: NodeConfig,
    log: LogEngine,
    state: Mutex<State>,
    device_id: DeviceId,
    /// The log region's first block, and the page store region, in blocks.
    log_start_block: u64,
    pages_start_block: u64,
    pages_end_block: u64,
    table: tokio::sync::Mutex<SegmentTable>,
    /// A slot of the segment table was damaged when the device was opened
    /// (both were written again; every segment's status says so until the
    /// next open).
    table_slot_damaged: bool,
    /// Held by `seal` and across all of `truncate`: a seal at a newer epoch
    /// must not land between a truncation's annulment and its memory drop,
    /// or memory and the log would disagree on what the segment holds.
    /// (Both are rare: a recovering writer's.)
    fencing: tokio::sync::Mutex<()>,
    /// One writer of page-version index blocks at a time (see [`index`]).
    index_writes: tokio::sync::Mutex<()>,
    /// The scrubber, once `storaged run` started it (see [`scrub_api`]).
    scrubber: std::sync::OnceLock<crate::scrub::shell::Handle>,
    /// Segments an operator asked to fill their gaps now, for the gossip
    /// shell to take at its next tick ([`Node::fill_gaps`]).
    fill_requests: Mutex<Vec<SegmentId>>,
    io: Box<dyn PageIo>,
    stripes: Vec<RwLock<()>>,
    /// Wakes the coalescer: PGMRPL moved, or memory or log got tight.
    coalesce_wake: Notify,
    /// Appends taken so far; the coalescer defers to a busy foreground.
    appends: AtomicU64,
    /// Writers' appends answered, and their summed latency in µs, since
    /// [`Node::take_foreground_latency`] last looked: how repair knows it
    /// is slowing the foreground.
    fg_appends: AtomicU64,
    fg_latency_us: AtomicU64,
    /// The same, never reset: each background reader diffs its own samples.
    fg_total_appends: AtomicU64,
    fg_total_us: AtomicU64,
    /// What the metrics endpoint reports that the node counts nowhere
    /// else; atomics, so counting waits on no lock.
    pub(crate) counters: crate::metrics::NodeCounters,
    stopping: AtomicBool,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
    coalescer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What recovery found, for the start-up log line and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovered {
    pub segments: usize,
    pub records: u64,
    pub undecodable: u64,
    /// Records found in the log that were already in page versions.
    pub coalesced: u64,
    /// Records found in the log that a recovery's truncation annulled.
    pub annulled: u64,
    /// Damaged log blocks found inside the live log (their records are
    /// lost; every segment reports what it may lack as holes).
    pub damaged_log_blocks: u64,
    /// Records found in the log of segments the table does not hold (not
    /// served; reported once, with their count and LSN range).
    pub unknown_segment_records: u64,
}

/// Read the segment table, say what is wrong with either slot, and make
/// sure both slots hold it before anything is acted on (one damaged or
/// missing copy would leave the acknowledged state on one copy only).
/// Also says whether a slot was damaged (not merely torn by a crash).
async fn read_table<D: BlockIo>(dev: &D, device_id: &DeviceId) -> Result<(SegmentTable, bool), OpenError> {
    let found = segtable::read(dev, device_id).await.map_err(|e| match e {
        TableError::Io(e) => OpenError::Io(e),
        e => OpenError::Table(e.to_string()),
    })?;
    if let Some(d) = &found.damaged {
        tracing::error!(
            slot = d.slot,
            offset = d.offset,
            version = found.table.version,
            "segment table slot damaged: {}; the other slot holds the table, writing both again",
            d.what
        );
    }
    if let Some(d) = &found.maybe_torn {
        tracing::warn!(
            slot = d.slot,
            offset = d.offset,
            version = found.table.version,
            "segment table slot unreadable: {}; writing both again",
            d.what
        );
    }
    let mut table = found.table.clone();
    if found.needs_rewrite() {
        segtable::write(dev, *device_id, &mut table)
            .await
            .map_err(|e| OpenError::Table(format!("writing both slots again failed: {e}")))?;
    }
    Ok((table, found.damaged.is_some()))
}

/// Where a new segment's extent would start: the page store after every
/// extent given out (extents are never given back, so what is past the
/// last one is all the room there is).
fn page_store_free_from(table: &SegmentTable, pages_start: u64) -> u64 {
    table
        .entries
        .iter()
        .map(|e| e.extent().end_block())
        .max()
        .unwrap_or(pages_start)
        .max(pages_start)
}

impl Node {
    /// Open the node's device: read the segment table (the checkpoint: where
    /// each segment's chain continues after its page versions), replay the
    /// log after it, and start the coalescer.
    pub async fn open<D: BlockIo>(dev: Arc<D>, config: NodeConfig) -> Result<(Arc<Node>, Recovered), OpenError> {
        config.log.validate().map_err(OpenError::Failed)?;
        let sb = read_superblock(dev.as_ref()).await?.superblock;
        let (table, table_slot_damaged) = read_table(dev.as_ref(), &sb.device_id).await?;
        let gap_max = config.gap_records_max;
        let mut segments: HashMap<SegmentId, SegState> = HashMap::new();
        for e in &table.entries {
            let geometry = PageGeometry {
                page_bytes: e.page_bytes,
                pg_pages: e.pg_pages,
            };
            let mut s = SegState::new(e.id, e.epoch, geometry, gap_max);
            s.seg.restore_epochs(e.epoch, e.installed_epoch, e.annulled());
            s.seg.start_at(e.coalesced_lsn);
            s.durable_epoch = Some(e.epoch);
            s.extent = Some(e.extent());
            s.slots = vec![SlotState::Unknown as u8; e.pg_pages as usize];
            s.index = crate::pagemap::PageMap::new(e.pg_pages);
            s.pgmrpl = e.pgmrpl;
            s.membership = e.membership.clone();
            s.coalesced_lsn = e.coalesced_lsn;
            s.round_lsn = e.round_lsn.max(e.coalesced_lsn);
            if e.round_lsn > e.coalesced_lsn {
                s.torn_after = Some(e.coalesced_lsn);
            }
            segments.insert(e.id, s);
        }
        let mut recovered = Recovered::default();
        let mut conflicts = Vec::new();
        // Records of unknown segments are reported once, in sum: a log
        // another program wrote into can hold millions of them.
        let mut unknown_segments: HashSet<SegmentId> = HashSet::new();
        let mut unknown_lsns: Option<(u64, u64)> = None;
        let opened = LogEngine::open(dev.clone(), config.log, |seq, entry| match LogEntry::decode(&entry) {
            Ok(LogEntry::Annulment(a)) => {
                // A truncation: what the log held of these LSNs before it
                // never happened; a copy written after it is a re-send.
                if let Some(s) = segments.get_mut(&a.segment) {
                    for (lsn, page) in s.seg.annul(&a.ranges) {
                        s.hot.remove(page, lsn);
                        recovered.annulled += 1;
                    }
                }
            }
            Ok(LogEntry::Record(record)) => {
                recovered.records += 1;
                let Some(s) = segments.get_mut(&record.segment) else {
                    // The table entry is durable before any record of the
                    // segment is written; without it the page geometry is
                    // unknown and the record cannot be served.
                    recovered.unknown_segment_records += 1;
                    unknown_segments.insert(record.segment);
                    let (lo, hi) = unknown_lsns.get_or_insert((record.lsn, record.lsn));
                    (*lo, *hi) = ((*lo).min(record.lsn), (*hi).max(record.lsn));
                    return;
                };
                if record.lsn <= s.coalesced_lsn {
                    recovered.coalesced += 1;
                    return;
                }
                match s.seg.recover(&record, &entry, seq) {
                    Ok(()) => s.hot.insert(&record),
                    Err(e) => conflicts.push(e.to_string()),
                }
            }
            // Checked by CRC on the way in; a record that does not decode
            // was written by another program and is not ours to serve.
            Err(_) => recovered.undecodable += 1,
        })
        .await?;
        for e in conflicts {
            tracing::error!(error = %e, "record in the log not loaded");
        }
        recovered.damaged_log_blocks = opened.scan.damaged.iter().map(|d| d.blocks).sum();
        if recovered.damaged_log_blocks > 0 {
            // The records in the damaged blocks are unknown: any segment may
            // lack some. Each says what it lacks as holes, its SCL stays
            // below the first, and the records after the damage stay in the
            // log (they are live) until the holes are filled and coalesced.
            for s in segments.values_mut() {
                // An annulment in a damaged block is gone with it, and the
                // records it annulled would be back. The table holds the
                // ranges in force (a record in them is never a legitimate
                // re-send: appends are taken only once they are installed),
                // so they are applied again to everything kept.
                let ranges = s.seg.annulled().to_vec();
                let mut dropped = s.seg.annul(&ranges);
                // A range the writer no longer sends: the chain says which
                // records it annulled.
                dropped.extend(s.seg.drop_superseded_branches());
                for (lsn, page) in dropped {
                    s.hot.remove(page, lsn);
                    recovered.annulled += 1;
                }
                s.seg.mark_log_damage();
                let holes = s.seg.holes();
                tracing::error!(
                    volume = s.seg.id.volume,
                    pg = s.seg.id.pg,
                    scl = s.seg.scl(),
                    ?holes,
                    "segment may lack acknowledged records lost to log damage"
                );
            }
        }
        if let Some((lsn_min, lsn_max)) = unknown_lsns {
            tracing::error!(
                records = recovered.unknown_segment_records,
                segments = unknown_segments.len(),
                lsn_min,
                lsn_max,
                "records in the log of segments this node has no table entry for, not loaded \
                 (another program, such as storbench --force, wrote them into this node's log)"
            );
        }
        recovered.segments = segments.len();
        let hot_bytes = segments.values().map(|s| s.hot.bytes()).sum();
        let node = Arc::new(Node {
            node_id: opened.superblock.node_id,
            incarnation: fastrand::u64(..),
            config,
            log: opened.engine,
            state: Mutex::new(State {
                segments,
                hot_bytes,
                pins: BTreeMap::new(),
                log_promised: 0,
            }),
            device_id: opened.superblock.device_id,
            log_start_block: sb.log_start_block,
            pages_start_block: sb.pages_start_block,
            pages_end_block: sb.pages_start_block + sb.pages_blocks,
            table: tokio::sync::Mutex::new(table),
            table_slot_damaged,
            fencing: tokio::sync::Mutex::new(()),
            index_writes: tokio::sync::Mutex::new(()),
            scrubber: std::sync::OnceLock::new(),
            fill_requests: Mutex::new(Vec::new()),
            io: Box::new(DevIo(dev)),
            stripes: (0..PAGE_STRIPES).map(|_| RwLock::new(())).collect(),
            coalesce_wake: Notify::new(),
            appends: AtomicU64::new(0),
            fg_appends: AtomicU64::new(0),
            fg_latency_us: AtomicU64::new(0),
            fg_total_appends: AtomicU64::new(0),
            fg_total_us: AtomicU64::new(0),
            counters: Default::default(),
            stopping: AtomicBool::new(false),
            driver: Mutex::new(Some(opened.driver)),
            coalescer: Mutex::new(None),
        });
        node.load_indexes()
            .await
            .map_err(|e| OpenError::Failed(format!("reading the page-version index: {e}")))?;
        let task = tokio::spawn(coalesce::run(Arc::downgrade(&node)));
        *node.coalescer.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok((node, recovered))
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug that already aborted the
        // process (panic = "abort" in release); in tests, carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stripe(&self, id: SegmentId, page: u64) -> &RwLock<()> {
        let h = page ^ (id.pg as u64).rotate_left(32) ^ id.volume.rotate_left(17);
        &self.stripes[(h as usize) & (PAGE_STRIPES - 1)]
    }

    /// Change `id`'s entry in the segment table durably. `change` sees the
    /// current entry (None for a new segment) and returns the new one.
    async fn update_entry(
        &self,
        id: SegmentId,
        change: impl FnOnce(Option<&SegmentEntry>, &SegmentTable) -> Result<SegmentEntry, NodeError>,
    ) -> Result<SegmentEntry, NodeError> {
        let mut table = self.table.lock().await;
        let entry = change(table.get(id), &table)?;
        let mut next = table.clone();
        next.upsert(entry.clone());
        *table = self.io.write_table(self.device_id, next).await?;
        Ok(entry)
    }

    /// How the node's device stands as a whole (`NodeStatus`): the room
    /// its page store has for new segments, and its log.
    pub async fn node_status(&self) -> proto::NodeStatus {
        let free_from = page_store_free_from(&*self.table.lock().await, self.pages_start_block);
        let log = self.log.stats();
        proto::NodeStatus {
            node_id: self.node_id,
            page_store_blocks: self.pages_end_block - self.pages_start_block,
            page_store_free_blocks: self.pages_end_block.saturating_sub(free_from),
            log_blocks: log.log_blocks,
            log_free_blocks: log.free_blocks,
        }
    }

    /// Make sure the segment table durably holds `id` (with its page store
    /// extent) at `epoch` or later before a request at that epoch is answered.
    async fn ensure_durable(&self, id: SegmentId, epoch: u64) -> Result<(), NodeError> {
        let (geometry, installed_epoch, annulled) = {
            let st = self.state();
            let s = st.seg(id)?;
            if s.durable_epoch.is_some_and(|e| e >= epoch) {
                return Ok(());
            }
            (s.geometry, s.seg.installed_epoch(), s.seg.annulled().to_vec())
        };
        let (pages_start, pages_end) = (self.pages_start_block, self.pages_end_block);
        let entry = self
            .update_entry(id, |current, table| {
                if let Some(e) = current {
                    return Ok(SegmentEntry {
                        epoch: e.epoch.max(epoch),
                        ..e.clone()
                    });
                }
                let start = page_store_free_from(table, pages_start);
                let needed = Extent::blocks_for(geometry.page_bytes, geometry.pg_pages).unwrap_or(u64::MAX);
                let free = pages_end.saturating_sub(start);
                if needed > free {
                    return Err(NodeError::PageStoreFull {
                        pg_pages: geometry.pg_pages,
                        page_bytes: geometry.page_bytes,
                        needed_blocks: needed,
                        free_blocks: free,
                    });
                }
                let mut entry = SegmentEntry {
                    id,
                    epoch,
                    pgmrpl: 0,
                    page_bytes: geometry.page_bytes,
                    pg_pages: geometry.pg_pages,
                    extent_start_block: start,
                    coalesced_lsn: 0,
                    round_lsn: 0,
                    installed_epoch,
                    annulled: Default::default(),
                    annulled_count: 0,
                    membership: None,
                };
                // A segment created by SetMembership starts with the
                // writer's ranges as applied; any other starts with none.
                entry.set_annulled(&annulled);
                Ok(entry)
            })
            .await;
        let mut st = self.state();
        match entry {
            Ok(e) => {
                let s = st.seg_mut(id)?;
                if s.extent.is_none() {
                    s.extent = Some(e.extent());
                    s.slots = vec![SlotState::Never as u8; e.pg_pages as usize];
                    s.index = crate::pagemap::PageMap::new(e.pg_pages);
                }
                s.durable_epoch = Some(s.durable_epoch.unwrap_or(0).max(e.epoch));
                Ok(())
            }
            Err(err) => {
                // A segment that never made it into the table holds nothing yet.
                if st
                    .segments
                    .get(&id)
                    .is_some_and(|s| s.extent.is_none() && s.seg.records_held() == 0)
                {
                    st.segments.remove(&id);
                }
                Err(err)
            }
        }
    }

    /// Append a batch of one segment's records (LSNs increasing, all of
    /// `id`); returns the segment's SCL once every record of the batch is
    /// durable. Each record's encoding goes to the log as it is (the bytes
    /// the frame carried, for a batch the server decoded): nothing is
    /// encoded again.
    pub async fn append(
        &self,
        id: SegmentId,
        epoch: u64,
        geometry: PageGeometry,
        records: Vec<WireRecord>,
    ) -> Result<u64, NodeError> {
        geometry.check()?;
        // The wire decoder refuses such batches; a caller in-process must
        // not get past this either: admission and the split below pair a
        // batch's records with their LSNs in order.
        let mut prev = None;
        for (index, r) in records.iter().map(WireRecord::record).enumerate() {
            proto::check_batch_order(id, prev, index, r).map_err(NodeError::BadBatch)?;
            prev = Some(r.lsn);
            geometry.local(id.pg, r.page)?;
            check_body(&r.body, geometry.page_bytes as usize)
                .map_err(|source| NodeError::BadRecord { lsn: r.lsn, source })?;
        }
        let durable = {
            let mut st = self.state();
            let s = st.seg_or_create(id, epoch, geometry, self.config.gap_records_max, "request")?;
            s.seg.check_epoch(epoch)?;
            s.durable_epoch.is_some_and(|e| e >= epoch)
        };
        // The segment and its epoch are durable before any record is let
        // in: were that to fail after admission, the admitted copies would
        // never be written and re-sends would wait on them forever.
        if !durable {
            self.ensure_durable(id, epoch).await?;
        }
        self.appends.fetch_add(1, Ordering::Relaxed);
        let blocks = crate::log::core::call_blocks_max(records.iter().map(|r| r.encoded().len()));
        let (admitted, pin) = {
            let mut st = self.state();
            if st.hot_bytes > self.config.hot_bytes_max {
                self.coalesce_wake.notify_one();
                return Err(NodeError::Overloaded { held: st.hot_bytes });
            }
            // A full log would make appends wait until coalescing frees it;
            // refuse them while little room is left instead. The room is
            // what the log has free less what appends admitted before may
            // still take: several arriving together all find the same free
            // blocks, and those that overfilled the log would wait for a
            // release that their own pins (below) hold back, for good.
            // Records past a gap leave more room: coalescing cannot free
            // them until the gap is filled, and what fills it must fit.
            let past_gap = records
                .first()
                .is_some_and(|r| (st.segments.get(&id)).is_some_and(|s| s.seg.past_gap(r.record().prev_lsn_pg)));
            let log = self.log.stats();
            let reserve = log.log_blocks
                / if past_gap {
                    LOG_GAP_RESERVE_FRACTION
                } else {
                    LOG_RESERVE_FRACTION
                };
            let room = log.free_blocks.saturating_sub(st.log_promised);
            if room < reserve + blocks {
                self.coalesce_wake.notify_one();
                return Err(NodeError::LogFull {
                    needed_blocks: blocks,
                    free_blocks: room,
                    reserve_blocks: reserve,
                    log_blocks: log.log_blocks,
                });
            }
            if log.free_blocks < log.log_blocks / 2 || st.hot_bytes > self.config.hot_bytes_max / 2 {
                self.coalesce_wake.notify_one();
            }
            let s = st.seg_mut(id)?;
            if s.forgetting {
                return Err(NodeError::Forgetting);
            }
            // Again, under the same lock as the admission: a newer epoch may
            // have arrived while this one was being made durable.
            s.seg.check_epoch(epoch)?;
            let admitted = s.seg.admit(&records)?;
            // The records will start at or after the log's next seq: keep the
            // log from being released past it until they are marked durable.
            let pin = log.next_seq;
            if !admitted.new.is_empty() {
                *st.pins.entry(pin).or_default() += 1;
                st.log_promised += blocks;
            }
            (admitted, pin)
        };
        if !admitted.new.is_empty() {
            // Split the new records: their encodings go to the log as they
            // are, their bodies wait here to move into memory once durable
            // (no copy, and nothing but moves under the lock).
            let mut entries = Vec::with_capacity(admitted.new.len());
            let mut bodies = Vec::with_capacity(admitted.new.len());
            let mut new = admitted.new.iter().peekable();
            for r in records {
                if new.next_if_eq(&&r.record().lsn).is_some() {
                    let (record, encoded) = r.into_parts();
                    entries.push(encoded);
                    bodies.push((record.page, record.lsn, record.body));
                }
            }
            debug_assert_eq!(bodies.len(), admitted.new.len(), "new records are the batch's");
            let seq = match self.log.append_many(entries).await {
                Ok(seq) => seq,
                Err(e) => {
                    let mut st = self.state();
                    st.unpin(pin, blocks);
                    if let Some(s) = st.segments.get_mut(&id) {
                        s.seg.abandon(&admitted.new);
                    }
                    return Err(e.into());
                }
            };
            let (ready, linked) = {
                let mut st = self.state();
                st.unpin(pin, blocks);
                let s = st.seg_mut(id)?;
                // Durable now: readable at read points the SCL reaches.
                let before = s.hot.bytes();
                for (page, lsn, body) in bodies {
                    // A truncation may have annulled it while it was written.
                    if s.seg.record(lsn).is_some() {
                        s.hot.insert_body(page, lsn, body);
                    }
                }
                let added = s.hot.bytes() - before;
                // Every record of the call starts at or after `seq`: a safe
                // position to keep the log from.
                let out = s.seg.on_durable(&admitted.new, seq);
                st.hot_bytes += added;
                out
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
                let s = st.seg_mut(id)?;
                s.seg.defer_ack(admitted.waits_for, tx).is_none()
            };
            if deferred {
                // The first copies' writer wakes us once they are durable;
                // if it failed, its error went to its own caller.
                rx.await
                    .map_err(|_| AppendError::Failed("the first copy of a re-sent record failed".into()))?;
            }
        }
        // The epoch again, with the SCL under one lock: a writer that sealed
        // the segment meanwhile has read an SCL without this batch, so the
        // old writer must not count it.
        let st = self.state();
        let s = st.seg(id)?;
        s.seg.check_epoch(epoch)?;
        Ok(s.seg.scl())
    }

    /// Read both slots of a page (or the one `known` says is current) and
    /// say which holds the current version. `torn_after`: see
    /// [`SegState::torn_after`].
    async fn read_current(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
        known: SlotState,
        torn_after: Option<u64>,
    ) -> Result<Current, NodeError> {
        let slot_blocks = extent.slot_blocks();
        if let SlotState::Slot0 | SlotState::Slot1 = known {
            let slot = usize::from(known == SlotState::Slot1);
            let at = extent.slot_block(local, slot);
            let buf = AlignedBuf::zeroed_blocks(slot_blocks as usize);
            let (buf, result) = self.io.read(block_offset(at), buf).await;
            result?;
            if let pagestore::Slot::Version(version) =
                pagestore::decode_slot(&buf, &self.device_id, extent, id, page, at)
            {
                return self.judge(id, extent, page, local, Current::Version { slot, version }, torn_after);
            }
            // Not what the map said: look at both.
        }
        if known == SlotState::Never {
            return self.judge(id, extent, page, local, Current::Never, torn_after);
        }
        let slots = self.read_page_slots(id, extent, page, local).await?;
        let damaged_slot = slots.iter().position(|s| matches!(s, pagestore::Slot::Damaged(_)));
        match pagestore::current(slots, torn_after) {
            Ok(chosen) => {
                if let Some(other) = chosen.other {
                    let offset = block_offset(extent.slot_block(local, other.slot));
                    if other.maybe_torn {
                        tracing::warn!(page, offset, error = %other.error,
                            "page version slot unreadable: a round open at the last crash may have torn it; the other slot is current");
                    } else {
                        tracing::error!(page, offset, error = %other.error,
                            "page version slot damaged; it held an older version, the other slot is current");
                    }
                }
                self.judge(id, extent, page, local, chosen.current, torn_after)
            }
            Err(source) => {
                let offset = block_offset(extent.slot_block(local, damaged_slot.unwrap_or(0)));
                tracing::error!(page, offset, error = %source, "page version damaged: the page is not served from this segment");
                // Reported in the segment's status until a valid version
                // of the page is read or written.
                if let Ok(s) = self.state().seg_mut(id) {
                    s.set_slot_state(local, SlotState::Damaged);
                }
                Err(NodeError::PageDamaged { page, offset, source })
            }
        }
    }

    /// Write `version` of `page` into slot `slot`: durably, or (hydration)
    /// durable only at a later flush.
    #[allow(clippy::too_many_arguments)]
    async fn write_slot(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
        slot: usize,
        version: &pagestore::PageVersion,
        durability: Durability,
    ) -> Result<(), NodeError> {
        let at = extent.slot_block(local, slot);
        let mut buf = AlignedBuf::zeroed_blocks(extent.slot_blocks() as usize);
        pagestore::encode_version(&mut buf, self.device_id, extent, id, page, at, version);
        let (_, result) = match durability {
            Durability::Durable => self.io.write(block_offset(at), buf).await,
            Durability::Volatile => self.io.write_volatile(block_offset(at), buf).await,
        };
        result?;
        Ok(())
    }

    /// Write a page's first version into [`pagestore::FIRST_SLOT`] and
    /// its other slot back to never written, at once: what a crash tore in
    /// either slot before is gone once both are written (a crash before
    /// that leaves the round or the rebuild that wrote them open, as a
    /// crash within one write of both would).
    async fn write_first_slots(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
        version: &pagestore::PageVersion,
        durability: Durability,
    ) -> Result<(), NodeError> {
        let slot_blocks = extent.slot_blocks() as usize;
        let slot = pagestore::FIRST_SLOT;
        let (at, other_at) = (extent.slot_block(local, slot), extent.slot_block(local, 1 - slot));
        let mut buf = AlignedBuf::zeroed_blocks(slot_blocks);
        pagestore::encode_version(&mut buf, self.device_id, extent, id, page, at, version);
        let write = |at: u64, buf: AlignedBuf| match durability {
            Durability::Durable => self.io.write(block_offset(at), buf),
            Durability::Volatile => self.io.write_volatile(block_offset(at), buf),
        };
        let ((_, first), (_, other)) =
            futures_util::future::join(write(at, buf), write(other_at, AlignedBuf::zeroed_blocks(slot_blocks))).await;
        first?;
        other?;
        Ok(())
    }

    /// Both slots of consecutive pages from `local`, into `halves`: slot 0
    /// of each, in page order, into the first, slot 1 of each into the
    /// second, as many pages as the buffers hold slots. Each is one
    /// stretch of the extent (`pagestore`), and the two are read at once;
    /// `background`: a read for repair ([`PageIo::read_background`]).
    async fn read_slot_halves(
        &self,
        extent: &Extent,
        local: u64,
        halves: [AlignedBuf; 2],
        background: bool,
    ) -> Result<[AlignedBuf; 2], NodeError> {
        let [half0, half1] = halves;
        let read = |slot: usize, buf: AlignedBuf| {
            let at = block_offset(extent.slot_block(local, slot));
            if background {
                self.io.read_background(at, buf)
            } else {
                self.io.read(at, buf)
            }
        };
        let ((half0, read0), (half1, read1)) = futures_util::future::join(read(0, half0), read(1, half1)).await;
        read0?;
        read1?;
        Ok([half0, half1])
    }

    /// What each slot of `page` (local index `local`) holds, read at once.
    async fn read_page_slots(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
    ) -> Result<[pagestore::Slot; 2], NodeError> {
        let blocks = extent.slot_blocks() as usize;
        let halves = [AlignedBuf::zeroed_blocks(blocks), AlignedBuf::zeroed_blocks(blocks)];
        let halves = self.read_slot_halves(extent, local, halves, false).await?;
        Ok([0, 1].map(|slot| {
            let at = extent.slot_block(local, slot);
            pagestore::decode_slot(&halves[slot], &self.device_id, extent, id, page, at)
        }))
    }

    /// The current version the slots hold, judged by the page-version
    /// index (see [`index`]): a version older than it names, or none where
    /// it names one, is damage, reported at the slot that should hold it.
    fn judge(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
        current: Current,
        torn_after: Option<u64>,
    ) -> Result<Current, NodeError> {
        let mut st = self.state();
        let s = st.seg_mut(id)?;
        let found = match &current {
            Current::Never => None,
            Current::Version { version, .. } => Some((version.lsn, &version.bytes[..])),
        };
        match crate::pagemap::verify(s.index_entry(local), found) {
            crate::pagemap::Verdict::Agrees => Ok(current),
            crate::pagemap::Verdict::Behind(entry) => {
                // Within the torn-write window this is the open round's
                // version, and the round's redo writes the index; else the
                // index block's write was lost.
                if torn_after.is_none_or(|c| entry.lsn <= c) && s.index_entry(local) != crate::pagemap::UNKNOWN {
                    tracing::warn!(
                        page,
                        lsn = entry.lsn,
                        "the page-version index was behind a valid version (a lost index write); it takes the version"
                    );
                }
                s.index_set(local, entry);
                Ok(current)
            }
            crate::pagemap::Verdict::Damaged(why) => {
                let slot = match &current {
                    Current::Never => pagestore::FIRST_SLOT,
                    Current::Version { slot, .. } => 1 - slot,
                };
                let offset = block_offset(extent.slot_block(local, slot));
                tracing::error!(page, offset, error = %why, "page version damaged: the page is not served from this segment");
                s.set_slot_state(local, SlotState::Damaged);
                Err(NodeError::PageDamaged {
                    page,
                    offset,
                    source: pagestore::SlotError::Mismatch(why),
                })
            }
        }
    }

    /// The page as of `read_point`, and the LSN of the last change in it
    /// (0 and zeros for a page never written): its newest version plus the
    /// hot records above it.
    pub async fn get_page(
        &self,
        id: SegmentId,
        epoch: u64,
        page: u64,
        read_point: u64,
    ) -> Result<(Vec<u8>, u64), NodeError> {
        let got = self.read_page(id, epoch, page, read_point).await;
        if let Err(NodeError::PageDamaged { .. }) = &got {
            self.counters.page_damaged_answers.fetch_add(1, Ordering::Relaxed);
            // Served by another segment meanwhile (computed asks another);
            // the scrubber repairs this one.
            self.damage_seen(id);
        }
        got
    }

    async fn read_page(
        &self,
        id: SegmentId,
        epoch: u64,
        page: u64,
        read_point: u64,
    ) -> Result<(Vec<u8>, u64), NodeError> {
        // Taken before the slot map is consulted and held until the hot
        // records are applied: the version read stays current, and the hot
        // records above it stay in memory.
        let _stripe = self.stripe(id, page).read().await;
        let (extent, local, known, torn_after, page_bytes) = {
            let st = self.state();
            let s = st.seg(id)?;
            s.seg.check_epoch_read(epoch)?;
            if s.hydration.is_some() {
                return Err(NodeError::Rebuilding);
            }
            if read_point > s.seg.scl() {
                return Err(NodeError::ReadPointAboveScl {
                    read_point,
                    scl: s.seg.scl(),
                });
            }
            if read_point < s.pgmrpl {
                return Err(NodeError::ReadPointBelowPgmrpl {
                    read_point,
                    pgmrpl: s.pgmrpl,
                });
            }
            let g = s.geometry;
            let local = g.local(id.pg, page)?;
            (
                s.extent,
                local,
                s.slot_state(local),
                s.torn_after(local),
                g.page_bytes as usize,
            )
        };
        let current = match extent {
            Some(extent) => self.read_current(id, &extent, page, local, known, torn_after).await?,
            None => Current::Never,
        };
        let mut st = self.state();
        let s = st.seg_mut(id)?;
        s.set_slot_state(local, SlotState::of(&current));
        let base = match current {
            Current::Never => None,
            Current::Version { version, .. } => {
                if version.lsn > read_point {
                    // Coalescing writes versions at or below PGMRPL only, and
                    // read points below it are refused above: PGMRPL moved
                    // since. Or a hydration took a peer's version above it.
                    return Err(NodeError::VersionAboveReadPoint {
                        page,
                        lsn: version.lsn,
                        read_point,
                    });
                }
                Some((version.lsn, version.bytes))
            }
        };
        s.hot
            .page_at(page, read_point, base, page_bytes)
            .map_err(|source| NodeError::BadRecord {
                lsn: read_point,
                source,
            })
    }

    /// Count a writer's append that took `us` microseconds.
    pub fn record_foreground(&self, us: u64) {
        self.fg_appends.fetch_add(1, Ordering::Relaxed);
        self.fg_latency_us.fetch_add(us, Ordering::Relaxed);
        self.fg_total_appends.fetch_add(1, Ordering::Relaxed);
        self.fg_total_us.fetch_add(us, Ordering::Relaxed);
        self.counters.append_latency.record_us(us);
    }

    /// Mean latency of the writers' appends since the last call; None if
    /// there were none.
    pub fn take_foreground_latency(&self) -> Option<f64> {
        let n = self.fg_appends.swap(0, Ordering::Relaxed);
        let us = self.fg_latency_us.swap(0, Ordering::Relaxed);
        (n > 0).then(|| us as f64 / n as f64)
    }

    pub fn scl(&self, id: SegmentId) -> u64 {
        self.state().segments.get(&id).map_or(0, |s| s.seg.scl())
    }

    pub fn status(&self, id: SegmentId, epoch: u64) -> Result<SegmentStatus, NodeError> {
        let log = self.log.stats();
        let st = self.state();
        let s = st.seg(id)?;
        s.seg.check_epoch_read(epoch)?;
        Ok(SegmentStatus {
            epoch: s.seg.epoch(),
            scl: s.seg.scl(),
            highest_lsn: s.seg.highest_lsn(),
            lowest_lsn: s.seg.lowest_lsn().unwrap_or(0),
            pgmrpl: s.pgmrpl,
            records: s.seg.records_held() as u64,
            log_bytes: (log.next_seq - log.tail_seq) * BLOCK_SIZE as u64,
            page_store_bytes: s.extent.map_or(0, |e| e.blocks() * BLOCK_SIZE as u64),
            coalesced_lsn: s.coalesced_lsn,
            installed_epoch: s.seg.installed_epoch(),
            annulled: s.seg.annulled().to_vec(),
            holes: s.seg.holes(),
            damage: proto::Damage {
                pages_total: s.damaged_pages,
                pages: (s.damaged_listed.iter())
                    .map(|&local| u64::from(id.pg) * s.geometry.pg_pages + local)
                    .collect(),
                table_slot: self.table_slot_damaged,
            },
            membership: s.membership.clone(),
            hydration: s.hydrated,
        })
    }

    /// A recovering writer fences the segment at `epoch` (creating it, with
    /// nothing installed, if the node does not hold it): requests at older
    /// epochs are refused from now on, and appends at `epoch` wait for its
    /// truncation. Durable when it returns; returns the segment's status.
    pub async fn seal(&self, id: SegmentId, epoch: u64, geometry: PageGeometry) -> Result<SegmentStatus, NodeError> {
        geometry.check()?;
        let _fencing = self.fencing.lock().await;
        {
            let mut st = self.state();
            let gap_max = self.config.gap_records_max;
            let s = st.segments.entry(id).or_insert_with(|| {
                let mut s = SegState::new(id, epoch, geometry, gap_max);
                s.seg.restore_epochs(epoch, 0, &[]);
                s
            });
            same_geometry(id, s.geometry, geometry, "seal")?;
            s.seg.seal(epoch)?;
        }
        self.ensure_durable(id, epoch).await?;
        self.status(id, 0)
    }

    /// A recovering writer's truncation at `epoch`: records in `ranges` are
    /// annulled and `epoch` becomes the installed one; returns the
    /// segment's status after it.
    ///
    /// Order: seal (nothing older is let in), wait for the records already
    /// let in to be written, write an annulment to the log (start-up drops
    /// what the log held before it, and keeps a later re-send), drop the
    /// records from memory (memory follows the log, whatever comes next),
    /// then write the table (the installed epoch and the ranges, which
    /// replace the held ones) and install the epoch. No seal comes between:
    /// both hold `fencing`.
    pub async fn truncate(&self, id: SegmentId, epoch: u64, ranges: Vec<LsnRange>) -> Result<SegmentStatus, NodeError> {
        if ranges.len() > crate::segment::ANNULLED_RANGES_MAX {
            return Err(SegmentError::TooManyRanges(ranges.len()).into());
        }
        if let Some(&(lo, hi)) = ranges.iter().find(|&&(lo, hi)| lo == 0 || hi < lo) {
            return Err(NodeError::BadTruncation(format!(
                "truncation range {lo}..={hi} is empty"
            )));
        }
        let _fencing = self.fencing.lock().await;
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            // Fence first: nothing older is taken from here on.
            s.seg.seal(epoch)?;
            if let Some(why) = s.seg.truncation_refused(&ranges, s.coalesced_lsn, s.pgmrpl) {
                return Err(NodeError::BadTruncation(why));
            }
        }
        self.ensure_durable(id, epoch).await?;
        // Records let in before the seal are on their way to the log; the
        // annulment must come after them there, or start-up would bring
        // them back. The bound keeps a stuck device from holding the
        // request (and `fencing`) for long: the recovering writer asks again.
        let waited = tokio::time::Instant::now();
        while self.state().seg(id)?.seg.writing() {
            if waited.elapsed() > TRUNCATE_WAIT_MAX {
                return Err(NodeError::TruncationWaited(waited.elapsed()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        if !ranges.is_empty() {
            let annulment = crate::record::Annulment {
                segment: id,
                ranges: ranges.clone(),
            };
            self.log.append_many(vec![annulment.encode()]).await?;
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            let mut freed = 0;
            for (lsn, page) in s.seg.annul(&ranges) {
                freed += s.hot.remove(page, lsn);
            }
            st.hot_bytes -= freed;
        }
        let entry = self
            .update_entry(id, |e, _| {
                let e = e.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                let mut next = SegmentEntry {
                    epoch: e.epoch.max(epoch),
                    installed_epoch: epoch,
                    ..e.clone()
                };
                next.set_annulled(&crate::segment::union_ranges(ranges.iter().copied()));
                Ok(next)
            })
            .await?;
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            s.seg
                .restore_epochs(entry.epoch.max(s.seg.epoch()), epoch, entry.annulled());
        }
        self.status(id, 0)
    }

    /// The chain's records above `after`, up to the SCL and about
    /// `max_bytes` (at least one record if any), for a recovering writer.
    /// Records at or below the segment's coalesced LSN are in page versions
    /// and cannot be returned: asking for them is refused.
    pub fn read_records(
        &self,
        id: SegmentId,
        epoch: u64,
        after: u64,
        max_bytes: usize,
    ) -> Result<(u64, Vec<RedoRecord>), NodeError> {
        let st = self.state();
        let s = st.seg(id)?;
        s.seg.check_epoch_read(epoch)?;
        chain_records(s, after, max_bytes)
    }

    /// Record the lowest read point any reader of the segment still holds.
    /// It only moves forward; it is durable when this returns. Coalescing
    /// follows it.
    pub async fn set_pgmrpl(&self, id: SegmentId, epoch: u64, lsn: u64) -> Result<u64, NodeError> {
        let current = {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            s.seg.check_epoch(epoch)?;
            s.pgmrpl
        };
        if lsn <= current {
            self.ensure_durable(id, epoch).await?;
            return Ok(current);
        }
        let entry = self
            .update_entry(id, |e, _| {
                let e = e.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                Ok(SegmentEntry {
                    epoch: e.epoch.max(epoch),
                    pgmrpl: e.pgmrpl.max(lsn),
                    ..e.clone()
                })
            })
            .await?;
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            s.pgmrpl = s.pgmrpl.max(entry.pgmrpl);
            s.durable_epoch = Some(s.durable_epoch.unwrap_or(0).max(entry.epoch));
        }
        self.coalesce_wake.notify_one();
        Ok(entry.pgmrpl)
    }

    /// Where the log may be freed up to: the oldest block a record not yet
    /// in page versions starts in, across every segment.
    fn release_point(&self) -> u64 {
        let next = self.log.stats().next_seq;
        let st = self.state();
        let mut point = st.pins.keys().next().copied().unwrap_or(next).min(next);
        for s in st.segments.values() {
            if let Some(seq) = s.seg.oldest_log_seq() {
                point = point.min(seq);
            }
        }
        point
    }

    /// Stop: the coalescer ends its page write, the log finishes the writes
    /// it accepted. Call after the server stopped taking requests; the node
    /// is not usable afterwards.
    pub async fn shutdown(self: Arc<Self>) {
        self.stopping.store(true, Ordering::Relaxed);
        self.coalesce_wake.notify_one();
        let coalescer = self.coalescer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = coalescer {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), c).await;
        }
        let driver = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(self);
        if let Some(driver) = driver {
            // The log's driver ends when the last engine handle goes, which
            // is when the last Arc<Node> goes; give in-flight handlers a moment.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), driver).await;
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_damage;
#[cfg(test)]
mod tests_gossip;
#[cfg(test)]
mod tests_hydrate;
#[cfg(test)]
mod tests_scrub;
