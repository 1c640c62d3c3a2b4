//! The messages: their types and numbers, the roles and error codes they
//! carry. How each is laid out on the wire is in `body`.

use super::ERROR_MESSAGE_BYTES_MAX;
pub use crate::gossip::Digest as GossipDigest;
pub use crate::membership::Membership;
use crate::record::{RedoRecord, WireRecord};
use crate::scrub;

/// A node's device as a whole (`NodeStatusOk`), in 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeStatus {
    pub node_id: u64,
    /// The page store, where each segment takes one extent for good.
    pub page_store_blocks: u64,
    /// What no segment's extent takes: a new segment's extent must fit in
    /// it (`pagestore::Extent::blocks_for`).
    pub page_store_free_blocks: u64,
    pub log_blocks: u64,
    /// Log blocks free now (released once coalesced).
    pub log_free_blocks: u64,
}

/// One page version in a `PageVersions` reply: the page as of `lsn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePageVersion {
    pub page: u64,
    pub lsn: u64,
    pub bytes: Vec<u8>,
}

/// Damage a node found under a segment, as `SegmentStatus` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Damage {
    /// Pages of the segment whose current version the node found damaged
    /// (by a read or by coalescing) since it opened its device.
    pub pages_total: u32,
    /// The lowest of them, ascending, at most
    /// [`crate::segment::DAMAGED_PAGES_REPORTED_MAX`] and at most `pages_total`.
    pub pages: Vec<u64>,
    /// A slot of the node's segment table was damaged when it last opened
    /// its device (a node-wide fact, reported by every segment).
    pub table_slot: bool,
}

/// A segment's hydration (the one under way, or the last one since the
/// node started), as `SegmentStatus` reports it: what an operator's
/// progress bar shows while a segment is rebuilt from its peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hydration {
    pub under_way: bool,
    /// Bytes of page versions it has written.
    pub bytes: u64,
    /// Pages of the segment it has gone through (written or found to need
    /// nothing), of the segment's `pg_pages`.
    pub pages: u64,
}

impl Damage {
    pub fn is_empty(&self) -> bool {
        self.pages_total == 0 && !self.table_slot
    }
}

/// The message type byte of a frame. Requests are odd, their replies the next
/// even number, except `Seal` and `Truncate`, answered by `SegmentStatus`;
/// `Error` answers any request and stands apart at 255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Hello = 1,
    HelloOk = 2,
    Append = 3,
    AppendAck = 4,
    GetPage = 5,
    Page = 6,
    SetPgmrpl = 7,
    PgmrplOk = 8,
    GetSegmentStatus = 9,
    SegmentStatus = 10,
    Seal = 11,
    Truncate = 13,
    ReadRecords = 15,
    Records = 16,
    SetMembership = 17,
    Digest = 19,
    DigestOk = 20,
    PullRecords = 21,
    GetPageVersions = 23,
    PageVersions = 24,
    Scrub = 25,
    ScrubStarted = 26,
    ScrubStatus = 27,
    ScrubStatusOk = 28,
    GetPageAt = 29,
    PageAt = 30,
    FillGaps = 31,
    FillGapsOk = 32,
    NodeStatus = 33,
    NodeStatusOk = 34,
    Error = 255,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<MessageType> {
        let kind = match v {
            1 => MessageType::Hello,
            2 => MessageType::HelloOk,
            3 => MessageType::Append,
            4 => MessageType::AppendAck,
            5 => MessageType::GetPage,
            6 => MessageType::Page,
            7 => MessageType::SetPgmrpl,
            8 => MessageType::PgmrplOk,
            9 => MessageType::GetSegmentStatus,
            10 => MessageType::SegmentStatus,
            11 => MessageType::Seal,
            13 => MessageType::Truncate,
            15 => MessageType::ReadRecords,
            16 => MessageType::Records,
            17 => MessageType::SetMembership,
            19 => MessageType::Digest,
            20 => MessageType::DigestOk,
            21 => MessageType::PullRecords,
            23 => MessageType::GetPageVersions,
            24 => MessageType::PageVersions,
            25 => MessageType::Scrub,
            26 => MessageType::ScrubStarted,
            27 => MessageType::ScrubStatus,
            28 => MessageType::ScrubStatusOk,
            29 => MessageType::GetPageAt,
            30 => MessageType::PageAt,
            31 => MessageType::FillGaps,
            32 => MessageType::FillGapsOk,
            33 => MessageType::NodeStatus,
            34 => MessageType::NodeStatusOk,
            255 => MessageType::Error,
            _ => return None,
        };
        Some(kind)
    }
}

/// Who opened the connection, as it says in `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    Computed = 1,
    StorageNode = 2,
    Operator = 3,
}

impl Role {
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Computed),
            2 => Some(Role::StorageNode),
            3 => Some(Role::Operator),
            _ => None,
        }
    }
}

