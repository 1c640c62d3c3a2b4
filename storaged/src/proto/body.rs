//! Message bodies on the wire: the layouts `docs/protocol.md` documents field
//! by field, their encoding, and their strict decoding.
//!
//! Bodies are fixed fields in the documented order, little-endian, with no
//! padding; a variable part (records, page bytes, error text) comes last and
//! its length is declared and checked against the bytes present. Decoding is
//! strict: a body one byte short or long is refused, so both sides always
//! agree on what a message said.

use super::ERROR_MESSAGE_BYTES_MAX;
use super::error::ProtoError;
use super::message::{Damage, ErrorCode, GossipDigest, Hydration, Message, MessageType, Role, WirePageVersion};
use super::scrub::{
    SCRUB_FIXED_BYTES, SCRUB_STATUS_FIXED_BYTES, filter_len, put_filter, put_status, read_filter, read_status,
    status_len, validate_filter, validate_status,
};
use crate::membership::{MEMBERSHIP_BYTES, Membership};
use crate::record::{RECORD_HEADER_BYTES, RECORD_PAYLOAD_MAX_BYTES, RecordError};
use crate::record::{RedoRecord, SegmentId, WireRecord};
use crate::segment::{ANNULLED_RANGES_MAX, DAMAGED_PAGES_REPORTED_MAX, HOLES_REPORTED_MAX};

/// Fixed part of each body; the variable part (if any) follows it.
const HELLO_BYTES: usize = 11;
const HELLO_OK_BYTES: usize = 10;
const APPEND_FIXED_BYTES: usize = 44;
const APPEND_ACK_BYTES: usize = 28;
const GET_PAGE_BYTES: usize = 44;
const PAGE_FIXED_BYTES: usize = 32;
const SET_PGMRPL_BYTES: usize = 28;
const PGMRPL_OK_BYTES: usize = 20;
const GET_SEGMENT_STATUS_BYTES: usize = 20;
const SEGMENT_STATUS_FIXED_BYTES: usize = 96;
const SEAL_BYTES: usize = 32;
const TRUNCATE_FIXED_BYTES: usize = 24;
const READ_RECORDS_BYTES: usize = 32;
const RECORDS_FIXED_BYTES: usize = 24;
const RANGE_BYTES: usize = 16;
/// A SegmentStatus's damage tail before its page numbers: total, count, flags.
const DAMAGE_FIXED_BYTES: usize = 9;
const ERROR_FIXED_BYTES: usize = 12;
const SET_MEMBERSHIP_BYTES: usize = 32 + MEMBERSHIP_BYTES;
const DIGEST_BYTES: usize = 52;
const PULL_RECORDS_BYTES: usize = 40;
const GET_PAGE_VERSIONS_BYTES: usize = 40;
const PAGE_VERSIONS_FIXED_BYTES: usize = 32;
const SCRUB_STARTED_BYTES: usize = 8;
const SCRUB_STATUS_BYTES: usize = 0;
const GET_PAGE_AT_BYTES: usize = 44;
const PAGE_AT_FIXED_BYTES: usize = 32;
const FILL_GAPS_BYTES: usize = 12;
const NODE_STATUS_OK_BYTES: usize = 40;
/// A SegmentStatus's hydration tail: flags, bytes, pages.
const HYDRATION_BYTES: usize = 17;
/// Page, LSN and length before each version's bytes.
const PAGE_VERSION_HEAD_BYTES: usize = 20;

// The decoder sizes a batch's `Vec<WireRecord>` (or `Vec<RedoRecord>`)
// from the declared count, which it first bounds by the body (a record is at
// least RECORD_HEADER_BYTES on the wire). This keeps that allocation within
// twice the bytes received. (An Append's records also keep a copy of their
// bytes, which the node would otherwise have made by encoding them.)
const _: () = assert!(size_of::<WireRecord>() <= 2 * RECORD_HEADER_BYTES);
const _: () = assert!(size_of::<RedoRecord>() <= size_of::<WireRecord>());

