//! The client protocol of computed (docs/protocol.md, "Client protocol
//! (computed)"), sans-IO: frames and messages, encoded and strictly decoded.
//!
//! The envelope is storaged's: length, version, type, flags, request id,
//! CRC32C, body; little-endian; checked in the same order. The messages are
//! computed's own.

use storaged::proto::{ProtoError, split_frame, write_frame};

use crate::core::PageWrite;

pub const CLIENT_PROTOCOL_VERSION: u8 = 1;
/// Largest frame, length field included: a transaction of 64 full 64 KiB pages fits.
pub const CLIENT_FRAME_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Longest error text.
pub const ERROR_TEXT_BYTES_MAX: usize = 1024;

const T_HELLO: u8 = 1;
const T_HELLO_OK: u8 = 2;
const T_COMMIT: u8 = 3;
const T_COMMITTED: u8 = 4;
const T_READ: u8 = 5;
const T_PAGE: u8 = 6;
const T_VOLUME_INFO: u8 = 7;
const T_VOLUME_INFO_OK: u8 = 8;
const T_ERROR: u8 = 255;

const KIND_IMAGE: u8 = 1;
const KIND_RANGE: u8 = 2;
/// Bytes of one write's header in a Commit: kind, page, offset, length.
const WRITE_HEADER_BYTES: usize = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ClientErrorCode {
    /// The frame did not decode; the connection is closed after this.
    BadFrame = 1,
    UnsupportedVersion = 2,
    /// A well-formed request that makes no sense (a write past the page end, an empty transaction, ...).
    BadRequest = 3,
    PageOutOfRange = 4,
    /// More writes in one transaction than computed takes.
    TooLarge = 5,
    /// computed cannot take more now; retry.
    Busy = 6,
    /// Another writer owns the volume; this computed no longer writes.
    Fenced = 7,
    ShuttingDown = 8,
}

impl ClientErrorCode {
    pub fn from_u16(v: u16) -> Option<ClientErrorCode> {
        Some(match v {
            1 => ClientErrorCode::BadFrame,
            2 => ClientErrorCode::UnsupportedVersion,
            3 => ClientErrorCode::BadRequest,
            4 => ClientErrorCode::PageOutOfRange,
            5 => ClientErrorCode::TooLarge,
            6 => ClientErrorCode::Busy,
            7 => ClientErrorCode::Fenced,
            8 => ClientErrorCode::ShuttingDown,
            _ => return None,
        })
    }
}

/// What `VolumeInfoOk` and `HelloOk` say about the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeInfo {
    pub volume: u64,
    pub page_bytes: u32,
    pub pages: u64,
    pub pgs: u32,
    pub vdl: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Hello {
        protocol_version: u16,
    },
    HelloOk {
        info: VolumeInfo,
    },
    /// One transaction: every write becomes durable and visible together.
    Commit {
        writes: Vec<PageWrite>,
    },
    Committed {
        lsn: u64,
    },
    Read {
        page: u64,
    },
    Page {
        read_point: u64,
        lsn: u64,
        bytes: Vec<u8>,
    },
    VolumeInfo,
    VolumeInfoOk {
        info: VolumeInfo,
    },
    Error {
        code: ClientErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} is below the 16-byte minimum")]
    TooSmall(u32),
    #[error("frame of {0} bytes exceeds the {CLIENT_FRAME_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    #[error("protocol version {0} is not supported (this is version {CLIENT_PROTOCOL_VERSION})")]
    Version(u8),
    #[error("frame CRC mismatch")]
    Crc,
    #[error("frame flags {0:#x} are not zero")]
    Flags(u16),
    #[error("unknown message type {0}")]
    Type(u8),
    #[error("bad body: {0}")]
    Body(String),
}

impl FrameError {
    /// The envelope is storaged's: its checks, named for this protocol.
    fn from_envelope(e: ProtoError) -> FrameError {
        match e {
            ProtoError::FrameTooSmall { length } => FrameError::TooSmall(length),
            ProtoError::FrameTooLarge { frame_bytes, .. } => FrameError::TooLarge(frame_bytes),
            ProtoError::UnsupportedVersion(v) => FrameError::Version(v),
            ProtoError::BadCrc { .. } => FrameError::Crc,
            ProtoError::BadFlags(f) => FrameError::Flags(f),
            other => FrameError::Body(other.to_string()),
        }
    }