/// Why a request failed, in an `Error` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded; the connection is closed after this.
    BadFrame = 1,
    UnsupportedVersion = 2,
    /// The request's epoch is older than the node's; `current_epoch` says which.
    StaleEpoch = 3,
    ReadPointAboveScl = 4,
    UnknownSegment = 5,
    /// A record with the same LSN but different content is already stored.
    Conflict = 6,
    BadRequest = 7,
    Overloaded = 8,
    ShuttingDown = 9,
    PageOutOfRange = 10,
    Internal = 11,
    /// The read point is below the segment's PGMRPL: what it needs may be collected.
    ReadPointBelowPgmrpl = 12,
    /// The segment's stored version of the page is damaged; read another segment.
    PageDamaged = 13,
    /// The request's epoch is newer than the one the segment has installed:
    /// a recovering writer's `Truncate` at that epoch must come first.
    EpochNotInstalled = 14,
    /// A gossip request from a node that is not a member of the PG at the
    /// receiver's membership epoch.
    NotMember = 15,
    /// The request's membership epoch differs from the receiver's;
    /// `current_epoch` carries the receiver's membership epoch.
    StaleMembership = 16,
    /// The segment is being rebuilt from its peers (hydrating): read another.
    Rebuilding = 17,
    /// `GetPageAt`: this node cannot build the page at exactly that LSN (its
    /// own version is damaged, newer than the LSN, or it lacks records up
    /// to it): ask another member.
    NotHeld = 18,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        let code = match v {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::StaleEpoch,
            4 => ErrorCode::ReadPointAboveScl,
            5 => ErrorCode::UnknownSegment,
            6 => ErrorCode::Conflict,
            7 => ErrorCode::BadRequest,
            8 => ErrorCode::Overloaded,
            9 => ErrorCode::ShuttingDown,
            10 => ErrorCode::PageOutOfRange,
            11 => ErrorCode::Internal,
            12 => ErrorCode::ReadPointBelowPgmrpl,
            13 => ErrorCode::PageDamaged,
            14 => ErrorCode::EpochNotInstalled,
            15 => ErrorCode::NotMember,
            16 => ErrorCode::StaleMembership,
            17 => ErrorCode::Rebuilding,
            18 => ErrorCode::NotHeld,
            _ => return None,
        };
        Some(code)
    }
}

/// One decoded frame: the request id of the envelope and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Replies carry the id of the request they answer; server-initiated
    /// messages use 0.
    pub request_id: u64,
    pub message: Message,
}