impl Message {
    /// Bytes the body takes on the wire.
    pub(super) fn body_len(&self) -> usize {
        match self {
            Message::Hello { .. } => HELLO_BYTES,
            Message::HelloOk { .. } => HELLO_OK_BYTES,
            Message::Append { records, .. } => {
                APPEND_FIXED_BYTES + records.iter().map(|r| r.encoded().len()).sum::<usize>()
            }
            Message::AppendAck { .. } => APPEND_ACK_BYTES,
            Message::GetPage { .. } => GET_PAGE_BYTES,
            Message::Page { bytes, .. } => PAGE_FIXED_BYTES + bytes.len(),
            Message::SetPgmrpl { .. } => SET_PGMRPL_BYTES,
            Message::PgmrplOk { .. } => PGMRPL_OK_BYTES,
            Message::GetSegmentStatus { .. } => GET_SEGMENT_STATUS_BYTES,
            Message::SegmentStatus {
                annulled,
                holes,
                damage,
                membership,
                hydration,
                ..
            } => {
                SEGMENT_STATUS_FIXED_BYTES
                    + RANGE_BYTES * annulled.len()
                    + 4
                    + RANGE_BYTES * holes.len()
                    + DAMAGE_FIXED_BYTES
                    + 8 * damage.pages.len()
                    + match (membership, hydration) {
                        (_, Some(_)) => MEMBERSHIP_BYTES + HYDRATION_BYTES,
                        (Some(_), None) => MEMBERSHIP_BYTES,
                        (None, None) => 0,
                    }
            }
            Message::SetMembership { annulled, .. } => {
                SET_MEMBERSHIP_BYTES
                    + if annulled.is_empty() {
                        0
                    } else {
                        4 + RANGE_BYTES * annulled.len()
                    }
            }
            Message::Digest { .. } | Message::DigestOk { .. } => DIGEST_BYTES,
            Message::PullRecords { .. } => PULL_RECORDS_BYTES,
            Message::GetPageVersions { changed_after, .. } => {
                GET_PAGE_VERSIONS_BYTES + if *changed_after == 0 { 0 } else { 8 }
            }
            Message::PageVersions { versions, .. } => {
                PAGE_VERSIONS_FIXED_BYTES
                    + versions
                        .iter()
                        .map(|v| PAGE_VERSION_HEAD_BYTES + v.bytes.len())
                        .sum::<usize>()
            }
            Message::Scrub { filter } => filter_len(filter),
            Message::ScrubStarted { .. } => SCRUB_STARTED_BYTES,
            Message::ScrubStatus => SCRUB_STATUS_BYTES,
            Message::ScrubStatusOk { status } => status_len(status),
            Message::GetPageAt { .. } => GET_PAGE_AT_BYTES,
            Message::PageAt { bytes, .. } => PAGE_AT_FIXED_BYTES + bytes.len(),
            Message::FillGaps { .. } | Message::FillGapsOk { .. } => FILL_GAPS_BYTES,
            Message::NodeStatus => 0,
            Message::NodeStatusOk { .. } => NODE_STATUS_OK_BYTES,
            Message::Seal { .. } => SEAL_BYTES,
            Message::Truncate { ranges, .. } => TRUNCATE_FIXED_BYTES + RANGE_BYTES * ranges.len(),
            Message::ReadRecords { .. } => READ_RECORDS_BYTES,
            Message::Records { records, .. } => {
                RECORDS_FIXED_BYTES + records.iter().map(RedoRecord::encoded_len).sum::<usize>()
            }
            Message::Error { message, .. } => ERROR_FIXED_BYTES + message.len(),
        }
    }

