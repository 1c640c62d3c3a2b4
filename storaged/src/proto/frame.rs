//! The frame envelope: encoding one frame, decoding one from the front of a
//! buffer, and the streaming [`FrameDecoder`] a connection feeds.
//!
//! Checks run in the order that lets a receiver stop earliest: the length as
//! soon as its 4 bytes are there (so a huge declared length never makes the
//! receiver wait for, or buffer, more than the maximum), the version as soon
//! as its byte is there, then — once the whole frame is present — the CRC
//! before anything else is believed, then flags, type and body.

use super::PROTOCOL_VERSION;
use super::error::ProtoError;
use super::message::{Frame, Message, MessageType};
use super::{FRAME_BYTES_MAX, FRAME_HEADER_BYTES, FRAME_LENGTH_MIN, LENGTH_FIELD_BYTES};

const OFF_VERSION: usize = 4;
const OFF_KIND: usize = 5;
const OFF_FLAGS: usize = 6;
const OFF_REQUEST_ID: usize = 8;
const OFF_CRC: usize = 16;

/// Append one frame carrying `msg` to `out`.
///
/// Fails, leaving `out` as it was, when the frame would exceed
/// [`FRAME_BYTES_MAX`] or the message breaks a rule the decoder enforces
/// (an empty or unordered batch, a record of another segment, an invalid
/// record, an error text over 1024 bytes): a peer would refuse such a frame,
/// so it is never sent.
pub fn encode_frame(request_id: u64, msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    msg.validate()?;
    // Sized before anything is written: a refused frame costs no encoding.
    let frame_bytes = FRAME_HEADER_BYTES + msg.body_len();
    if frame_bytes > FRAME_BYTES_MAX {
        return Err(ProtoError::FrameTooLarge {
            frame_bytes,
            frame_bytes_max: FRAME_BYTES_MAX,
        });
    }
    out.reserve(frame_bytes);
    write_frame(out, PROTOCOL_VERSION, request_id, FRAME_BYTES_MAX, |out| {
        msg.encode_body(out);
        msg.kind() as u8
    })
}