/// Every message of protocol version 1. Requests from computed carry the
/// volume id and the epoch the sender believes current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        role: Role,
        node_id: u64,
        protocol_version: u16,
    },
    HelloOk {
        node_id: u64,
        protocol_version: u16,
    },
    /// One segment's records in strictly increasing LSN order; never empty.
    /// `page_bytes` and `pg_pages` are the volume's geometry: the segment
    /// holds pages `pg * pg_pages .. (pg + 1) * pg_pages` of `page_bytes`
    /// each. The first Append creates the segment with them; later ones
    /// must repeat them. Each record comes with its encoding (the bytes the
    /// frame carried, on the receiving side), which the node writes to its
    /// log as it is; build one with `WireRecord::new`.
    Append {
        volume: u64,
        epoch: u64,
        pg: u32,
        page_bytes: u32,
        pg_pages: u64,
        /// The PG's membership epoch as the writer has it; a segment that
        /// holds a higher one refuses the batch (`StaleMembership`). 0: not
        /// checked (recovery's replication, which runs before memberships).
        membership_epoch: u64,
        records: Vec<WireRecord>,
    },
    AppendAck {
        volume: u64,
        pg: u32,
        scl: u64,
        /// The node's incarnation (see `SegmentStatus::incarnation`).
        incarnation: u64,
    },
    GetPage {
        volume: u64,
        epoch: u64,
        pg: u32,
        page: u64,
        read_point: u64,
        /// As `Append::membership_epoch`.
        membership_epoch: u64,
    },
    Page {
        volume: u64,
        pg: u32,
        page: u64,
        /// The LSN the page is at: its newest change at or below the read point.
        lsn: u64,
        bytes: Vec<u8>,
    },
    SetPgmrpl {
        volume: u64,
        epoch: u64,
        pg: u32,
        lsn: u64,
    },
    PgmrplOk {
        volume: u64,
        pg: u32,
        pgmrpl: u64,
    },
    GetSegmentStatus {
        volume: u64,
        epoch: u64,
        pg: u32,
    },
    SegmentStatus {
        volume: u64,
        pg: u32,
        epoch: u64,
        scl: u64,
        highest_lsn: u64,
        lowest_lsn: u64,
        pgmrpl: u64,
        records: u64,
        log_bytes: u64,
        page_store_bytes: u64,
        /// The epoch whose truncation the segment applied (appends are
        /// taken at it); below `epoch` while sealed by a recovering writer.
        installed_epoch: u64,
        /// The node's incarnation: a number it draws each time it opens its
        /// device. An SCL only moves forward within one incarnation; under
        /// a new one it is what the node found (a restart may find less
        /// than was acknowledged: damage, a replaced disk).
        incarnation: u64,
        /// The truncation ranges the segment keeps, `(lo, hi)` inclusive,
        /// at most [`crate::segment::ANNULLED_RANGES_MAX`].
        annulled: Vec<(u64, u64)>,
        /// LSN ranges, `(lo, hi)` inclusive, lowest first, in which the
        /// segment lacks records of its chain below records it holds (the
        /// SCL stops below the first). `hi` = `u64::MAX`: the segment may
        /// lack records above `lo - 1` it acknowledged before its log was
        /// damaged. At most [`crate::segment::HOLES_REPORTED_MAX`] (the
        /// lowest). Empty from a sender that predates the field.
        holes: Vec<(u64, u64)>,
        /// What the node found damaged under the segment; none from a
        /// sender that predates the field.
        damage: Damage,
        /// The PG's membership as the segment holds it; none if its writer
        /// never set one (or from a sender that predates the field).
        membership: Option<Membership>,
        /// Its hydration under way, or its last since the node started;
        /// none if it has not hydrated since (or from a sender that
        /// predates the field).
        hydration: Option<Hydration>,
    },
    /// The writer sets the PG's membership on the segment (creating the
    /// segment with the geometry if the node does not hold it). A lower
    /// membership epoch than the segment's is refused (`StaleMembership`),
    /// the same epoch with other members is `BadRequest`. Answered by
    /// `SegmentStatus`.
    SetMembership {
        volume: u64,
        epoch: u64,
        pg: u32,
        page_bytes: u32,
        pg_pages: u64,
        membership: Membership,
        /// The writer's truncation ranges at `epoch`, `(lo, hi)` inclusive:
        /// a segment this request creates takes them as applied (it never
        /// held a record of an older epoch), so a later recovery that
        /// sends them again is not refused. Ignored by an existing segment.
        /// Empty from a sender that predates the field.
        annulled: Vec<(u64, u64)>,
    },
    /// A peer's digest of its segment of `pg`; answered by `DigestOk` with
    /// the receiver's own. Only from a member (the `Hello`'s node id) at
    /// the receiver's membership epoch.
    Digest {
        volume: u64,
        pg: u32,
        digest: GossipDigest,
    },
    DigestOk {
        volume: u64,
        pg: u32,
        digest: GossipDigest,
    },
    /// A peer pulls the chain above `after`, up to the receiver's SCL, at
    /// most `max_bytes` of records (at least one if any); answered by
    /// `Records`. Refused unless both sides have installed the same volume
    /// epoch and hold the same membership epoch, and the sender is a member.
    PullRecords {
        volume: u64,
        pg: u32,
        installed_epoch: u64,
        membership_epoch: u64,
        after: u64,
        max_bytes: u32,
    },
    /// A peer fetches the receiver's current page versions from
    /// `first_page` on (pages never written are skipped), at most
    /// `max_bytes` of page bytes (at least one version if any). Same
    /// conditions as `PullRecords`. Answered by `PageVersions`.
    GetPageVersions {
        volume: u64,
        pg: u32,
        installed_epoch: u64,
        membership_epoch: u64,
        first_page: u64,
        max_bytes: u32,
        /// Only versions above this LSN are sent: the asker holds every
        /// change at or below it (its own coalesced LSN). 0: all.
        changed_after: u64,
    },
    PageVersions {
        volume: u64,
        pg: u32,
        /// Every version below holds every change to its page at or below
        /// this LSN (the receiver's coalesced LSN before it read them).
        floor: u64,
        /// The page to ask for next; the PG's end when none is left.
        next_page: u64,
        versions: Vec<WirePageVersion>,
    },
    /// An operator asks the node for a priority scrub pass over the
    /// segments `filter` names (the log always); answered by
    /// `ScrubStarted` with the number of the pass.
    Scrub {
        filter: scrub::Filter,
    },
    ScrubStarted {
        pass: u64,
    },
    /// An operator asks how the node's scrubbing stands; answered by
    /// `ScrubStatusOk`.
    ScrubStatus,
    ScrubStatusOk {
        status: scrub::Status,
    },
    /// A peer asks for page `page` of the segment exactly as of `lsn` (every
    /// change at or below it, none above), to repair its own damaged copy.
    /// Same conditions as `PullRecords`. Answered by `PageAt`, or
    /// `Error(NotHeld)` when the node cannot build the page at exactly `lsn`.
    GetPageAt {
        volume: u64,
        pg: u32,
        installed_epoch: u64,
        membership_epoch: u64,
        page: u64,
        lsn: u64,
    },
    PageAt {
        volume: u64,
        pg: u32,
        page: u64,
        lsn: u64,
        bytes: Vec<u8>,
    },
    /// An operator asks the node to fill the segment's gaps now: it asks
    /// every peer for its digest at once, as if its gossip round were due,
    /// and pulls or hydrates what it lacks without waiting out a back-off.
    /// Answered by `FillGapsOk`, or `Error(UnknownSegment)` when the node
    /// holds no segment of the PG with a membership.
    FillGaps {
        volume: u64,
        pg: u32,
    },
    FillGapsOk {
        volume: u64,
        pg: u32,
    },
    /// An operator asks how the node's device stands as a whole: the room
    /// its page store has for new segments, and its log. Answered by
    /// `NodeStatusOk`.
    NodeStatus,
    NodeStatusOk {
        status: NodeStatus,
    },
    /// A recovering writer fences the segment at `epoch` (creating it with
    /// the geometry if the node does not hold it): requests at older epochs
    /// are refused from now on. Answered by `SegmentStatus`.
    Seal {
        volume: u64,
        epoch: u64,
        pg: u32,
        page_bytes: u32,
        pg_pages: u64,
    },
    /// The writer's truncation at `epoch`: records at LSNs in `ranges`
    /// (inclusive) are annulled, and `epoch` becomes the installed one.
    /// Answered by `SegmentStatus`.
    Truncate {
        volume: u64,
        epoch: u64,
        pg: u32,
        ranges: Vec<(u64, u64)>,
    },
    /// The segment's chain above `after` up to its SCL, at most `max_bytes`
    /// of records (at least one if there is any).
    ReadRecords {
        volume: u64,
        epoch: u64,
        pg: u32,
        after: u64,
        max_bytes: u32,
    },
    Records {
        volume: u64,
        pg: u32,
        scl: u64,
        records: Vec<RedoRecord>,
    },
    Error {
        code: ErrorCode,
        /// The node's epoch when `code` is `StaleEpoch`, else 0.
        current_epoch: u64,
        /// UTF-8, at most [`ERROR_MESSAGE_BYTES_MAX`] bytes.
        message: String,
    },
}

