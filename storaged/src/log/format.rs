//! The on-disk format of every block the node writes: a common self-describing
//! header, and the superblock and anchor payloads. `docs/format.md` is the
//! field-by-field document of what is here; keep them in step.
//!
//! Every block checks itself: a reader verifies magic, version, kind, device
//! id, that the block sits at the offset it names, and the CRC32C over header
//! and payload. A torn, misdirected, stale or foreign block fails one of these
//! and is never trusted.

use thiserror::Error;

use crate::io::BLOCK_SIZE;

pub const MAGIC: u32 = u32::from_le_bytes(*b"STRD");
/// 2: the CRC covers the whole block (1 covered header and payload only).
/// 3: segment table entries carry the page store extent and coalescing state;
/// page version blocks.
/// 4: segments keep truncation ranges (recovery).
/// 5: a truncation writes an annulment to the log, which start-up applies in
/// log order; the table's ranges are the newest recovery's, for reporting.
/// 6: segment table entries carry the PG's membership (376 bytes each).
/// 7: extents carry a page-version index after their slots.
/// 8: an extent holds slot 0 of every page, then slot 1 of every page (7
/// kept a page's two slots side by side).
pub const FORMAT_VERSION: u16 = 8;
pub const HEADER_BYTES: usize = 56;
/// Payload bytes a block can carry.
pub const PAYLOAD_MAX_BYTES: usize = BLOCK_SIZE - HEADER_BYTES;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_KIND: usize = 6;
const OFF_DEVICE_ID: usize = 8;
const OFF_OFFSET: usize = 24;
const OFF_SEQ: usize = 32;
const OFF_GENERATION: usize = 40;
const OFF_PAYLOAD_LEN: usize = 44;
const OFF_FLAGS: usize = 48;
const OFF_CRC: usize = 52;

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BlockKind {
    Superblock = 1,
    Anchor = 2,
    Log = 3,
    SegmentTable = 4,
    PageVersion = 5,
    /// One block of a segment's page-version index (`pagemap`).
    PageMap = 6,
    /// The scrubber's progress (`scrub::progress`).
    ScrubState = 7,
}

impl BlockKind {
    fn from_u16(v: u16) -> Option<BlockKind> {
        match v {
            1 => Some(BlockKind::Superblock),
            2 => Some(BlockKind::Anchor),
            3 => Some(BlockKind::Log),
            4 => Some(BlockKind::SegmentTable),
            5 => Some(BlockKind::PageVersion),
            6 => Some(BlockKind::PageMap),
            7 => Some(BlockKind::ScrubState),
            _ => None,
        }
    }
}

/// 16 random bytes chosen at format time; every block carries them so a block
/// from another device (a copied image, a misdirected write from another
/// node's file) is recognised as foreign.
pub type DeviceId = [u8; 16];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    pub kind: BlockKind,
    pub device_id: DeviceId,
    /// Byte offset of this block on the device.
    pub offset: u64,
    /// Log: the block's sequence number. Anchor: the anchor's write counter.
    /// Superblock: the copy number.
    pub seq: u64,
    /// Log: the incarnation of the log that wrote the block. Anchor: the current one.
    pub generation: u32,
    pub payload_len: u32,
    pub flags: u32,
}

/// Why a block is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BlockError {
    #[error("never written (all zeros)")]
    Zero,
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error(
        "unsupported format version {0} (this build reads version {FORMAT_VERSION}; a device of another version is not read)"
    )]
    BadVersion(u16),
    #[error("unknown block kind {0}")]
    BadKind(u16),
    #[error("payload length {0} exceeds the block")]
    BadLength(u32),
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("block belongs to another device")]
    ForeignDevice,
    #[error("block says it lives at offset {found}, read from {expected} (misdirected write)")]
    Misplaced { expected: u64, found: u64 },
    #[error("expected a {expected:?} block, found {found:?}")]
    WrongKind { expected: BlockKind, found: BlockKind },
}

/// Over the whole block but the CRC field itself: header, payload and the
/// zero tail, so damage anywhere in the block is seen.
fn crc_of(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..OFF_CRC]);
    crc32c::crc32c_append(crc, &block[HEADER_BYTES..])
}