/// Append one frame of any protocol that uses this envelope (storaged's, and
/// computed's client protocol): the header, the body `body` writes (it
/// returns the message type), then the length and the CRC. Fails, leaving
/// `out` as it was, when the frame exceeds `frame_bytes_max`.
pub fn write_frame(
    out: &mut Vec<u8>,
    version: u8,
    request_id: u64,
    frame_bytes_max: usize,
    body: impl FnOnce(&mut Vec<u8>) -> u8,
) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let kind = body(out);
    let frame_bytes = out.len() - start;
    if frame_bytes > frame_bytes_max {
        out.truncate(start);
        return Err(ProtoError::FrameTooLarge {
            frame_bytes,
            frame_bytes_max,
        });
    }
    let frame = &mut out[start..];
    // Fits: frame_bytes_max is far below u32::MAX.
    frame[..LENGTH_FIELD_BYTES].copy_from_slice(&((frame_bytes - LENGTH_FIELD_BYTES) as u32).to_le_bytes());
    frame[OFF_VERSION] = version;
    frame[OFF_KIND] = kind;
    frame[OFF_REQUEST_ID..OFF_CRC].copy_from_slice(&request_id.to_le_bytes());
    let crc = frame_crc(frame);
    frame[OFF_CRC..FRAME_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The fixed fields of an Append, for [`encode_append_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendHeader {
    pub volume: u64,
    pub epoch: u64,
    pub pg: u32,
    pub page_bytes: u32,
    pub pg_pages: u64,
    pub membership_epoch: u64,
}

/// An Append frame from records already encoded with
/// [`RedoRecord::encode`](crate::record::RedoRecord::encode): the same bytes
/// [`encode_frame`] produces for the equivalent `Message::Append`, without
/// re-encoding, so a writer that sends one batch to six segments encodes
/// each record once. The records are the caller's (a writer's own, encoded
/// by this crate); only the frame size is checked here.
pub fn encode_append_frame(
    request_id: u64,
    header: &AppendHeader,
    records: &[&[u8]],
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    if records.is_empty() {
        return Err(ProtoError::EmptyBatch);
    }
    write_frame(out, PROTOCOL_VERSION, request_id, FRAME_BYTES_MAX, |out| {
        Message::encode_append_fixed(out, header, records.len());
        for r in records {
            out.extend_from_slice(r);
        }
        MessageType::Append as u8
    })
}

/// Decode one frame from the front of `buf`.
///
/// `Ok(None)` while `buf` holds only part of a frame; `Ok(Some((frame,
/// consumed)))` once it holds a whole one. A declared length below 16 or a
/// frame above `frame_bytes_max` (whole frame, length field included; capped
/// at [`FRAME_BYTES_MAX`]) is refused as soon as the length field is there.
///
/// Pure: nothing is allocated until the whole frame is present and its CRC
/// matches, and then only in proportion to the frame's (bounded) length.
pub fn decode_frame(buf: &[u8], frame_bytes_max: usize) -> Result<Option<(Frame, usize)>, ProtoError> {
    let Some(raw) = split_frame(buf, PROTOCOL_VERSION, frame_bytes_max.min(FRAME_BYTES_MAX))? else {
        return Ok(None);
    };
    let kind = MessageType::from_u8(raw.kind).ok_or(ProtoError::UnknownMessageType(raw.kind))?;
    let message = Message::decode_body(kind, raw.body)?;
    let frame = Frame {
        request_id: raw.request_id,
        message,
    };
    Ok(Some((frame, raw.frame_bytes)))
}

/// A whole frame whose envelope checked out; its body is not read yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub kind: u8,
    pub request_id: u64,
    pub body: &'a [u8],
    /// The frame's size, length field included: what to consume from `buf`.
    pub frame_bytes: usize,
}

/// The envelope checks of [`decode_frame`] for a protocol of `version`
/// (storaged's, or computed's client protocol): `Ok(None)` while `buf` holds
/// only part of a frame. The length is checked as soon as its 4 bytes are
/// there, the version as soon as its byte is, then the CRC, then the flags.
pub fn split_frame(buf: &[u8], version: u8, frame_bytes_max: usize) -> Result<Option<RawFrame<'_>>, ProtoError> {
    let Some(length) = buf.first_chunk::<LENGTH_FIELD_BYTES>() else {
        return Ok(None);
    };
    let length = u32::from_le_bytes(*length);
    if (length as usize) < FRAME_LENGTH_MIN {
        return Err(ProtoError::FrameTooSmall { length });
    }
    let frame_bytes = LENGTH_FIELD_BYTES + length as usize;
    if frame_bytes > frame_bytes_max {
        return Err(ProtoError::FrameTooLarge {
            frame_bytes,
            frame_bytes_max,
        });
    }
    // Before the CRC: another version may lay out (and checksum) the rest of
    // the frame differently, and the peer should hear "version", not "CRC".
    if let Some(&found) = buf.get(OFF_VERSION)
        && found != version
    {
        return Err(ProtoError::UnsupportedVersion(found));
    }
    let Some(frame) = buf.get(..frame_bytes) else {
        return Ok(None);
    };
    // Cannot fail: length >= FRAME_LENGTH_MIN makes the frame at least a header.
    let Some((header, body)) = frame.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(ProtoError::FrameTooSmall { length });
    };
    let stored = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
    let computed = frame_crc(frame);
    if stored != computed {
        return Err(ProtoError::BadCrc { stored, computed });
    }
    let flags = u16::from_le_bytes([header[OFF_FLAGS], header[OFF_FLAGS + 1]]);
    if flags != 0 {
        return Err(ProtoError::BadFlags(flags));
    }
    let mut request_id = [0; 8];
    request_id.copy_from_slice(&header[OFF_REQUEST_ID..OFF_CRC]);
    Ok(Some(RawFrame {
        kind: header[OFF_KIND],
        request_id: u64::from_le_bytes(request_id),
        body,
        frame_bytes,
    }))
}

/// CRC32C over bytes 4..16 of the header followed by the body: everything
/// but the length (checked by bounds and by the body decoding exactly) and
/// the CRC itself. `frame` is a whole frame of at least the header's size.
fn frame_crc(frame: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&frame[LENGTH_FIELD_BYTES..OFF_CRC]);
    crc32c::crc32c_append(crc, &frame[FRAME_HEADER_BYTES..])
}

/// Turns a connection's byte stream into frames.
///
/// Use: after each read, [`push`](FrameDecoder::push) the bytes, then call
/// [`next`](FrameDecoder::next) until it returns `Ok(None)`. Kept to that,
/// the buffer never holds more than `frame_bytes_max - 1` bytes of an
/// unfinished frame plus the bytes of one `push`: after `Ok(None)` what is
/// left is a strict prefix of one frame whose length passed the check.
///
/// After an error the stream is out of step and cannot be resynchronised:
/// answer with an `Error` carrying [`ProtoError::error_code`] and close the
/// connection. The decoder keeps returning the error and ignores later pushes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already returned as frames; dropped on the
    /// next push rather than after every frame, so a burst of small frames
    /// costs one move of the remainder.
    consumed: usize,
    frame_bytes_max: usize,
    failed: bool,
}

impl FrameDecoder {
    /// `frame_bytes_max` is capped at [`FRAME_BYTES_MAX`].
    pub fn new(frame_bytes_max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            consumed: 0,
            frame_bytes_max: frame_bytes_max.min(FRAME_BYTES_MAX),
            failed: false,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        // Holding a whole maximal frame means `next` was not called until
        // `Ok(None)`: the documented bound would not hold.
        debug_assert!(
            self.buffered_bytes() < self.frame_bytes_max.max(LENGTH_FIELD_BYTES),
            "FrameDecoder::push before next() returned Ok(None)"
        );
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    #[allow(clippy::should_implement_trait)] // fallible, and `None` means "not yet", not "done"
    pub fn next(&mut self) -> Result<Option<Frame>, ProtoError> {
        let pending = self.buf.get(self.consumed..).unwrap_or_default();
        match decode_frame(pending, self.frame_bytes_max) {
            Ok(Some((frame, used))) => {
                self.consumed += used;
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                // The bytes stay put, so every later call fails the same way.
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.consumed
    }
}