    /// Refuse to encode what the decoder would refuse, so that a frame this
    /// node sends is one its peers accept.
    pub(super) fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Message::Append {
                volume, pg, records, ..
            } => {
                let batch = SegmentId {
                    volume: *volume,
                    pg: *pg,
                };
                if records.is_empty() {
                    return Err(ProtoError::EmptyBatch);
                }
                let mut prev_lsn = None;
                for (index, record) in records.iter().map(WireRecord::record).enumerate() {
                    check_record(record).map_err(|source| ProtoError::BadRecord { index, source })?;
                    check_batch_order(batch, prev_lsn, index, record)?;
                    prev_lsn = Some(record.lsn);
                }
                Ok(())
            }
            Message::Records {
                volume, pg, records, ..
            } => {
                let batch = SegmentId {
                    volume: *volume,
                    pg: *pg,
                };
                let mut prev_lsn = None;
                for (index, record) in records.iter().enumerate() {
                    check_record(record).map_err(|source| ProtoError::BadRecord { index, source })?;
                    check_batch_order(batch, prev_lsn, index, record)?;
                    prev_lsn = Some(record.lsn);
                }
                Ok(())
            }
            Message::SegmentStatus { annulled: ranges, .. } | Message::Truncate { ranges, .. }
                if ranges.len() > ANNULLED_RANGES_MAX =>
            {
                Err(ProtoError::TooManyRanges(ranges.len()))
            }
            Message::SegmentStatus { holes, .. } if holes.len() > HOLES_REPORTED_MAX => {
                Err(ProtoError::TooManyHoles(holes.len()))
            }
            Message::SegmentStatus { holes, .. } if holes.iter().any(|&(lo, hi)| lo == 0 || hi < lo) => {
                let &(lo, hi) = holes.iter().find(|&&(lo, hi)| lo == 0 || hi < lo).expect("found above");
                Err(ProtoError::BadRange { lo, hi })
            }
            Message::SegmentStatus { damage, .. }
                if damage.pages.len() > DAMAGED_PAGES_REPORTED_MAX
                    || damage.pages.len() > damage.pages_total as usize =>
            {
                Err(ProtoError::BadDamagedPages {
                    listed: damage.pages.len(),
                    total: damage.pages_total,
                })
            }
            Message::SetMembership { annulled, .. } if annulled.len() > ANNULLED_RANGES_MAX => {
                Err(ProtoError::TooManyRanges(annulled.len()))
            }
            Message::SetMembership { membership, .. } => membership.check().map_err(ProtoError::BadMembership),
            Message::SegmentStatus {
                membership: Some(membership),
                ..
            } => membership.check().map_err(ProtoError::BadMembership),
            Message::Scrub { filter } => validate_filter(filter),
            Message::ScrubStatusOk { status } => validate_status(status),
            Message::Error { message, .. } if message.len() > ERROR_MESSAGE_BYTES_MAX => {
                Err(ProtoError::MessageTooLong(message.len()))
            }
            _ => Ok(()),
        }
    }

    /// The fixed part of an Append body, before its `count` encoded records
    /// (shared with [`super::encode_append_frame`], which has them encoded already).
    pub(super) fn encode_append_fixed(out: &mut Vec<u8>, h: &super::AppendHeader, count: usize) {
        put_u64(out, h.volume);
        put_u64(out, h.epoch);
        put_u32(out, h.pg);
        put_u32(out, h.page_bytes);
        put_u64(out, h.pg_pages);
        put_u64(out, h.membership_epoch);
        // The frame bound keeps the count far below u32::MAX.
        put_u32(out, count as u32);
    }

    /// Append the body. The caller has validated the message and checked the
    /// frame size, so the `as u32` length casts below cannot truncate.
    pub(super) fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello {
                role,
                node_id,
                protocol_version,
            } => {
                put_u64(out, *node_id);
                put_u16(out, *protocol_version);
                out.push(*role as u8);
            }
            Message::HelloOk {
                node_id,
                protocol_version,
            } => {
                put_u64(out, *node_id);
                put_u16(out, *protocol_version);
            }
            Message::Append {
                volume,
                epoch,
                pg,
                page_bytes,
                pg_pages,
                membership_epoch,
                records,
            } => {
                let header = super::AppendHeader {
                    volume: *volume,
                    epoch: *epoch,
                    pg: *pg,
                    page_bytes: *page_bytes,
                    pg_pages: *pg_pages,
                    membership_epoch: *membership_epoch,
                };
                Message::encode_append_fixed(out, &header, records.len());
                for record in records {
                    out.extend_from_slice(record.encoded());
                }
            }
            Message::AppendAck {
                volume,
                pg,
                scl,
                incarnation,
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                put_u64(out, *scl);
                put_u64(out, *incarnation);
            }
            Message::PgmrplOk { volume, pg, pgmrpl } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                put_u64(out, *pgmrpl);
            }
            Message::GetPage {
                volume,
                epoch,
                pg,
                page,
                read_point,
                membership_epoch,
            } => {
                put_request_head(out, *volume, *epoch, *pg);
                put_u64(out, *page);
                put_u64(out, *read_point);
                put_u64(out, *membership_epoch);
            }
            Message::Page {
                volume,
                pg,
                page,
                lsn,
                bytes,
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                put_u64(out, *page);
                put_u64(out, *lsn);
                put_u32(out, bytes.len() as u32);
                out.extend_from_slice(bytes);
            }
            Message::SetPgmrpl { volume, epoch, pg, lsn } => {
                put_request_head(out, *volume, *epoch, *pg);
                put_u64(out, *lsn);
            }
            Message::GetSegmentStatus { volume, epoch, pg } => {
                put_request_head(out, *volume, *epoch, *pg);
            }
            Message::SegmentStatus {
                volume,
                pg,
                epoch,
                scl,
                highest_lsn,
                lowest_lsn,
                pgmrpl,
                records,
                log_bytes,
                page_store_bytes,
                installed_epoch,
                incarnation,
                annulled,
                holes,
                damage,
                membership,
                hydration,
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                for v in [
                    epoch,
                    scl,
                    highest_lsn,
                    lowest_lsn,
                    pgmrpl,
                    records,
                    log_bytes,
                    page_store_bytes,
                    installed_epoch,
                    incarnation,
                ] {
                    put_u64(out, *v);
                }
                put_ranges(out, annulled);
                put_ranges(out, holes);
                put_u32(out, damage.pages_total);
                put_u32(out, damage.pages.len() as u32);
                for &page in &damage.pages {
                    put_u64(out, page);
                }
                out.push(u8::from(damage.table_slot));
                // Left out when none: the body then ends as an older sender's
                // (all zeros, which decodes as none, when a hydration follows).
                match membership {
                    Some(m) => m.encode(out),
                    None if hydration.is_some() => out.resize(out.len() + MEMBERSHIP_BYTES, 0),
                    None => {}
                }
                if let Some(h) = hydration {
                    out.push(u8::from(h.under_way));
                    put_u64(out, h.bytes);
                    put_u64(out, h.pages);
                }
            }
            Message::SetMembership {
                volume,
                epoch,
                pg,
                page_bytes,
                pg_pages,
                membership,
                annulled,
            } => {
                put_request_head(out, *volume, *epoch, *pg);
                put_u32(out, *page_bytes);
                put_u64(out, *pg_pages);
                membership.encode(out);
                // Left out when empty: the body then ends as an older sender's.
                if !annulled.is_empty() {
                    put_ranges(out, annulled);
                }
            }
            Message::Digest { volume, pg, digest } | Message::DigestOk { volume, pg, digest } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                for v in [
                    digest.installed_epoch,
                    digest.membership_epoch,
                    digest.scl,
                    digest.highest_lsn,
                    digest.floor,
                ] {
                    put_u64(out, v);
                }
            }
            Message::PullRecords {
                volume,
                pg,
                installed_epoch,
                membership_epoch,
                after: first,
                max_bytes,
            }
            | Message::GetPageVersions {
                volume,
                pg,
                installed_epoch,
                membership_epoch,
                first_page: first,
                max_bytes,
                ..
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                put_u64(out, *installed_epoch);
                put_u64(out, *membership_epoch);
                put_u64(out, *first);
                put_u32(out, *max_bytes);
                // Left out when 0: the body then ends as an older asker's.
                if let Message::GetPageVersions { changed_after, .. } = self
                    && *changed_after != 0
                {
                    put_u64(out, *changed_after);
                }
            }
            Message::PageVersions {
                volume,
                pg,
                floor,
                next_page,
                versions,
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                put_u64(out, *floor);
                put_u64(out, *next_page);
                put_u32(out, versions.len() as u32);
                for v in versions {
                    put_u64(out, v.page);
                    put_u64(out, v.lsn);
                    put_u32(out, v.bytes.len() as u32);
                    out.extend_from_slice(&v.bytes);
                }
            }
            Message::Scrub { filter } => put_filter(out, filter),
            Message::ScrubStarted { pass } => put_u64(out, *pass),
            Message::ScrubStatus => {}
            Message::FillGaps { volume, pg } | Message::FillGapsOk { volume, pg } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
            }
            Message::NodeStatus => {}
            Message::NodeStatusOk { status } => {
                put_u64(out, status.node_id);
                put_u64(out, status.page_store_blocks);
                put_u64(out, status.page_store_free_blocks);
                put_u64(out, status.log_blocks);
                put_u64(out, status.log_free_blocks);
            }
            Message::ScrubStatusOk { status } => put_status(out, status),
            Message::GetPageAt {
                volume,
                pg,
                installed_epoch,
                membership_epoch,
                page,
                lsn,
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                for v in [installed_epoch, membership_epoch, page, lsn] {
                    put_u64(out, *v);
                }
            }
            Message::PageAt {
                volume,
                pg,
                page,
                lsn,
                bytes,
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                put_u64(out, *page);
                put_u64(out, *lsn);
                put_u32(out, bytes.len() as u32);
                out.extend_from_slice(bytes);
            }
            Message::Seal {
                volume,
                epoch,
                pg,
                page_bytes,
                pg_pages,
            } => {
                put_request_head(out, *volume, *epoch, *pg);
                put_u32(out, *page_bytes);
                put_u64(out, *pg_pages);
            }
            Message::Truncate {
                volume,
                epoch,
                pg,
                ranges,
            } => {
                put_request_head(out, *volume, *epoch, *pg);
                put_ranges(out, ranges);
            }
            Message::ReadRecords {
                volume,
                epoch,
                pg,
                after,
                max_bytes,
            } => {
                put_request_head(out, *volume, *epoch, *pg);
                put_u64(out, *after);
                put_u32(out, *max_bytes);
            }
            Message::Records {
                volume,
                pg,
                scl,
                records,
            } => {
                put_u64(out, *volume);
                put_u32(out, *pg);
                put_u64(out, *scl);
                put_u32(out, records.len() as u32);
                for record in records {
                    record.encode_into(out);
                }
            }
            Message::Error {
                code,
                current_epoch,
                message,
            } => {
                put_u64(out, *current_epoch);
                put_u16(out, *code as u16);
                put_u16(out, message.len() as u16);
                out.extend_from_slice(message.as_bytes());
            }
        }
    }

    /// Decode a body of type `kind`. `body` is exactly the frame's body: the
    /// frame length bounds it, and every allocation here is bounded by it.
    pub(super) fn decode_body(kind: MessageType, body: &[u8]) -> Result<Message, ProtoError> {
        let mut r = Reader::new(kind, body);
        let message = match kind {
            MessageType::Hello => {
                let node_id = r.u64()?;
                let protocol_version = r.u16()?;
                let role = r.u8()?;
                let role = Role::from_u8(role).ok_or(ProtoError::UnknownRole(role))?;
                Message::Hello {
                    role,
                    node_id,
                    protocol_version,
                }
            }
            MessageType::HelloOk => Message::HelloOk {
                node_id: r.u64()?,
                protocol_version: r.u16()?,
            },
            MessageType::Append => return decode_append(r),
            MessageType::AppendAck => Message::AppendAck {
                volume: r.u64()?,
                pg: r.u32()?,
                scl: r.u64()?,
                incarnation: r.u64()?,
            },
            MessageType::GetPage => Message::GetPage {
                volume: r.u64()?,
                epoch: r.u64()?,
                pg: r.u32()?,
                page: r.u64()?,
                read_point: r.u64()?,
                membership_epoch: r.u64()?,
            },
            MessageType::Page => {
                let volume = r.u64()?;
                let pg = r.u32()?;
                let page = r.u64()?;
                let lsn = r.u64()?;
                let len = r.u32()? as usize;
                // `take` checks `len` against the bytes present before copying.
                let bytes = r.take(len)?.to_vec();
                Message::Page {
                    volume,
                    pg,
                    page,
                    lsn,
                    bytes,
                }
            }
            MessageType::SetPgmrpl => Message::SetPgmrpl {
                volume: r.u64()?,
                epoch: r.u64()?,
                pg: r.u32()?,
                lsn: r.u64()?,
            },
            MessageType::PgmrplOk => Message::PgmrplOk {
                volume: r.u64()?,
                pg: r.u32()?,
                pgmrpl: r.u64()?,
            },
            MessageType::GetSegmentStatus => Message::GetSegmentStatus {
                volume: r.u64()?,
                epoch: r.u64()?,
                pg: r.u32()?,
            },
            MessageType::SegmentStatus => Message::SegmentStatus {
                volume: r.u64()?,
                pg: r.u32()?,
                epoch: r.u64()?,
                scl: r.u64()?,
                highest_lsn: r.u64()?,
                lowest_lsn: r.u64()?,
                pgmrpl: r.u64()?,
                records: r.u64()?,
                log_bytes: r.u64()?,
                page_store_bytes: r.u64()?,
                installed_epoch: r.u64()?,
                incarnation: r.u64()?,
                annulled: r.ranges()?,
                // Optional: a body that ends after the truncation ranges
                // comes from a node that predates hole reporting.
                holes: if r.rest.is_empty() {
                    Vec::new()
                } else {
                    r.ranges_up_to(HOLES_REPORTED_MAX)?
                },
                // Optional too: a body that ends after the holes comes from
                // a node that predates damage reporting.
                damage: if r.rest.is_empty() {
                    Damage::default()
                } else {
                    r.damage()?
                },
                // Optional too: from a node that predates membership.
                membership: if r.rest.is_empty() { None } else { r.membership()? },
                // Optional too: from a node that predates hydration reports.
                hydration: if r.rest.is_empty() { None } else { Some(r.hydration()?) },
            },
            MessageType::SetMembership => {
                let volume = r.u64()?;
                let epoch = r.u64()?;
                let pg = r.u32()?;
                let page_bytes = r.u32()?;
                let pg_pages = r.u64()?;
                let membership = r
                    .membership()?
                    .ok_or(ProtoError::BadMembership(crate::membership::MembershipError::ZeroEpoch))?;
                // Optional: a body that ends after the membership comes
                // from a writer that predates the ranges.
                let annulled = if r.rest.is_empty() { Vec::new() } else { r.ranges()? };
                Message::SetMembership {
                    volume,
                    epoch,
                    pg,
                    page_bytes,
                    pg_pages,
                    membership,
                    annulled,
                }
            }
            MessageType::Digest | MessageType::DigestOk => {
                let volume = r.u64()?;
                let pg = r.u32()?;
                let digest = GossipDigest {
                    installed_epoch: r.u64()?,
                    membership_epoch: r.u64()?,
                    scl: r.u64()?,
                    highest_lsn: r.u64()?,
                    floor: r.u64()?,
                };
                if kind == MessageType::Digest {
                    Message::Digest { volume, pg, digest }
                } else {
                    Message::DigestOk { volume, pg, digest }
                }
            }
            MessageType::PullRecords => Message::PullRecords {
                volume: r.u64()?,
                pg: r.u32()?,
                installed_epoch: r.u64()?,
                membership_epoch: r.u64()?,
                after: r.u64()?,
                max_bytes: r.u32()?,
            },
            MessageType::GetPageVersions => Message::GetPageVersions {
                volume: r.u64()?,
                pg: r.u32()?,
                installed_epoch: r.u64()?,
                membership_epoch: r.u64()?,
                first_page: r.u64()?,
                max_bytes: r.u32()?,
                changed_after: if r.rest.is_empty() { 0 } else { r.u64()? },
            },
            MessageType::PageVersions => return decode_page_versions(r),
            MessageType::Scrub => {
                // The least a body holds: read before anything is allocated.
                if r.rest().len() < SCRUB_FIXED_BYTES {
                    r.take(SCRUB_FIXED_BYTES)?;
                }
                Message::Scrub {
                    filter: read_filter(&mut r)?,
                }
            }
            MessageType::ScrubStarted => Message::ScrubStarted { pass: r.u64()? },
            MessageType::ScrubStatus => Message::ScrubStatus,
            MessageType::FillGaps => Message::FillGaps {
                volume: r.u64()?,
                pg: r.u32()?,
            },
            MessageType::FillGapsOk => Message::FillGapsOk {
                volume: r.u64()?,
                pg: r.u32()?,
            },
            MessageType::NodeStatus => Message::NodeStatus,
            MessageType::NodeStatusOk => Message::NodeStatusOk {
                status: crate::proto::NodeStatus {
                    node_id: r.u64()?,
                    page_store_blocks: r.u64()?,
                    page_store_free_blocks: r.u64()?,
                    log_blocks: r.u64()?,
                    log_free_blocks: r.u64()?,
                },
            },
            MessageType::ScrubStatusOk => {
                if r.rest().len() < SCRUB_STATUS_FIXED_BYTES {
                    r.take(SCRUB_STATUS_FIXED_BYTES)?;
                }
                Message::ScrubStatusOk {
                    status: read_status(&mut r)?,
                }
            }
            MessageType::GetPageAt => Message::GetPageAt {
                volume: r.u64()?,
                pg: r.u32()?,
                installed_epoch: r.u64()?,
                membership_epoch: r.u64()?,
                page: r.u64()?,
                lsn: r.u64()?,
            },
            MessageType::PageAt => {
                let volume = r.u64()?;
                let pg = r.u32()?;
                let page = r.u64()?;
                let lsn = r.u64()?;
                let len = r.u32()? as usize;
                // `take` checks `len` against the bytes present before copying.
                let bytes = r.take(len)?.to_vec();
                Message::PageAt {
                    volume,
                    pg,
                    page,
                    lsn,
                    bytes,
                }
            }
            MessageType::Seal => Message::Seal {
                volume: r.u64()?,
                epoch: r.u64()?,
                pg: r.u32()?,
                page_bytes: r.u32()?,
                pg_pages: r.u64()?,
            },
            MessageType::Truncate => Message::Truncate {
                volume: r.u64()?,
                epoch: r.u64()?,
                pg: r.u32()?,
                ranges: r.ranges()?,
            },
            MessageType::ReadRecords => Message::ReadRecords {
                volume: r.u64()?,
                epoch: r.u64()?,
                pg: r.u32()?,
                after: r.u64()?,
                max_bytes: r.u32()?,
            },
            MessageType::Records => return decode_records(r),
            MessageType::Error => {
                let current_epoch = r.u64()?;
                let code = r.u16()?;
                let code = ErrorCode::from_u16(code).ok_or(ProtoError::UnknownErrorCode(code))?;
                let len = r.u16()? as usize;
                // Checked before reading so an over-long text is named as
                // such even when the body also happens to be short.
                if len > ERROR_MESSAGE_BYTES_MAX {
                    return Err(ProtoError::MessageTooLong(len));
                }
                let text = std::str::from_utf8(r.take(len)?).map_err(|_| ProtoError::BadUtf8)?;
                Message::Error {
                    code,
                    current_epoch,
                    message: text.to_owned(),
                }
            }
        };
        r.finish()?;
        Ok(message)
    }
}