impl Message {
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::HelloOk { .. } => MessageType::HelloOk,
            Message::Append { .. } => MessageType::Append,
            Message::AppendAck { .. } => MessageType::AppendAck,
            Message::GetPage { .. } => MessageType::GetPage,
            Message::Page { .. } => MessageType::Page,
            Message::SetPgmrpl { .. } => MessageType::SetPgmrpl,
            Message::PgmrplOk { .. } => MessageType::PgmrplOk,
            Message::GetSegmentStatus { .. } => MessageType::GetSegmentStatus,
            Message::SegmentStatus { .. } => MessageType::SegmentStatus,
            Message::Seal { .. } => MessageType::Seal,
            Message::Truncate { .. } => MessageType::Truncate,
            Message::ReadRecords { .. } => MessageType::ReadRecords,
            Message::Records { .. } => MessageType::Records,
            Message::SetMembership { .. } => MessageType::SetMembership,
            Message::Digest { .. } => MessageType::Digest,
            Message::DigestOk { .. } => MessageType::DigestOk,
            Message::PullRecords { .. } => MessageType::PullRecords,
            Message::GetPageVersions { .. } => MessageType::GetPageVersions,
            Message::PageVersions { .. } => MessageType::PageVersions,
            Message::Scrub { .. } => MessageType::Scrub,
            Message::ScrubStarted { .. } => MessageType::ScrubStarted,
            Message::ScrubStatus => MessageType::ScrubStatus,
            Message::ScrubStatusOk { .. } => MessageType::ScrubStatusOk,
            Message::GetPageAt { .. } => MessageType::GetPageAt,
            Message::PageAt { .. } => MessageType::PageAt,
            Message::FillGaps { .. } => MessageType::FillGaps,
            Message::FillGapsOk { .. } => MessageType::FillGapsOk,
            Message::NodeStatus => MessageType::NodeStatus,
            Message::NodeStatusOk { .. } => MessageType::NodeStatusOk,
            Message::Error { .. } => MessageType::Error,
        }
    }

    /// An `Error` message whose text is cut (at a character boundary) to what
    /// the wire allows, so a server can always report a failure.
    pub fn error(code: ErrorCode, current_epoch: u64, message: impl Into<String>) -> Message {
        let mut message = message.into();
        if message.len() > ERROR_MESSAGE_BYTES_MAX {
            let mut cut = ERROR_MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Message::Error {
            code,
            current_epoch,
            message,
        }
    }
}