    pub fn code(&self) -> ClientErrorCode {
        match self {
            FrameError::Version(_) => ClientErrorCode::UnsupportedVersion,
            _ => ClientErrorCode::BadFrame,
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_info(out: &mut Vec<u8>, i: &VolumeInfo) {
    put_u64(out, i.volume);
    put_u32(out, i.page_bytes);
    put_u64(out, i.pages);
    put_u32(out, i.pgs);
    put_u64(out, i.vdl);
    put_u64(out, i.epoch);
}

/// Append one frame. Fails (leaving `out` as it was) when it would exceed the maximum.
pub fn encode(request_id: u64, msg: &ClientMessage, out: &mut Vec<u8>) -> Result<(), FrameError> {
    write_frame(
        out,
        CLIENT_PROTOCOL_VERSION,
        request_id,
        CLIENT_FRAME_BYTES_MAX,
        |out| match msg {
            ClientMessage::Hello { protocol_version } => {
                put_u16(out, *protocol_version);
                T_HELLO
            }
            ClientMessage::HelloOk { info } => {
                put_info(out, info);
                T_HELLO_OK
            }
            ClientMessage::Commit { writes } => {
                put_u32(out, writes.len() as u32);
                for w in writes {
                    let (kind, page, offset, bytes) = match w {
                        PageWrite::Image { page, bytes } => (KIND_IMAGE, *page, 0, bytes),
                        PageWrite::Range { page, offset, bytes } => (KIND_RANGE, *page, *offset, bytes),
                    };
                    out.push(kind);
                    put_u64(out, page);
                    put_u32(out, offset);
                    put_u32(out, bytes.len() as u32);
                    out.extend_from_slice(bytes);
                }
                T_COMMIT
            }
            ClientMessage::Committed { lsn } => {
                put_u64(out, *lsn);
                T_COMMITTED
            }
            ClientMessage::Read { page } => {
                put_u64(out, *page);
                T_READ
            }
            ClientMessage::Page { read_point, lsn, bytes } => {
                put_u64(out, *read_point);
                put_u64(out, *lsn);
                put_u32(out, bytes.len() as u32);
                out.extend_from_slice(bytes);
                T_PAGE
            }
            ClientMessage::VolumeInfo => T_VOLUME_INFO,
            ClientMessage::VolumeInfoOk { info } => {
                put_info(out, info);
                T_VOLUME_INFO_OK
            }
            ClientMessage::Error { code, message } => {
                let mut cut = message.len().min(ERROR_TEXT_BYTES_MAX);
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                put_u16(out, *code as u16);
                put_u16(out, cut as u16);
                out.extend_from_slice(&message.as_bytes()[..cut]);
                T_ERROR
            }
        },
    )
    .map_err(FrameError::from_envelope)
}

/// Decode one frame from the front of `buf`: `Ok(None)` until a whole frame is there.
pub fn decode(buf: &[u8]) -> Result<Option<(u64, ClientMessage, usize)>, FrameError> {
    let raw = split_frame(buf, CLIENT_PROTOCOL_VERSION, CLIENT_FRAME_BYTES_MAX).map_err(FrameError::from_envelope)?;
    let Some(raw) = raw else {
        return Ok(None);
    };
    let msg = decode_body(raw.kind, raw.body)?;
    Ok(Some((raw.request_id, msg, raw.frame_bytes)))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| FrameError::Body(format!("body too short: need {n} more bytes")))?;
        self.0 = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| FrameError::Crc)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| FrameError::Crc)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| FrameError::Crc)?,
        ))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn info(&mut self) -> Result<VolumeInfo, FrameError> {
        Ok(VolumeInfo {
            volume: self.u64()?,
            page_bytes: self.u32()?,
            pages: self.u64()?,
            pgs: self.u32()?,
            vdl: self.u64()?,
            epoch: self.u64()?,
        })
    }
    fn finish(self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Body(format!("{} trailing bytes", self.0.len())))
        }
    }
}