fn decode_append(mut r: Reader<'_>) -> Result<Message, ProtoError> {
    let volume = r.u64()?;
    let epoch = r.u64()?;
    let pg = r.u32()?;
    let page_bytes = r.u32()?;
    let pg_pages = r.u64()?;
    let membership_epoch = r.u64()?;
    let declared = r.u32()?;
    if declared == 0 {
        return Err(ProtoError::EmptyBatch);
    }
    // The node writes each record's bytes to its log as they came.
    let records = read_batch(&mut r, SegmentId { volume, pg }, declared, WireRecord::decode_prefix)?;
    r.finish()?;
    Ok(Message::Append {
        volume,
        epoch,
        pg,
        page_bytes,
        pg_pages,
        membership_epoch,
        records,
    })
}

/// `declared` records of segment `batch`, in LSN order, from the front of
/// `r`, each decoded by `decode` (a record, or a record with its bytes).
fn read_batch<T: AsRef<RedoRecord>>(
    r: &mut Reader<'_>,
    batch: SegmentId,
    declared: u32,
    decode: impl Fn(&[u8]) -> Result<(T, usize), RecordError>,
) -> Result<Vec<T>, ProtoError> {
    // The count is the peer's word; the body is what arrived. Bound the count
    // by the body before it sizes an allocation.
    let room = r.rest().len() / RECORD_HEADER_BYTES;
    if declared as usize > room {
        return Err(ProtoError::RecordCountImpossible { declared, room });
    }
    let mut records = Vec::with_capacity(declared as usize);
    let mut prev_lsn = None;
    for index in 0..declared as usize {
        // Fewer records than declared shows up here as a truncated record;
        // more shows up in `finish` as trailing bytes.
        let (record, used) = decode(r.rest()).map_err(|source| ProtoError::BadRecord { index, source })?;
        r.take(used)?;
        check_batch_order(batch, prev_lsn, index, record.as_ref())?;
        prev_lsn = Some(record.as_ref().lsn);
        records.push(record);
    }
    Ok(records)
}

