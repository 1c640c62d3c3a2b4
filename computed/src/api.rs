//! The client protocol of computed (docs/protocol.md, "Client protocol
//! (computed)"), sans-IO: frames and messages, encoded and strictly decoded.
//!
//! The envelope is storaged's: length, version, type, flags, request id,
//! CRC32C, body; little-endian; checked in the same order. The messages are
//! computed's own.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use storaged::membership::MEMBERSHIP_BYTES;
use storaged::proto::{ProtoError, split_frame, write_frame};

use crate::core::PageWrite;
use crate::membership::{Change, Member, MemberView, Membership, PgView};

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
const T_PG_STATE: u8 = 9;
const T_PG_STATE_OK: u8 = 10;
const T_CHANGE_MEMBERSHIP: u8 = 11;
const T_ERROR: u8 = 255;

const KIND_IMAGE: u8 = 1;
const KIND_RANGE: u8 = 2;
/// Bytes of one write's header in a Commit: kind, page, offset, length.
const WRITE_HEADER_BYTES: usize = 17;

const CHANGE_REPLACE: u8 = 1;
const CHANGE_ABORT: u8 = 2;
/// An address on the wire: family (4 or 6), 16 bytes (IPv4 mapped), port.
const ADDR_BYTES: usize = 19;
/// One member in a PgStateOk: id, address, up, scl, told_epoch.
const MEMBER_VIEW_BYTES: usize = 8 + ADDR_BYTES + 1 + 8 + 8;
/// Bytes of a member's refusal text a PgStateOk carries at most.
pub const REFUSAL_BYTES_MAX: usize = 256;
/// Members a PgStateOk lists at most: those of a membership and of the
/// step proposed from it (a nested replace brings one more in).
pub const PG_STATE_MEMBERS_MAX: usize = 2 * storaged::membership::MEMBERS_MAX;

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
    /// Where a PG's membership stands.
    PgState {
        pg: u32,
    },
    /// The answer to `PgState` and to `ChangeMembership` (the state once
    /// the change's first step was sent).
    PgStateOk {
        view: PgView,
    },
    /// Start a change of a PG's membership: replace a member, or abort the
    /// change under way. The writer runs the rest of it by itself.
    ChangeMembership {
        pg: u32,
        change: Change,
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

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    let (family, ip) = match addr.ip() {
        IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (6u8, v6.octets()),
    };
    out.push(family);
    out.extend_from_slice(&ip);
    put_u16(out, addr.port());
}

