//! What can be wrong with a frame, and the [`ErrorCode`] a server answers with
//! before it closes the connection.

use thiserror::Error;

use super::message::{ErrorCode, MessageType};
use super::{ERROR_MESSAGE_BYTES_MAX, FRAME_LENGTH_MIN};
use crate::record::{RecordError, SegmentId};

/// A frame that cannot be decoded, or a message that cannot be encoded.
///
/// Every variant but [`ProtoError::UnsupportedVersion`] means the peer sent
/// bytes this node cannot trust; the stream is out of step from there on, so
/// the connection is answered with an `Error` (see [`ProtoError::error_code`])
/// and closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("frame of {frame_bytes} bytes exceeds the {frame_bytes_max}-byte limit")]
    FrameTooLarge { frame_bytes: usize, frame_bytes_max: usize },
    #[error("frame length field {length} is below the minimum of {FRAME_LENGTH_MIN}")]
    FrameTooSmall { length: u32 },
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("frame has flags {0:#06x}; version 1 defines none")]
    BadFlags(u16),
    #[error("frame CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("unknown message type {0}")]
    UnknownMessageType(u8),
    #[error("{kind:?} body of {have} bytes is too short: need {need}")]
    BodyTooShort {
        kind: MessageType,
        have: usize,
        need: usize,
    },
    #[error("{kind:?} body of {have} bytes is too long: its fields end at {expected}")]
    BodyTooLong {
        kind: MessageType,
        have: usize,
        expected: usize,
    },
    #[error("unknown role {0}")]
    UnknownRole(u8),
    #[error("record {index} of the batch: {source}")]
    BadRecord {
        index: usize,
        #[source]
        source: RecordError,
    },
    #[error("batch declares {declared} records but its body has room for at most {room}")]
    RecordCountImpossible { declared: u32, room: usize },
    #[error("record {index} (LSN {lsn}) belongs to {record:?}, not to the batch's {batch:?}")]
    ForeignRecord {
        index: usize,
        lsn: u64,
        record: SegmentId,
        batch: SegmentId,
    },
    #[error("record {index} has LSN {lsn}, not above the previous record's {prev}")]
    LsnNotIncreasing { index: usize, prev: u64, lsn: u64 },
    #[error("{0} truncation ranges; at most {max}", max = crate::segment::ANNULLED_RANGES_MAX)]
    TooManyRanges(usize),
    #[error("{0} holes; at most {max}", max = crate::segment::HOLES_REPORTED_MAX)]
    TooManyHoles(usize),
    #[error("{listed} damaged pages listed of {total}; at most {max} and at most the total", max = crate::segment::DAMAGED_PAGES_REPORTED_MAX)]
    BadDamagedPages { listed: usize, total: u32 },
    #[error("truncation range {lo}..={hi} is empty or starts at 0")]
    BadRange { lo: u64, hi: u64 },
    #[error("append batch holds no records")]
    EmptyBatch,
    #[error("error message is not valid UTF-8")]
    BadUtf8,
    #[error("error message of {0} bytes exceeds the {ERROR_MESSAGE_BYTES_MAX}-byte limit")]
    MessageTooLong(usize),
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
    #[error("bad membership: {0}")]
    BadMembership(crate::membership::MembershipError),
    /// A scrub filter or report that breaks its rules (a bound, a kind, a
    /// flag, a field its kind does not use that is not zero).
    #[error("bad scrub message: {0}")]
    BadScrub(String),
}

impl ProtoError {
    /// The code to put in the `Error` reply sent before closing the connection.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            // The one case where the peer did nothing wrong by its own rules:
            // telling it apart lets it retry with an older version.
            ProtoError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::BadFrame,
        }
    }
}
