//! Scrub: every written log block and every current page version of every
//! segment is read again on a schedule and verified, and what is damaged is
//! repaired, locally where the node still holds a good copy, else from a
//! peer whose copy verifies.
//!
//! - [`core`]: the sans-IO tour: where a pass starts (a random point), where
//!   it is, how fast it may go (a full-pass period per device, a bytes/s
//!   ceiling, backing off when foreground latency rises), priority passes
//!   asked for by `storctl scrub`, and the reports.
//! - [`progress`]: the tour's position, kept durably so a pass resumes
//!   after a restart.
//! - [`shell`]: the tokio task that runs the core over a [`Store`] (the
//!   node) and fetches copies from [`Peers`].
//! - [`bufs`]: the read buffers the shell lends the store, kept from range
//!   to range.
//!
//! The words of a report ([`PassReport`], [`Status`]) are what
//! `storctl scrub` and `storctl status` print, and travel on the wire
//! (docs/protocol.md, `Scrub` and `ScrubStatus`).

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;

use crate::record::SegmentId;

pub mod bufs;
pub mod core;
pub mod progress;
pub mod shell;

#[cfg(test)]
mod tests;

/// What a pass covers: the log and one extent per segment, in device blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The log region (every block of it; the store tells a live block
    /// from a released one).
    pub log: Range<u64>,
    /// Each segment's extent of the page store.
    pub segments: Vec<(SegmentId, Range<u64>)>,
}

/// A part of the device a report counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Area {
    Log,
    Segment(SegmentId),
}

/// What was wrong with a block or a page version, where, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Byte offset on the device of the first block concerned.
    pub offset: u64,
    pub what: Damaged,
    /// Why it does not verify (a CRC, an identity, an index disagreement).
    pub error: String,
    pub repaired: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damaged {
    /// A live log block (one the node still needs to start up).
    LogBlock,
    /// The current version of `page`, which the index says is at `lsn`.
    PageVersion { page: u64, lsn: u64 },
    /// The slot of `page` that does not hold its current version.
    OlderSlot { page: u64 },
    /// One copy of a block of the segment's page-version index, covering
    /// pages from `first_page`.
    PageMap { first_page: u64 },
}

/// A page whose current version the node cannot repair alone: a peer's copy
/// of the page at exactly `lsn` is needed, and is used only if its CRC32C
/// is `crc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedCopy {
    pub segment: SegmentId,
    pub page: u64,
    pub lsn: u64,
    pub crc: u32,
    /// Byte offset of the damaged slot (for the report).
    pub offset: u64,
}

/// What one [`Store::scrub_range`] call checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// Blocks read and verified.
    pub blocks: u64,
    /// Current page versions verified.
    pub pages: u64,
    /// Damage found, repaired locally or not (a page needing a copy is
    /// both here, unrepaired, and in `need_copy`).
    pub found: Vec<Finding>,
    pub need_copy: Vec<NeedCopy>,
}

/// Counts of one area in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AreaReport {
    pub blocks_checked: u64,
    pub pages_checked: u64,
    pub found: u64,
    pub repaired: u64,
    /// Damage left (not repaired), with locations; at most
    /// [`LEFT_LISTED_MAX`] listed, `found - repaired` counted.
    pub left: Vec<Finding>,
}

/// Findings listed per area in a report.
pub const LEFT_LISTED_MAX: usize = 64;

/// A finished (or running) pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Passes are numbered from 1 on each device, durably.
    pub pass: u64,
    /// Asked for by an operator (runs at the ceiling rate, over the chosen
    /// segments only), not the background tour.
    pub priority: bool,
    pub started_unix_secs: u64,
    /// 0 while running.
    pub ended_unix_secs: u64,
    pub bytes_read: u64,
    pub areas: Vec<(Area, AreaReport)>,
}

/// What `ScrubStatus` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The pass under way, if any: its number, whether it is a priority
    /// pass, bytes done and bytes it will read in all.
    pub running: Option<Running>,
    /// The last completed pass (background or priority).
    pub last: Option<PassReport>,
    /// Since the node started: damage found and repaired, and left now.
    pub found_total: u64,
    pub repaired_total: u64,
    pub left_now: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Running {
    pub pass: u64,
    pub priority: bool,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Which segments a priority pass covers (the log always).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    All,
    Segments(Vec<SegmentId>),
}

/// A peer to fetch a copy from: its node id and address (the segment's
/// membership names them).
pub type Peer = (u64, SocketAddr);

/// What the shell needs of the node; [`crate::node::Node`] is one.
pub trait Store: Send + Sync + 'static {
    fn layout(&self) -> Layout;
    /// Verify `range` (blocks inside one area of [`Layout`]), and repair
    /// what the node can alone: a log block whose records it still holds in
    /// memory, a damaged older slot, an index copy. A block freed or
    /// rewritten while it was read is not damage. Reads go into buffers
    /// taken from `bufs` and given back.
    fn scrub_range(
        &self,
        area: Area,
        range: Range<u64>,
        bufs: &bufs::BufPool,
    ) -> impl Future<Output = Result<Checked, String>> + Send;
    /// A peer's copy of a page for a [`NeedCopy`]: the node checks it
    /// against its index (LSN, CRC32C), writes it out of place, reads it
    /// back, and only then uses it. Err says why it was not used.
    fn install_copy(&self, need: NeedCopy, bytes: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
    /// The segment's peers (its membership without this node), and the
    /// epochs a request to them carries: (installed volume epoch,
    /// membership epoch).
    fn peers(&self, id: SegmentId) -> Option<(Vec<Peer>, u64, u64)>;
    /// Read one block of the metadata area (the progress slots).
    fn read_meta_block(&self, block: u64) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
    /// Write one 4 KiB block of the metadata area durably.
    fn write_meta_block(&self, block: u64, bytes: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
    /// The foreground's appends since start-up: how many, and their summed
    /// latency in microseconds (never reset: each reader keeps its own
    /// previous sample).
    fn foreground_totals(&self) -> (u64, u64);
}

/// Fetching page copies from peers; the node's network client is one.
pub trait Peers: Send + Sync + 'static {
    /// Page `page` of segment `id` exactly as of `lsn` (every change at or
    /// below it, none above), from `peer`.
    fn page_at(
        &self,
        peer: Peer,
        id: SegmentId,
        epochs: (u64, u64),
        page: u64,
        lsn: u64,
    ) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
}