fn decode_records(mut r: Reader<'_>) -> Result<Message, ProtoError> {
    let volume = r.u64()?;
    let pg = r.u32()?;
    let scl = r.u64()?;
    let declared = r.u32()?;
    let records = read_batch(&mut r, SegmentId { volume, pg }, declared, RedoRecord::decode_prefix)?;
    r.finish()?;
    Ok(Message::Records {
        volume,
        pg,
        scl,
        records,
    })
}

fn decode_page_versions(mut r: Reader<'_>) -> Result<Message, ProtoError> {
    let volume = r.u64()?;
    let pg = r.u32()?;
    let floor = r.u64()?;
    let next_page = r.u64()?;
    let declared = r.u32()?;
    // Bound the count by the body before it sizes an allocation.
    let room = r.rest().len() / PAGE_VERSION_HEAD_BYTES;
    if declared as usize > room {
        return Err(ProtoError::RecordCountImpossible { declared, room });
    }
    let mut versions = Vec::with_capacity(declared as usize);
    for _ in 0..declared {
        let page = r.u64()?;
        let lsn = r.u64()?;
        let len = r.u32()? as usize;
        let bytes = r.take(len)?.to_vec();
        versions.push(WirePageVersion { page, lsn, bytes });
    }
    r.finish()?;
    Ok(Message::PageVersions {
        volume,
        pg,
        floor,
        next_page,
        versions,
    })
}

