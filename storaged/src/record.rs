//! Redo records: the unit computed produces and storage nodes persist.
//!
//! A record is a physical change to one page: a whole image or bytes at an
//! offset. Its encoding is the same in the log and on the wire, so a record is
//! checked once at the edge and then moved as bytes. Layout (little-endian):
//!
//! | off | size | field |
//! |----:|-----:|-------|
//! | 0 | 8 | volume id |
//! | 8 | 4 | protection group (PG) number |
//! | 12 | 1 | kind: 1 = page image, 2 = page delta |
//! | 13 | 1 | flags: bit 0 = CPL (last record of its mini-transaction) |
//! | 14 | 2 | reserved, zero |
//! | 16 | 8 | LSN |
//! | 24 | 8 | `prev_lsn_pg`: previous record of the same PG (0 = none) |
//! | 32 | 8 | `prev_lsn_page`: previous record of the same page (0 = none) |
//! | 40 | 8 | page number |
//! | 48 | 4 | offset in the page (0 for an image) |
//! | 52 | 4 | payload length |
//! | 56 | n | payload |
//!
//! The log also holds a segment's *annulments* (kind 3): a recovery's
//! truncation, written after the records it annuls, so that start-up, which
//! replays the log in order, drops them and keeps any later copy (a re-send
//! by a later writer). Layout:
//!
//! | off | size | field |
//! |----:|-----:|-------|
//! | 0 | 8 | volume id |
//! | 8 | 4 | PG |
//! | 12 | 1 | kind: 3 |
//! | 13 | 1 | flags: 0 |
//! | 14 | 2 | number of ranges `n` (1–16) |
//! | 16 | 16 × n | ranges: `lo`, `hi` (u64 each, inclusive, `lo ≤ hi`) |

use thiserror::Error;

pub const RECORD_HEADER_BYTES: usize = 56;
/// Largest payload a record may carry. Pages are at most 64 KiB; a bound here
/// keeps a corrupt length from turning into a huge allocation.
pub const RECORD_PAYLOAD_MAX_BYTES: usize = 64 * 1024;

const KIND_PAGE_IMAGE: u8 = 1;
const KIND_PAGE_DELTA: u8 = 2;
const KIND_ANNULMENT: u8 = 3;
/// Ranges one annulment names at most (a truncation sends at most 4).
pub const ANNULMENT_RANGES_MAX: usize = 16;
const FLAG_CPL: u8 = 1;

