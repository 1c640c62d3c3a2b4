//! The storage node's wire protocol, sans-IO: bytes in, values out.
//!
//! This module owns the byte layout of every frame and message exchanged by
//! computed, storage nodes and operator tools, and every check a receiver
//! makes before it believes one. It opens no socket and starts no task: a
//! connection's shell reads bytes, pushes them into a [`FrameDecoder`] and
//! acts on the [`Frame`]s it yields, and writes what [`encode_frame`] built.
//! That keeps the protocol checkable byte by byte and lets the deterministic
//! simulator run it without a network (docs/architecture.md, "Testing").
//!
//! `docs/protocol.md` documents every field; it and this module change together.
//!
//! - `frame`: the envelope (length, version, type, flags, request id,
//!   CRC32C), one-shot encode/decode and the streaming decoder;
//! - `message`: the message types, roles and error codes;
//! - `body`: each message's body layout, encoded and strictly decoded;
//! - `scrub`: the layouts of the scrub messages' filter and report;
//! - `error`: what can be wrong with received bytes, and the code to answer with.

mod body;
pub(crate) use body::check_batch_order;
mod error;
mod frame;
mod message;
mod scrub;
#[cfg(test)]
mod tests;

pub use error::ProtoError;
pub use frame::{
    AppendHeader, FrameDecoder, RawFrame, decode_frame, encode_append_frame, encode_frame, split_frame, write_frame,
};
pub use message::{
    Damage, ErrorCode, Frame, GossipDigest, Hydration, Membership, Message, MessageType, NodeStatus, Role,
    WirePageVersion,
};
pub use scrub::{FINDING_ERROR_BYTES_MAX, SCRUB_AREAS_MAX, SCRUB_SEGMENTS_MAX, fit_status_for_wire};

/// The version this code speaks, in byte 4 of every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest frame, length field included. A node may configure a lower limit
/// for what it accepts; it never sends more. Enough for a batch of 63
/// maximal (64 KiB) records, while a connection's buffer stays small.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;
/// The length field that starts every frame.
pub const LENGTH_FIELD_BYTES: usize = 4;
/// Length field, version, type, flags, request id and CRC.
pub const FRAME_HEADER_BYTES: usize = 20;
/// Smallest value of the length field: the header after it, with an empty body.
pub const FRAME_LENGTH_MIN: usize = FRAME_HEADER_BYTES - LENGTH_FIELD_BYTES;
/// Longest text of an `Error` message, in bytes of UTF-8.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;