/// A count (u32) and that many `(lo, hi)` LSN ranges.
fn put_ranges(out: &mut Vec<u8>, ranges: &[(u64, u64)]) {
    put_u32(out, ranges.len() as u32);
    for &(lo, hi) in ranges {
        put_u64(out, lo);
        put_u64(out, hi);
    }
}

/// A batch holds one segment's records in strictly increasing LSN order.
/// Also the node's check of a batch handed to it in-process.
pub(crate) fn check_batch_order(
    batch: SegmentId,
    prev_lsn: Option<u64>,
    index: usize,
    record: &RedoRecord,
) -> Result<(), ProtoError> {
    if record.segment != batch {
        return Err(ProtoError::ForeignRecord {
            index,
            lsn: record.lsn,
            record: record.segment,
            batch,
        });
    }
    if let Some(prev) = prev_lsn
        && record.lsn <= prev
    {
        return Err(ProtoError::LsnNotIncreasing {
            index,
            prev,
            lsn: record.lsn,
        });
    }
    Ok(())
}

/// The checks `RedoRecord::decode_prefix` makes, for the sending side (and so
/// that `encode_into` never meets a payload it would panic on).
fn check_record(record: &RedoRecord) -> Result<(), RecordError> {
    let payload_len = record.payload().len();
    if payload_len > RECORD_PAYLOAD_MAX_BYTES {
        return Err(RecordError::TooLarge(payload_len));
    }
    for prev in [record.prev_lsn_pg, record.prev_lsn_page] {
        if record.lsn == 0 || prev != 0 && prev >= record.lsn {
            return Err(RecordError::BadBacklink { lsn: record.lsn, prev });
        }
    }
    Ok(())
}