/// pg, membership, proposed (all zeros: none), pgcl, count, members.
fn put_view(out: &mut Vec<u8>, v: &PgView) {
    put_u32(out, v.pg);
    v.membership.encode(out);
    match &v.proposed {
        Some(p) => p.encode(out),
        None => out.resize(out.len() + MEMBERSHIP_BYTES, 0),
    }
    put_u64(out, v.pgcl);
    // The writer never lists more; a longer list is cut, not sent broken.
    let members = &v.members[..v.members.len().min(PG_STATE_MEMBERS_MAX)];
    out.push(members.len() as u8);
    for m in members {
        put_u64(out, m.id);
        put_addr(out, &m.addr);
        out.push(u8::from(m.up));
        put_u64(out, m.scl);
        put_u64(out, m.told_epoch);
    }
    // Left out when no member has one: the body then ends as before.
    let refused: Vec<(usize, &str)> = (members.iter().enumerate())
        .filter_map(|(i, m)| m.refused.as_deref().map(|r| (i, r)))
        .collect();
    if !refused.is_empty() {
        out.push(refused.len() as u8);
        for (i, text) in refused {
            let mut cut = text.len().min(REFUSAL_BYTES_MAX);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(i as u8);
            put_u16(out, cut as u16);
            out.extend_from_slice(&text.as_bytes()[..cut]);
        }
    }
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
            ClientMessage::PgState { pg } => {
                put_u32(out, *pg);
                T_PG_STATE
            }
            ClientMessage::PgStateOk { view } => {
                put_view(out, view);
                T_PG_STATE_OK
            }
            ClientMessage::ChangeMembership { pg, change } => {
                put_u32(out, *pg);
                match change {
                    Change::Replace { old, new } => {
                        out.push(CHANGE_REPLACE);
                        put_u64(out, *old);
                        put_u64(out, new.id);
                        put_addr(out, &new.addr);
                    }
                    Change::Abort => out.push(CHANGE_ABORT),
                }
                T_CHANGE_MEMBERSHIP
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
    fn addr(&mut self) -> Result<SocketAddr, FrameError> {
        let family = self.u8()?;
        let octets: [u8; 16] = self.take(16)?.try_into().map_err(|_| FrameError::Crc)?;
        let ip = Ipv6Addr::from(octets);
        let ip = match family {
            4 => IpAddr::V4(
                ip.to_ipv4_mapped()
                    .ok_or_else(|| FrameError::Body("an IPv4 address that is not IPv4-mapped".into()))?,
            ),
            6 => IpAddr::V6(ip),
            other => return Err(FrameError::Body(format!("bad address family {other}"))),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn membership(&mut self) -> Result<Option<Membership>, FrameError> {
        Membership::decode(self.take(MEMBERSHIP_BYTES)?).map_err(|e| FrameError::Body(format!("membership: {e}")))
    }
    fn view(&mut self) -> Result<PgView, FrameError> {
        let pg = self.u32()?;
        let membership = self
            .membership()?
            .ok_or_else(|| FrameError::Body("a PG state without a membership".into()))?;
        let proposed = self.membership()?;
        let pgcl = self.u64()?;
        let count = usize::from(self.u8()?);
        if count > PG_STATE_MEMBERS_MAX {
            return Err(FrameError::Body(format!(
                "{count} members, at most {PG_STATE_MEMBERS_MAX}"
            )));
        }
        if count * MEMBER_VIEW_BYTES > self.0.len() {
            return Err(FrameError::Body(format!(
                "{count} members need {} bytes, the body has {}",
                count * MEMBER_VIEW_BYTES,
                self.0.len()
            )));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let id = self.u64()?;
            let addr = self.addr()?;
            let up = match self.u8()? {
                0 => false,
                1 => true,
                other => return Err(FrameError::Body(format!("bad up flag {other}"))),
            };
            members.push(MemberView {
                id,
                addr,
                up,
                scl: self.u64()?,
                told_epoch: self.u64()?,
                refused: None,
            });
        }
        // Optional: the members' refusals, when any has one.
        if !self.0.is_empty() {
            let n = self.u8()?;
            if n == 0 {
                return Err(FrameError::Body("a refusal list that lists none".into()));
            }
            for _ in 0..n {
                let i = usize::from(self.u8()?);
                let len = usize::from(self.u16()?);
                if len > REFUSAL_BYTES_MAX {
                    return Err(FrameError::Body(format!(
                        "a refusal of {len} bytes, at most {REFUSAL_BYTES_MAX}"
                    )));
                }
                let text = std::str::from_utf8(self.take(len)?)
                    .map_err(|_| FrameError::Body("a refusal that is not UTF-8".into()))?
                    .to_string();
                match members.get_mut(i) {
                    Some(m) if m.refused.is_none() => m.refused = Some(text),
                    Some(_) => return Err(FrameError::Body(format!("member {i} refused twice"))),
                    None => return Err(FrameError::Body(format!("a refusal of member {i} of {count}"))),
                }
            }
        }
        Ok(PgView {
            pg,
            membership,
            proposed,
            pgcl,
            members,
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
        T_PG_STATE => ClientMessage::PgState { pg: r.u32()? },
        T_PG_STATE_OK => ClientMessage::PgStateOk { view: r.view()? },
        T_CHANGE_MEMBERSHIP => {
            let pg = r.u32()?;
            let change = match r.u8()? {
                CHANGE_REPLACE => {
                    let old = r.u64()?;
                    let id = r.u64()?;
                    let addr = r.addr()?;
                    Change::Replace {
                        old,
                        new: Member { id, addr },
                    }
                }
                CHANGE_ABORT => Change::Abort,
                other => return Err(FrameError::Body(format!("bad membership change kind {other}"))),
            };
            ClientMessage::ChangeMembership { pg, change }
        }
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
            any::<u32>().prop_map(|pg| ClientMessage::PgState { pg }),
            arb_view().prop_map(|view| ClientMessage::PgStateOk { view }),
            (any::<u32>(), any::<u64>(), arb_member()).prop_map(|(pg, old, new)| ClientMessage::ChangeMembership {
                pg,
                change: Change::Replace { old, new }
            }),
            any::<u32>().prop_map(|pg| ClientMessage::ChangeMembership {
                pg,
                change: Change::Abort
            }),
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

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    fn arb_member() -> impl Strategy<Value = Member> {
        (any::<u64>(), arb_addr()).prop_map(|(id, addr)| Member { id, addr })
    }

    /// Six members from `base` up; with `replace`, one of them being
    /// replaced by a seventh (a dual membership).
    fn arb_membership() -> impl Strategy<Value = Membership> {
        (1..u64::MAX / 2, 1..1000u64, prop::option::of(0..6usize), arb_addr()).prop_map(
            |(base, epoch, replace, addr)| {
                let six = (base..base + 6).map(|id| Member { id, addr }).collect();
                let m = Membership::single(epoch, six);
                match replace {
                    Some(i) => crate::membership::plan(
                        0,
                        &m,
                        &Change::Replace {
                            old: base + i as u64,
                            new: Member { id: base + 6, addr },
                        },
                    )
                    .expect("a valid replace"),
                    None => m,
                }
            },
        )
    }

    fn arb_view() -> impl Strategy<Value = PgView> {
        let member = (
            any::<u64>(),
            arb_addr(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            prop::option::of("[a-z ():0-9é]{0,80}"),
        )
            .prop_map(|(id, addr, up, scl, told_epoch, refused)| MemberView {
                id,
                addr,
                up,
                scl,
                told_epoch,
                refused,
            });
        (
            any::<u32>(),
            arb_membership(),
            prop::option::of(arb_membership()),
            any::<u64>(),
            prop::collection::vec(member, 0..=PG_STATE_MEMBERS_MAX),
        )
            .prop_map(|(pg, membership, proposed, pgcl, members)| PgView {
                pg,
                membership,
                proposed,
                pgcl,
                members,
            })
    }

    /// A frame of type `kind` around `body` exactly as given.
    fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, CLIENT_PROTOCOL_VERSION, 9, CLIENT_FRAME_BYTES_MAX, |out| {
            out.extend_from_slice(body);
            kind
        })
        .unwrap();
        out
    }

    fn body_of(msg: &ClientMessage) -> (u8, Vec<u8>) {
        let mut buf = Vec::new();
        encode(9, msg, &mut buf).unwrap();
        (buf[5], buf[20..].to_vec())
    }

    fn view() -> PgView {
        let addr = |id: u64| SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16));
        let m = Membership::single(1, (1..=6).map(|id| Member { id, addr: addr(id) }).collect());
        let dual = crate::membership::plan(
            0,
            &m,
            &Change::Replace {
                old: 6,
                new: Member { id: 7, addr: addr(7) },
            },
        )
        .unwrap();
        PgView {
            pg: 0,
            members: dual
                .members
                .iter()
                .map(|m| MemberView {
                    id: m.id,
                    addr: m.addr,
                    up: m.id != 6,
                    scl: 40,
                    told_epoch: 2,
                    refused: (m.id == 7).then(|| "the page store has no room".to_string()),
                })
                .collect(),
            membership: m,
            proposed: Some(dual),
            pgcl: 40,
        }
    }

    #[test]
    fn membership_bodies_a_byte_short_or_long_are_refused() {
        let msgs = [
            ClientMessage::PgState { pg: 3 },
            ClientMessage::PgStateOk { view: view() },
            ClientMessage::ChangeMembership {
                pg: 0,
                change: Change::Replace {
                    old: 6,
                    new: Member {
                        id: 7,
                        addr: "[::1]:7007".parse().unwrap(),
                    },
                },
            },
            ClientMessage::ChangeMembership {
                pg: 0,
                change: Change::Abort,
            },
        ];
        for msg in msgs {
            let (kind, body) = body_of(&msg);
            assert_eq!(decode(&raw_frame(kind, &body)).unwrap().unwrap().1, msg);
            let short = decode(&raw_frame(kind, &body[..body.len() - 1]));
            assert!(matches!(short, Err(FrameError::Body(_))), "{msg:?}: {short:?}");
            let mut long = body.clone();
            long.push(0);
            let long = decode(&raw_frame(kind, &long));
            assert!(matches!(long, Err(FrameError::Body(_))), "{msg:?}: {long:?}");
        }
    }

    /// The refusal list's count and first member index.
    fn b_tail(body: &[u8], at: usize) -> [u8; 2] {
        [body[at], body[at + 1]]
    }

    #[test]
    fn a_pg_state_with_a_broken_membership_or_member_list_is_refused() {
        let (kind, body) = body_of(&ClientMessage::PgStateOk { view: view() });
        // No membership in force.
        let mut b = body.clone();
        b[4..4 + MEMBERSHIP_BYTES].fill(0);
        let e = decode(&raw_frame(kind, &b)).unwrap_err();
        assert!(e.to_string().contains("without a membership"), "{e}");
        // The proposed one names a member twice.
        let mut b = body.clone();
        let second_id = 4 + MEMBERSHIP_BYTES + 9 + 27;
        b[second_id..second_id + 8].copy_from_slice(&1u64.to_le_bytes());
        let e = decode(&raw_frame(kind, &b)).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        // A member count past the bound, and one the body does not hold.
        let count = 4 + 2 * MEMBERSHIP_BYTES + 8;
        for n in [PG_STATE_MEMBERS_MAX as u8 + 1, 8, 6] {
            let mut b = body.clone();
            b[count] = n;
            assert!(matches!(decode(&raw_frame(kind, &b)), Err(FrameError::Body(_))), "{n}");
        }
        // The refusals after the members: one naming no member, one twice,
        // one that is not UTF-8, an empty list.
        let members = view().members.len();
        let tail = count + 1 + members * MEMBER_VIEW_BYTES;
        assert_eq!(b_tail(&body, tail), [1, (members - 1) as u8]);
        for (i, bad) in [
            [vec![1, members as u8], body[tail + 2..].to_vec()].concat(),
            [vec![2], body[tail + 1..].to_vec(), body[tail + 1..].to_vec()].concat(),
            [vec![1, 0, 2, 0, 0xff, 0xfe]].concat(),
            vec![0],
        ]
        .into_iter()
        .enumerate()
        {
            let b = [body[..tail].to_vec(), bad].concat();
            assert!(
                matches!(decode(&raw_frame(kind, &b)), Err(FrameError::Body(_))),
                "case {i}"
            );
        }
        // An up flag that is not 0 or 1; an unknown change kind.
        let mut b = body.clone();
        b[count + 1 + 8 + ADDR_BYTES] = 2;
        assert!(
            decode(&raw_frame(kind, &b))
                .unwrap_err()
                .to_string()
                .contains("up flag")
        );
        let (kind, mut b) = body_of(&ClientMessage::ChangeMembership {
            pg: 0,
            change: Change::Abort,
        });
        b[4] = 9;
        assert!(
            decode(&raw_frame(kind, &b))
                .unwrap_err()
                .to_string()
                .contains("change kind")
        );
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