/// Write `header` and `payload` into `block` (exactly one block), zeroing the
/// rest so the unused tail never carries old data.
///
/// # Panics
/// If `block` is not one block or the payload does not fit: callers size both.
pub fn encode_block(block: &mut [u8], header: &BlockHeader, payload: &[u8]) {
    assert_eq!(block.len(), BLOCK_SIZE);
    assert!(payload.len() <= PAYLOAD_MAX_BYTES);
    assert_eq!(header.payload_len as usize, payload.len());
    block[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(payload);
    block[HEADER_BYTES + payload.len()..].fill(0);
    seal_block(block, header);
}

/// Write `header` and the CRC into a block whose payload (the first
/// `header.payload_len` bytes after the header) is already in place and
/// whose tail after it is zero (the CRC covers the tail too).
pub fn seal_block(block: &mut [u8], header: &BlockHeader) {
    debug_assert_eq!(block.len(), BLOCK_SIZE);
    block[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC.to_le_bytes());
    block[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    block[OFF_KIND..OFF_KIND + 2].copy_from_slice(&(header.kind as u16).to_le_bytes());
    block[OFF_DEVICE_ID..OFF_DEVICE_ID + 16].copy_from_slice(&header.device_id);
    block[OFF_OFFSET..OFF_OFFSET + 8].copy_from_slice(&header.offset.to_le_bytes());
    block[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&header.seq.to_le_bytes());
    block[OFF_GENERATION..OFF_GENERATION + 4].copy_from_slice(&header.generation.to_le_bytes());
    block[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 4].copy_from_slice(&header.payload_len.to_le_bytes());
    block[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&header.flags.to_le_bytes());
    let crc = crc_of(block);
    block[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Check a block's self-description without knowing what it should be:
/// magic, version, kind, length and CRC. Returns the header and payload.
pub fn decode_block(block: &[u8]) -> Result<(BlockHeader, &[u8]), BlockError> {
    debug_assert_eq!(block.len(), BLOCK_SIZE);
    let magic = u32_at(block, OFF_MAGIC);
    if magic != MAGIC {
        if block.iter().all(|&b| b == 0) {
            return Err(BlockError::Zero);
        }
        return Err(BlockError::BadMagic(magic));
    }
    let version = u16_at(block, OFF_VERSION);
    if version != FORMAT_VERSION {
        return Err(BlockError::BadVersion(version));
    }
    let kind_raw = u16_at(block, OFF_KIND);
    let kind = BlockKind::from_u16(kind_raw).ok_or(BlockError::BadKind(kind_raw))?;
    let payload_len = u32_at(block, OFF_PAYLOAD_LEN);
    if payload_len as usize > PAYLOAD_MAX_BYTES {
        return Err(BlockError::BadLength(payload_len));
    }
    let stored = u32_at(block, OFF_CRC);
    let computed = crc_of(block);
    if stored != computed {
        return Err(BlockError::BadCrc { stored, computed });
    }
    let header = BlockHeader {
        kind,
        device_id: block[OFF_DEVICE_ID..OFF_DEVICE_ID + 16].try_into().expect("16 bytes"),
        offset: u64_at(block, OFF_OFFSET),
        seq: u64_at(block, OFF_SEQ),
        generation: u32_at(block, OFF_GENERATION),
        payload_len,
        flags: u32_at(block, OFF_FLAGS),
    };
    Ok((header, &block[HEADER_BYTES..HEADER_BYTES + payload_len as usize]))
}

/// [`decode_block`], then check the block is the kind expected, belongs to
/// this device and sits where it says it does.
pub fn decode_block_at<'a>(
    block: &'a [u8],
    kind: BlockKind,
    device_id: &DeviceId,
    offset: u64,
) -> Result<(BlockHeader, &'a [u8]), BlockError> {
    let (header, payload) = decode_block(block)?;
    if header.kind != kind {
        return Err(BlockError::WrongKind {
            expected: kind,
            found: header.kind,
        });
    }
    if &header.device_id != device_id {
        return Err(BlockError::ForeignDevice);
    }
    if header.offset != offset {
        return Err(BlockError::Misplaced {
            expected: offset,
            found: header.offset,
        });
    }
    Ok((header, payload))
}

/// The superblock: written at format time, in two copies, never rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub device_id: DeviceId,
    pub node_id: u64,
    /// Device size the layout was made for; a device of another size is refused.
    pub device_bytes: u64,
    pub log_start_block: u64,
    pub log_blocks: u64,
    pub pages_start_block: u64,
    pub pages_blocks: u64,
    pub created_unix_secs: u64,
}

const SUPERBLOCK_PAYLOAD_BYTES: usize = 8 * 7 + 4;

impl Superblock {
    pub fn encode(&self, block: &mut [u8], copy: u64, offset: u64) {
        let mut p = Vec::with_capacity(SUPERBLOCK_PAYLOAD_BYTES);
        p.extend_from_slice(&self.node_id.to_le_bytes());
        p.extend_from_slice(&self.device_bytes.to_le_bytes());
        p.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        p.extend_from_slice(&self.log_start_block.to_le_bytes());
        p.extend_from_slice(&self.log_blocks.to_le_bytes());
        p.extend_from_slice(&self.pages_start_block.to_le_bytes());
        p.extend_from_slice(&self.pages_blocks.to_le_bytes());
        p.extend_from_slice(&self.created_unix_secs.to_le_bytes());
        let header = BlockHeader {
            kind: BlockKind::Superblock,
            device_id: self.device_id,
            offset,
            seq: copy,
            generation: 0,
            payload_len: p.len() as u32,
            flags: 0,
        };
        encode_block(block, &header, &p);
    }

    /// Decode a superblock copy read from `offset`. The device id is not known
    /// yet, so it is taken from the block; the caller compares copies.
    pub fn decode(block: &[u8], offset: u64) -> Result<Superblock, SuperblockError> {
        let (header, p) = decode_block(block)?;
        if header.kind != BlockKind::Superblock {
            return Err(BlockError::WrongKind {
                expected: BlockKind::Superblock,
                found: header.kind,
            }
            .into());
        }
        if header.offset != offset {
            return Err(BlockError::Misplaced {
                expected: offset,
                found: header.offset,
            }
            .into());
        }
        if p.len() != SUPERBLOCK_PAYLOAD_BYTES {
            return Err(SuperblockError::Invalid(format!("payload of {} bytes", p.len())));
        }
        let block_bytes = u32_at(p, 16);
        if block_bytes as usize != BLOCK_SIZE {
            return Err(SuperblockError::Invalid(format!(
                "block size {block_bytes}, this build uses {BLOCK_SIZE}"
            )));
        }
        let sb = Superblock {
            device_id: header.device_id,
            node_id: u64_at(p, 0),
            device_bytes: u64_at(p, 8),
            log_start_block: u64_at(p, 20),
            log_blocks: u64_at(p, 28),
            pages_start_block: u64_at(p, 36),
            pages_blocks: u64_at(p, 44),
            created_unix_secs: u64_at(p, 52),
        };
        sb.check_geometry()?;
        Ok(sb)
    }

    /// The regions must not overlap the metadata area, each other, or the device end.
    pub fn check_geometry(&self) -> Result<(), SuperblockError> {
        let device_blocks = self.device_bytes / BLOCK_SIZE as u64;
        let log_end = self.log_start_block.checked_add(self.log_blocks);
        let pages_end = self.pages_start_block.checked_add(self.pages_blocks);
        let ok = self.log_start_block == super::layout::METADATA_BLOCKS
            && self.log_blocks >= super::layout::LOG_BLOCKS_MIN
            && log_end.is_some_and(|e| e <= self.pages_start_block)
            && pages_end.is_some_and(|e| e <= device_blocks);
        if ok {
            Ok(())
        } else {
            Err(SuperblockError::Invalid(format!("inconsistent geometry {self:?}")))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SuperblockError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("invalid superblock: {0}")]
    Invalid(String),
}

/// The log anchor: where the live log begins and the current generation.
/// Two slots, written alternately with a rising counter; the valid slot with
/// the higher counter wins, so a torn anchor write leaves the other intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// Write counter (the header's seq).
    pub counter: u64,
    /// Incarnation of the log. Bumped, durably, every time the log is opened.
    pub generation: u32,
    /// Oldest block seq still owned; everything below was released.
    pub tail_seq: u64,
    /// Blocks this incarnation may have in flight at once. After a crash,
    /// valid blocks of this generation further than this past the log's end
    /// prove the log was cut by a bad block, not by the crash.
    pub inflight_blocks: u64,
    /// Every block from the tail up to (not including) this seq was durable
    /// when the anchor was written. A scan that ends below it was cut by a
    /// damaged block, not by a crash.
    pub floor_seq: u64,
}

impl Anchor {
    pub fn encode(&self, block: &mut [u8], device_id: DeviceId, offset: u64) {
        let mut payload = [0u8; 24];
        payload[..8].copy_from_slice(&self.tail_seq.to_le_bytes());
        payload[8..16].copy_from_slice(&self.inflight_blocks.to_le_bytes());
        payload[16..].copy_from_slice(&self.floor_seq.to_le_bytes());
        let header = BlockHeader {
            kind: BlockKind::Anchor,
            device_id,
            offset,
            seq: self.counter,
            generation: self.generation,
            payload_len: payload.len() as u32,
            flags: 0,
        };
        encode_block(block, &header, &payload);
    }

    pub fn decode(block: &[u8], device_id: &DeviceId, offset: u64) -> Result<Anchor, BlockError> {
        let (header, p) = decode_block_at(block, BlockKind::Anchor, device_id, offset)?;
        if p.len() != 24 {
            return Err(BlockError::BadLength(header.payload_len));
        }
        Ok(Anchor {
            counter: header.seq,
            generation: header.generation,
            tail_seq: u64_at(p, 0),
            inflight_blocks: u64_at(p, 8),
            floor_seq: u64_at(p, 16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: DeviceId = [7; 16];

    #[test]
    fn block_roundtrip_and_every_check() {
        let mut b = vec![0u8; BLOCK_SIZE];
        let h = BlockHeader {
            kind: BlockKind::Log,
            device_id: DEV,
            offset: 8192,
            seq: 42,
            generation: 3,
            payload_len: 5,
            flags: 0,
        };
        encode_block(&mut b, &h, b"hello");
        let (got, p) = decode_block_at(&b, BlockKind::Log, &DEV, 8192).unwrap();
        assert_eq!(got, h);
        assert_eq!(p, b"hello");

        assert_eq!(
            decode_block_at(&b, BlockKind::Log, &[1; 16], 8192),
            Err(BlockError::ForeignDevice)
        );
        assert_eq!(
            decode_block_at(&b, BlockKind::Log, &DEV, 4096),
            Err(BlockError::Misplaced {
                expected: 4096,
                found: 8192
            })
        );
        assert!(matches!(
            decode_block_at(&b, BlockKind::Anchor, &DEV, 8192),
            Err(BlockError::WrongKind { .. })
        ));
        // Any single bit flip in header or payload is caught.
        for bit in (0..(HEADER_BYTES + 5) * 8).step_by(7) {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_block(&c).is_err(), "flip of bit {bit} not detected");
        }
        assert_eq!(decode_block(&vec![0u8; BLOCK_SIZE]), Err(BlockError::Zero));
    }

    #[test]
    fn torn_block_is_detected() {
        let mut b = vec![0u8; BLOCK_SIZE];
        let payload = vec![0xAB; PAYLOAD_MAX_BYTES];
        let h = BlockHeader {
            kind: BlockKind::Log,
            device_id: DEV,
            offset: 0,
            seq: 1,
            generation: 1,
            payload_len: payload.len() as u32,
            flags: 0,
        };
        encode_block(&mut b, &h, &payload);
        for sectors in 1..8 {
            let mut torn = vec![0u8; BLOCK_SIZE];
            torn[..sectors * 512].copy_from_slice(&b[..sectors * 512]);
            assert!(decode_block(&torn).is_err(), "{sectors} sectors of 8 accepted");
        }
    }

    #[test]
    fn anchor_roundtrip() {
        let mut b = vec![0u8; BLOCK_SIZE];
        let a = Anchor {
            counter: 9,
            generation: 4,
            tail_seq: 1234,
            inflight_blocks: 512,
            floor_seq: 1300,
        };
        a.encode(&mut b, DEV, 4096);
        assert_eq!(Anchor::decode(&b, &DEV, 4096).unwrap(), a);
    }
}