pub(super) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(super) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Volume, epoch and PG: how every request to a segment starts.
fn put_request_head(out: &mut Vec<u8>, volume: u64, epoch: u64, pg: u32) {
    put_u64(out, volume);
    put_u64(out, epoch);
    put_u32(out, pg);
}

/// A cursor over one body that turns running out of bytes into
/// `BodyTooShort` and leftover bytes into `BodyTooLong`, without indexing
/// that could panic.
pub(super) struct Reader<'a> {
    kind: MessageType,
    body_len: usize,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(kind: MessageType, body: &'a [u8]) -> Reader<'a> {
        Reader {
            kind,
            body_len: body.len(),
            rest: body,
        }
    }

    pub(super) fn rest(&self) -> &'a [u8] {
        self.rest
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        match self.rest.split_at_checked(n) {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(head)
            }
            None => Err(ProtoError::BodyTooShort {
                kind: self.kind,
                have: self.body_len,
                need: (self.body_len - self.rest.len()).saturating_add(n),
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let head = self.take(N)?;
        let mut a = [0; N];
        a.copy_from_slice(head);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count and that many ranges; the count is bounded before it sizes anything.
    fn ranges(&mut self) -> Result<Vec<(u64, u64)>, ProtoError> {
        self.ranges_up_to(ANNULLED_RANGES_MAX)
    }

    fn ranges_up_to(&mut self, max: usize) -> Result<Vec<(u64, u64)>, ProtoError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(if max == HOLES_REPORTED_MAX {
                ProtoError::TooManyHoles(n)
            } else {
                ProtoError::TooManyRanges(n)
            });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let lo = self.u64()?;
            let hi = self.u64()?;
            if lo == 0 || hi < lo {
                return Err(ProtoError::BadRange { lo, hi });
            }
            out.push((lo, hi));
        }
        Ok(out)
    }

    /// The damage tail of a `SegmentStatus`: the listed count is bounded
    /// before it sizes anything. Flag bits other than bit 0 are ignored.
    fn damage(&mut self) -> Result<Damage, ProtoError> {
        let pages_total = self.u32()?;
        let listed = self.u32()? as usize;
        if listed > DAMAGED_PAGES_REPORTED_MAX || listed > pages_total as usize {
            return Err(ProtoError::BadDamagedPages {
                listed,
                total: pages_total,
            });
        }
        let mut pages = Vec::with_capacity(listed);
        for _ in 0..listed {
            pages.push(self.u64()?);
        }
        let flags = self.u8()?;
        Ok(Damage {
            pages_total,
            pages,
            table_slot: flags & 1 != 0,
        })
    }

    /// A hydration report: flags (bit 0: under way; others ignored), bytes, pages.
    fn hydration(&mut self) -> Result<Hydration, ProtoError> {
        Ok(Hydration {
            under_way: self.u8()? & 1 != 0,
            bytes: self.u64()?,
            pages: self.u64()?,
        })
    }

    /// A membership's fixed encoding; all zeros is none.
    fn membership(&mut self) -> Result<Option<Membership>, ProtoError> {
        Membership::decode(self.take(MEMBERSHIP_BYTES)?).map_err(ProtoError::BadMembership)
    }

    fn finish(self) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::BodyTooLong {
                kind: self.kind,
                have: self.body_len,
                expected: self.body_len - self.rest.len(),
            })
        }
    }
}