fn decode_body(kind: u8, body: &[u8]) -> Result<ClientMessage, FrameError> {
    let mut r = Reader(body);
    let msg = match kind {
        T_HELLO => ClientMessage::Hello {
            protocol_version: r.u16()?,
        },
        T_HELLO_OK => ClientMessage::HelloOk { info: r.info()? },
        T_COMMIT => {
            let count = r.u32()? as usize;
            // Bound the count by the body before it sizes an allocation.
            if count > r.0.len() / WRITE_HEADER_BYTES {
                return Err(FrameError::Body(format!("{count} writes cannot fit the body")));
            }
            let mut writes = Vec::with_capacity(count);
            for _ in 0..count {
                let kind = r.u8()?;
                let page = r.u64()?;
                let offset = r.u32()?;
                let len = r.u32()? as usize;
                let bytes = r.take(len)?.to_vec();
                writes.push(match kind {
                    KIND_IMAGE if offset == 0 => PageWrite::Image { page, bytes },
                    KIND_RANGE => PageWrite::Range { page, offset, bytes },
                    other => return Err(FrameError::Body(format!("bad write kind {other} (offset {offset})"))),
                });
            }
            ClientMessage::Commit { writes }
        }
        T_COMMITTED => ClientMessage::Committed { lsn: r.u64()? },
        T_READ => ClientMessage::Read { page: r.u64()? },
        T_PAGE => {
            let read_point = r.u64()?;
            let lsn = r.u64()?;
            let len = r.u32()? as usize;
            ClientMessage::Page {
                read_point,
                lsn,
                bytes: r.take(len)?.to_vec(),
            }
        }
        T_VOLUME_INFO => ClientMessage::VolumeInfo,
        T_VOLUME_INFO_OK => ClientMessage::VolumeInfoOk { info: r.info()? },
        T_ERROR => {
            let code = r.u16()?;
            let code = ClientErrorCode::from_u16(code).ok_or_else(|| FrameError::Body(format!("error code {code}")))?;
            let len = r.u16()? as usize;
            if len > ERROR_TEXT_BYTES_MAX {
                return Err(FrameError::Body("error text too long".into()));
            }
            let text =
                std::str::from_utf8(r.take(len)?).map_err(|_| FrameError::Body("error text not UTF-8".into()))?;
            ClientMessage::Error {
                code,
                message: text.to_owned(),
            }
        }
        other => return Err(FrameError::Type(other)),
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = ClientMessage> {
        let write = (
            any::<bool>(),
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(image, page, offset, bytes)| {
                if image {
                    PageWrite::Image { page, bytes }
                } else {
                    PageWrite::Range { page, offset, bytes }
                }
            });
        let info = (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(volume, page_bytes, pages, pgs, vdl, epoch)| VolumeInfo {
                volume,
                page_bytes,
                pages,
                pgs,
                vdl,
                epoch,
            });
        prop_oneof![
            any::<u16>().prop_map(|v| ClientMessage::Hello { protocol_version: v }),
            info.clone().prop_map(|info| ClientMessage::HelloOk { info }),
            prop::collection::vec(write, 0..5).prop_map(|writes| ClientMessage::Commit { writes }),
            any::<u64>().prop_map(|lsn| ClientMessage::Committed { lsn }),
            any::<u64>().prop_map(|page| ClientMessage::Read { page }),
            (any::<u64>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..50))
                .prop_map(|(read_point, lsn, bytes)| ClientMessage::Page { read_point, lsn, bytes }),
            Just(ClientMessage::VolumeInfo),
            info.prop_map(|info| ClientMessage::VolumeInfoOk { info }),
            "[a-z ]{0,30}".prop_map(|message| ClientMessage::Error {
                code: ClientErrorCode::Busy,
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(msg in arb_message(), id in any::<u64>()) {
            let mut buf = Vec::new();
            encode(id, &msg, &mut buf).unwrap();
            let (got_id, got, used) = decode(&buf).unwrap().unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(got_id, id);
            prop_assert_eq!(got, msg);
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_flipped_bit_is_caught(msg in arb_message(), bit in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode(1, &msg, &mut buf).unwrap();
            let i = bit.index(buf.len() * 8);
            buf[i / 8] ^= 1 << (i % 8);
            prop_assert!(!matches!(decode(&buf), Ok(Some((1, ref m, _))) if *m == msg));
        }
    }
}