/// One replica set's worth of a volume: a (volume, PG) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId {
    pub volume: u64,
    pub pg: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    /// The whole page.
    PageImage(Vec<u8>),
    /// `bytes` replace the page's bytes at `offset`.
    PageDelta { offset: u32, bytes: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedoRecord {
    pub segment: SegmentId,
    pub lsn: u64,
    pub prev_lsn_pg: u64,
    pub prev_lsn_page: u64,
    pub page: u64,
    /// Consistency point: this record closes its mini-transaction.
    pub cpl: bool,
    pub body: RecordBody,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record truncated: {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("record payload of {0} bytes exceeds the {RECORD_PAYLOAD_MAX_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record has unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("record has {0:#06x} in its reserved field (must be zero)")]
    Reserved(u16),
    #[error("record has {0} trailing bytes after its payload")]
    Trailing(usize),
    #[error("record LSN {lsn} is not above its backlink {prev}")]
    BadBacklink { lsn: u64, prev: u64 },
    #[error("page image has offset {0}; images start at 0")]
    ImageWithOffset(u32),
    #[error("annulment with {0} ranges (1–{ANNULMENT_RANGES_MAX})")]
    BadRangeCount(usize),
    #[error("annulment range {lo}..={hi} is empty")]
    EmptyRange { lo: u64, hi: u64 },
}

/// A recovery's truncation as written to the log: the segment's records at
/// these LSNs, *written before it*, never happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annulment {
    pub segment: SegmentId,
    pub ranges: Vec<(u64, u64)>,
}

impl Annulment {
    /// # Panics
    /// On a range count outside 1–[`ANNULMENT_RANGES_MAX`] (the node checks
    /// a truncation's ranges before it writes one).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.ranges.len();
        assert!((1..=ANNULMENT_RANGES_MAX).contains(&n), "annulment range count");
        let mut out = Vec::with_capacity(16 + 16 * n);
        out.extend_from_slice(&self.segment.volume.to_le_bytes());
        out.extend_from_slice(&self.segment.pg.to_le_bytes());
        out.push(KIND_ANNULMENT);
        out.push(0);
        out.extend_from_slice(&(n as u16).to_le_bytes());
        for &(lo, hi) in &self.ranges {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Annulment, RecordError> {
        let truncated = |need| RecordError::Truncated {
            have: bytes.len(),
            need,
        };
        if bytes.len() < 16 {
            return Err(truncated(16));
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        if bytes[12] != KIND_ANNULMENT {
            return Err(RecordError::UnknownKind(bytes[12]));
        }
        if bytes[13] != 0 {
            return Err(RecordError::UnknownFlags(bytes[13]));
        }
        let n = u16::from_le_bytes([bytes[14], bytes[15]]) as usize;
        if !(1..=ANNULMENT_RANGES_MAX).contains(&n) {
            return Err(RecordError::BadRangeCount(n));
        }
        let need = 16 + 16 * n;
        if bytes.len() < need {
            return Err(truncated(need));
        }
        if bytes.len() > need {
            return Err(RecordError::Trailing(bytes.len() - need));
        }
        let mut ranges = Vec::with_capacity(n);
        for i in 0..n {
            let (lo, hi) = (u64_at(16 + 16 * i), u64_at(24 + 16 * i));
            if lo > hi {
                return Err(RecordError::EmptyRange { lo, hi });
            }
            ranges.push((lo, hi));
        }
        Ok(Annulment {
            segment: SegmentId {
                volume: u64_at(0),
                pg: u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
            },
            ranges,
        })
    }
}

/// One entry of a node's log: a redo record or an annulment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    Record(RedoRecord),
    Annulment(Annulment),
}

impl LogEntry {
    pub fn decode(bytes: &[u8]) -> Result<LogEntry, RecordError> {
        match bytes.get(12) {
            Some(&KIND_ANNULMENT) => Annulment::decode(bytes).map(LogEntry::Annulment),
            _ => RedoRecord::decode(bytes).map(LogEntry::Record),
        }
    }
}

impl RedoRecord {
    pub fn payload(&self) -> &[u8] {
        match &self.body {
            RecordBody::PageImage(b) => b,
            RecordBody::PageDelta { bytes, .. } => bytes,
        }
    }

    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload().len()
    }

    /// Append the encoding to `out`.
    ///
    /// # Panics
    /// If the payload exceeds [`RECORD_PAYLOAD_MAX_BYTES`]: records are built
    /// by computed from pages it owns, so that is a programming error.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let payload = self.payload();
        assert!(payload.len() <= RECORD_PAYLOAD_MAX_BYTES, "record payload too large");
        let (kind, offset) = match &self.body {
            RecordBody::PageImage(_) => (KIND_PAGE_IMAGE, 0),
            RecordBody::PageDelta { offset, .. } => (KIND_PAGE_DELTA, *offset),
        };
        out.reserve(self.encoded_len());
        out.extend_from_slice(&self.segment.volume.to_le_bytes());
        out.extend_from_slice(&self.segment.pg.to_le_bytes());
        out.push(kind);
        out.push(if self.cpl { FLAG_CPL } else { 0 });
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.lsn.to_le_bytes());
        out.extend_from_slice(&self.prev_lsn_pg.to_le_bytes());
        out.extend_from_slice(&self.prev_lsn_page.to_le_bytes());
        out.extend_from_slice(&self.page.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Decode exactly one record from `bytes` (no trailing bytes allowed).
    pub fn decode(bytes: &[u8]) -> Result<RedoRecord, RecordError> {
        let (record, used) = RedoRecord::decode_prefix(bytes)?;
        if used != bytes.len() {
            return Err(RecordError::Trailing(bytes.len() - used));
        }
        Ok(record)
    }

    /// Decode one record from the front of `bytes`; returns it and the bytes used.
    pub fn decode_prefix(bytes: &[u8]) -> Result<(RedoRecord, usize), RecordError> {
        if bytes.len() < RECORD_HEADER_BYTES {
            return Err(RecordError::Truncated {
                have: bytes.len(),
                need: RECORD_HEADER_BYTES,
            });
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let kind = bytes[12];
        let flags = bytes[13];
        if flags & !FLAG_CPL != 0 {
            return Err(RecordError::UnknownFlags(flags));
        }
        // Refused rather than ignored: then every record accepted here is
        // exactly what `encode` makes of it, so its received bytes can go to
        // the log as they are (see `WireRecord`).
        let reserved = u16::from_le_bytes([bytes[14], bytes[15]]);
        if reserved != 0 {
            return Err(RecordError::Reserved(reserved));
        }
        let payload_len = u32_at(52) as usize;
        if payload_len > RECORD_PAYLOAD_MAX_BYTES {
            return Err(RecordError::TooLarge(payload_len));
        }
        let need = RECORD_HEADER_BYTES + payload_len;
        if bytes.len() < need {
            return Err(RecordError::Truncated {
                have: bytes.len(),
                need,
            });
        }
        let lsn = u64_at(16);
        let prev_lsn_pg = u64_at(24);
        let prev_lsn_page = u64_at(32);
        for prev in [prev_lsn_pg, prev_lsn_page] {
            if prev >= lsn && prev != 0 || lsn == 0 {
                return Err(RecordError::BadBacklink { lsn, prev });
            }
        }
        let offset = u32_at(48);
        let payload = bytes[RECORD_HEADER_BYTES..need].to_vec();
        let body = match kind {
            KIND_PAGE_IMAGE if offset != 0 => return Err(RecordError::ImageWithOffset(offset)),
            KIND_PAGE_IMAGE => RecordBody::PageImage(payload),
            KIND_PAGE_DELTA => RecordBody::PageDelta { offset, bytes: payload },
            other => return Err(RecordError::UnknownKind(other)),
        };
        let record = RedoRecord {
            segment: SegmentId {
                volume: u64_at(0),
                pg: u32_at(8),
            },
            lsn,
            prev_lsn_pg,
            prev_lsn_page,
            page: u64_at(40),
            cpl: flags & FLAG_CPL != 0,
            body,
        };
        Ok((record, need))
    }
}

/// A record together with its encoding, which is both its wire and its log
/// form. The node takes records as these: what a frame carried goes to the
/// log and into the record's digest as it is, without being encoded again.
///
/// The two always agree: the fields are private, and both ways to make one
/// ([`new`](Self::new) encodes; [`decode_prefix`](Self::decode_prefix)
/// keeps the bytes [`RedoRecord::decode_prefix`] accepted, which are exactly
/// what `encode` makes of the record it returns) keep them so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    record: RedoRecord,
    encoded: Vec<u8>,
}

impl WireRecord {
    /// For callers that build records themselves (computed's tests, the
    /// simulator, benchmarks): encode it once here.
    ///
    /// # Panics
    /// As [`RedoRecord::encode_into`], on a payload over [`RECORD_PAYLOAD_MAX_BYTES`].
    pub fn new(record: RedoRecord) -> WireRecord {
        let encoded = record.encode();
        WireRecord { record, encoded }
    }

    /// Decode one record from the front of `bytes`, keeping a copy of the
    /// bytes it was decoded from; returns it and the bytes used.
    pub fn decode_prefix(bytes: &[u8]) -> Result<(WireRecord, usize), RecordError> {
        let (record, used) = RedoRecord::decode_prefix(bytes)?;
        let encoded = bytes[..used].to_vec();
        debug_assert_eq!(encoded, record.encode(), "a record decodes only from its own encoding");
        Ok((WireRecord { record, encoded }, used))
    }

    /// Decode exactly one record from `bytes` (no trailing bytes allowed).
    pub fn decode(bytes: &[u8]) -> Result<WireRecord, RecordError> {
        let (record, used) = WireRecord::decode_prefix(bytes)?;
        if used != bytes.len() {
            return Err(RecordError::Trailing(bytes.len() - used));
        }
        Ok(record)
    }

    pub fn record(&self) -> &RedoRecord {
        &self.record
    }

    /// The record's encoding: `self.record().encode()`, byte for byte.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    pub fn into_record(self) -> RedoRecord {
        self.record
    }

    /// The record and its encoding, to move each where it goes.
    pub fn into_parts(self) -> (RedoRecord, Vec<u8>) {
        (self.record, self.encoded)
    }
}

impl AsRef<RedoRecord> for RedoRecord {
    fn as_ref(&self) -> &RedoRecord {
        self
    }
}

impl AsRef<RedoRecord> for WireRecord {
    fn as_ref(&self) -> &RedoRecord {
        &self.record
    }
}

impl From<RedoRecord> for WireRecord {
    fn from(record: RedoRecord) -> WireRecord {
        WireRecord::new(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = RedoRecord> {
        (
            any::<u64>(),
            any::<u32>(),
            1u64..u64::MAX,
            any::<u64>(),
            any::<bool>(),
            prop::option::of(any::<u32>()),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(volume, pg, lsn, page, cpl, delta, bytes)| RedoRecord {
                segment: SegmentId { volume, pg },
                lsn,
                prev_lsn_pg: lsn / 2,
                prev_lsn_page: lsn / 3,
                page,
                cpl,
                body: match delta {
                    Some(offset) => RecordBody::PageDelta { offset, bytes },
                    None => RecordBody::PageImage(bytes),
                },
            })
    }

    proptest! {
        #[test]
        fn roundtrip(r in arb_record()) {
            let bytes = r.encode();
            prop_assert_eq!(bytes.len(), r.encoded_len());
            prop_assert_eq!(RedoRecord::decode(&bytes).unwrap(), r);
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = RedoRecord::decode(&bytes);
        }

        #[test]
        fn log_entries_roundtrip_and_never_panic(
            r in arb_record(),
            ranges in prop::collection::vec((1u64..1000, 0u64..1000), 1..=ANNULMENT_RANGES_MAX),
            junk in prop::collection::vec(any::<u8>(), 0..300),
            cut in 0usize..400,
        ) {
            let a = Annulment {
                segment: r.segment,
                ranges: ranges.into_iter().map(|(lo, len)| (lo, lo + len)).collect(),
            };
            let bytes = a.encode();
            prop_assert_eq!(LogEntry::decode(&bytes).unwrap(), LogEntry::Annulment(a));
            prop_assert!(LogEntry::decode(&bytes[..cut.min(bytes.len() - 1)]).is_err());
            prop_assert_eq!(LogEntry::decode(&r.encode()).unwrap(), LogEntry::Record(r));
            let _ = LogEntry::decode(&junk);
            let mut mutated = bytes.clone();
            mutated[12] = KIND_ANNULMENT;
            if let Some(b) = mutated.get_mut(cut % bytes.len().max(1)) {
                *b ^= 0x5a;
            }
            let _ = LogEntry::decode(&mutated);
        }

        /// What the decoder accepts is exactly the encoding of what it
        /// returns, so the bytes a frame carried can be written to the log
        /// as they are: byte for byte what re-encoding would write.
        #[test]
        fn accepted_bytes_are_the_records_encoding(
            r in arb_record(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut bytes = r.encode();
            let at = at.index(bytes.len());
            bytes[at] = byte;
            bytes.extend_from_slice(&tail);
            if let Ok((decoded, used)) = RedoRecord::decode_prefix(&bytes) {
                prop_assert_eq!(decoded.encode(), &bytes[..used]);
                let (kept, kept_used) = WireRecord::decode_prefix(&bytes).unwrap();
                prop_assert_eq!(kept_used, used);
                prop_assert_eq!(kept.encoded(), &bytes[..used]);
                prop_assert_eq!(kept.record(), &decoded);
                prop_assert_eq!(kept, WireRecord::new(decoded));
            }
        }

        #[test]
        fn a_wire_record_carries_its_encoding(r in arb_record()) {
            let e = WireRecord::new(r.clone());
            let encoded = r.encode();
            prop_assert_eq!(e.encoded(), encoded.as_slice());
            prop_assert_eq!(WireRecord::decode(e.encoded()).unwrap(), e.clone());
            let (record, encoded) = e.into_parts();
            prop_assert_eq!(record, r);
            prop_assert_eq!(encoded.len(), RECORD_HEADER_BYTES + record_payload_len(&encoded));
        }

        #[test]
        fn truncation_is_detected(r in arb_record(), cut in 0usize..400) {
            let bytes = r.encode();
            let cut = cut.min(bytes.len().saturating_sub(1));
            prop_assert!(RedoRecord::decode(&bytes[..cut]).is_err());
        }
    }

    fn record_payload_len(encoded: &[u8]) -> usize {
        u32::from_le_bytes(encoded[52..56].try_into().unwrap()) as usize
    }

    /// Record 10 of segment (1, 2), on page 3, after 9.
    fn record_10(cpl: bool, body: RecordBody) -> RedoRecord {
        RedoRecord {
            segment: SegmentId { volume: 1, pg: 2 },
            lsn: 10,
            prev_lsn_pg: 9,
            prev_lsn_page: 0,
            page: 3,
            cpl,
            body,
        }
    }

    #[test]
    fn a_non_zero_reserved_field_is_refused() {
        let r = record_10(
            false,
            RecordBody::PageDelta {
                offset: 5,
                bytes: vec![7; 3],
            },
        );
        let mut bytes = r.encode();
        assert_eq!(&bytes[14..16], &[0, 0]);
        bytes[15] = 1;
        assert_eq!(RedoRecord::decode(&bytes), Err(RecordError::Reserved(0x0100)));
        assert_eq!(WireRecord::decode(&bytes), Err(RecordError::Reserved(0x0100)));
        assert_eq!(LogEntry::decode(&bytes), Err(RecordError::Reserved(0x0100)));
    }

    #[test]
    fn corrupt_length_is_bounded() {
        let r = record_10(true, RecordBody::PageImage(vec![1; 10]));
        let mut bytes = r.encode();
        bytes[52..56].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            RedoRecord::decode(&bytes),
            Err(RecordError::TooLarge(u32::MAX as usize))
        );
    }
}
