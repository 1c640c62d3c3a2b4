//! The scrub messages' bodies: a priority pass's [`Filter`] (`Scrub`) and a
//! node's [`Status`] (`ScrubStatusOk`), laid out as docs/protocol.md says,
//! encoded and strictly decoded. Every count is bounded before it sizes an
//! allocation, every flag byte and kind is checked, and fields a kind does
//! not use must be zero, so each body has exactly one encoding.

use super::FRAME_BYTES_MAX;
use super::FRAME_HEADER_BYTES;
use super::body::{Reader, put_u8, put_u16, put_u32, put_u64};
use super::error::ProtoError;
use crate::record::SegmentId;
use crate::scrub::{Area, AreaReport, Damaged, Filter, Finding, LEFT_LISTED_MAX, PassReport, Running, Status};

/// Segments one `Scrub` may name: as many as a node can hold.
pub const SCRUB_SEGMENTS_MAX: usize = crate::segtable::SEGMENTS_MAX;
/// Areas one pass report may count: the log and every segment a node can hold.
pub const SCRUB_AREAS_MAX: usize = SCRUB_SEGMENTS_MAX + 1;
/// Longest text of a finding's error, in bytes of UTF-8; a node cuts a
/// longer one (at a character boundary) before it sends it.
pub const FINDING_ERROR_BYTES_MAX: usize = 256;

/// Filter: kind (u8) and segment count (u32), then 12 bytes a segment.
pub(super) const SCRUB_FIXED_BYTES: usize = 5;
const SEGMENT_ID_BYTES: usize = 12;
const FILTER_ALL: u8 = 0;
const FILTER_SEGMENTS: u8 = 1;

/// Totals (3 × u64) and the parts byte.
pub(super) const SCRUB_STATUS_FIXED_BYTES: usize = 25;
const PART_RUNNING: u8 = 1;
const PART_LAST: u8 = 2;
/// Pass, priority, bytes done, bytes total.
const RUNNING_BYTES: usize = 25;
/// Pass, priority, started, ended, bytes read, area count.
const PASS_FIXED_BYTES: usize = 37;
/// Kind, volume, PG, four counts, listed count: the least an area takes.
const AREA_FIXED_BYTES: usize = 49;
const AREA_LOG: u8 = 0;
const AREA_SEGMENT: u8 = 1;
/// Offset, kind, page, LSN, flags, text length.
const FINDING_FIXED_BYTES: usize = 28;
const WHAT_LOG_BLOCK: u8 = 1;
const WHAT_PAGE_VERSION: u8 = 2;
const WHAT_OLDER_SLOT: u8 = 3;
const WHAT_PAGE_MAP: u8 = 4;

pub(super) fn filter_len(filter: &Filter) -> usize {
    SCRUB_FIXED_BYTES
        + match filter {
            Filter::All => 0,
            Filter::Segments(ids) => SEGMENT_ID_BYTES * ids.len(),
        }
}

pub(super) fn validate_filter(filter: &Filter) -> Result<(), ProtoError> {
    match filter {
        Filter::Segments(ids) if ids.len() > SCRUB_SEGMENTS_MAX => Err(ProtoError::BadScrub(format!(
            "{} segments named; at most {SCRUB_SEGMENTS_MAX}",
            ids.len()
        ))),
        _ => Ok(()),
    }
}

pub(super) fn put_filter(out: &mut Vec<u8>, filter: &Filter) {
    match filter {
        Filter::All => {
            put_u8(out, FILTER_ALL);
            put_u32(out, 0);
        }
        Filter::Segments(ids) => {
            put_u8(out, FILTER_SEGMENTS);
            // Validated: at most SCRUB_SEGMENTS_MAX.
            put_u32(out, ids.len() as u32);
            for id in ids {
                put_u64(out, id.volume);
                put_u32(out, id.pg);
            }
        }
    }
}

pub(super) fn read_filter(r: &mut Reader<'_>) -> Result<Filter, ProtoError> {
    let kind = r.u8()?;
    let count = r.u32()? as usize;
    match kind {
        FILTER_ALL if count == 0 => Ok(Filter::All),
        FILTER_ALL => Err(ProtoError::BadScrub(format!(
            "a filter of every segment names {count} segments"
        ))),
        FILTER_SEGMENTS => {
            // The count is the peer's word: bounded before it sizes anything.
            if count > SCRUB_SEGMENTS_MAX {
                return Err(ProtoError::BadScrub(format!(
                    "{count} segments named; at most {SCRUB_SEGMENTS_MAX}"
                )));
            }
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                ids.push(SegmentId {
                    volume: r.u64()?,
                    pg: r.u32()?,
                });
            }
            Ok(Filter::Segments(ids))
        }
        other => Err(ProtoError::BadScrub(format!("unknown filter kind {other}"))),
    }
}

pub(super) fn status_len(s: &Status) -> usize {
    SCRUB_STATUS_FIXED_BYTES
        + s.running.map_or(0, |_| RUNNING_BYTES)
        + s.last.as_ref().map_or(0, |p| {
            PASS_FIXED_BYTES
                + p.areas
                    .iter()
                    .map(|(_, a)| {
                        AREA_FIXED_BYTES
                            + a.left
                                .iter()
                                .map(|f| FINDING_FIXED_BYTES + f.error.len())
                                .sum::<usize>()
                    })
                    .sum::<usize>()
        })
}

/// What the decoder would refuse, refused before sending.
pub(super) fn validate_status(s: &Status) -> Result<(), ProtoError> {
    let Some(p) = &s.last else {
        return Ok(());
    };
    if p.areas.len() > SCRUB_AREAS_MAX {
        return Err(ProtoError::BadScrub(format!(
            "{} areas in a pass report; at most {SCRUB_AREAS_MAX}",
            p.areas.len()
        )));
    }
    for (area, a) in &p.areas {
        check_area_counts(*area, a.found, a.repaired, a.left.len())?;
        for f in &a.left {
            if f.error.len() > FINDING_ERROR_BYTES_MAX {
                return Err(ProtoError::BadScrub(format!(
                    "a finding's error of {} bytes; at most {FINDING_ERROR_BYTES_MAX}",
                    f.error.len()
                )));
            }
        }
    }
    Ok(())
}

fn check_area_counts(area: Area, found: u64, repaired: u64, listed: usize) -> Result<(), ProtoError> {
    if repaired > found {
        return Err(ProtoError::BadScrub(format!(
            "{area:?}: {repaired} repaired of {found} found"
        )));
    }
    if listed > LEFT_LISTED_MAX || listed as u64 > found - repaired {
        return Err(ProtoError::BadScrub(format!(
            "{area:?}: {listed} findings listed of {} left; at most {LEFT_LISTED_MAX} and at most those left",
            found - repaired
        )));
    }
    Ok(())
}

pub(super) fn put_status(out: &mut Vec<u8>, s: &Status) {
    put_u64(out, s.found_total);
    put_u64(out, s.repaired_total);
    put_u64(out, s.left_now);
    let mut parts = 0;
    if s.running.is_some() {
        parts |= PART_RUNNING;
    }
    if s.last.is_some() {
        parts |= PART_LAST;
    }
    put_u8(out, parts);
    if let Some(r) = &s.running {
        put_u64(out, r.pass);
        put_u8(out, u8::from(r.priority));
        put_u64(out, r.bytes_done);
        put_u64(out, r.bytes_total);
    }
    if let Some(p) = &s.last {
        put_u64(out, p.pass);
        put_u8(out, u8::from(p.priority));
        put_u64(out, p.started_unix_secs);
        put_u64(out, p.ended_unix_secs);
        put_u64(out, p.bytes_read);
        // Validated: at most SCRUB_AREAS_MAX areas, LEFT_LISTED_MAX findings
        // each, FINDING_ERROR_BYTES_MAX bytes a text.
        put_u32(out, p.areas.len() as u32);
        for (area, a) in &p.areas {
            match area {
                Area::Log => {
                    put_u8(out, AREA_LOG);
                    put_u64(out, 0);
                    put_u32(out, 0);
                }
                Area::Segment(id) => {
                    put_u8(out, AREA_SEGMENT);
                    put_u64(out, id.volume);
                    put_u32(out, id.pg);
                }
            }
            put_u64(out, a.blocks_checked);
            put_u64(out, a.pages_checked);
            put_u64(out, a.found);
            put_u64(out, a.repaired);
            put_u32(out, a.left.len() as u32);
            for f in &a.left {
                put_finding(out, f);
            }
        }
    }
}

fn put_finding(out: &mut Vec<u8>, f: &Finding) {
    let (what, page, lsn) = match f.what {
        Damaged::LogBlock => (WHAT_LOG_BLOCK, 0, 0),
        Damaged::PageVersion { page, lsn } => (WHAT_PAGE_VERSION, page, lsn),
        Damaged::OlderSlot { page } => (WHAT_OLDER_SLOT, page, 0),
        Damaged::PageMap { first_page } => (WHAT_PAGE_MAP, first_page, 0),
    };
    put_u64(out, f.offset);
    put_u8(out, what);
    put_u64(out, page);
    put_u64(out, lsn);
    put_u8(out, u8::from(f.repaired));
    put_u16(out, f.error.len() as u16);
    out.extend_from_slice(f.error.as_bytes());
}

fn read_bool(r: &mut Reader<'_>, what: &str) -> Result<bool, ProtoError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(ProtoError::BadScrub(format!("{what} is {other}, not 0 or 1"))),
    }
}

pub(super) fn read_status(r: &mut Reader<'_>) -> Result<Status, ProtoError> {
    let found_total = r.u64()?;
    let repaired_total = r.u64()?;
    let left_now = r.u64()?;
    let parts = r.u8()?;
    if parts & !(PART_RUNNING | PART_LAST) != 0 {
        return Err(ProtoError::BadScrub(format!("unknown parts {parts:#04x}")));
    }
    let running = if parts & PART_RUNNING != 0 {
        Some(Running {
            pass: r.u64()?,
            priority: read_bool(r, "the running pass's priority")?,
            bytes_done: r.u64()?,
            bytes_total: r.u64()?,
        })
    } else {
        None
    };
    let last = if parts & PART_LAST != 0 {
        Some(read_pass(r)?)
    } else {
        None
    };
    Ok(Status {
        running,
        last,
        found_total,
        repaired_total,
        left_now,
    })
}

fn read_pass(r: &mut Reader<'_>) -> Result<PassReport, ProtoError> {
    let pass = r.u64()?;
    let priority = read_bool(r, "the pass's priority")?;
    let started_unix_secs = r.u64()?;
    let ended_unix_secs = r.u64()?;
    let bytes_read = r.u64()?;
    let count = r.u32()? as usize;
    // Bounded by the limit and by the body before it sizes an allocation.
    let room = r.rest().len() / AREA_FIXED_BYTES;
    if count > SCRUB_AREAS_MAX || count > room {
        return Err(ProtoError::BadScrub(format!(
            "{count} areas declared; at most {SCRUB_AREAS_MAX}, and the body has room for {room}"
        )));
    }
    let mut areas = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = r.u8()?;
        let volume = r.u64()?;
        let pg = r.u32()?;
        let area = match kind {
            AREA_LOG if volume == 0 && pg == 0 => Area::Log,
            AREA_LOG => return Err(ProtoError::BadScrub("the log area names a segment".into())),
            AREA_SEGMENT => Area::Segment(SegmentId { volume, pg }),
            other => return Err(ProtoError::BadScrub(format!("unknown area kind {other}"))),
        };
        let blocks_checked = r.u64()?;
        let pages_checked = r.u64()?;
        let found = r.u64()?;
        let repaired = r.u64()?;
        let listed = r.u32()? as usize;
        check_area_counts(area, found, repaired, listed)?;
        let mut left = Vec::with_capacity(listed);
        for _ in 0..listed {
            left.push(read_finding(r)?);
        }
        areas.push((
            area,
            AreaReport {
                blocks_checked,
                pages_checked,
                found,
                repaired,
                left,
            },
        ));
    }
    Ok(PassReport {
        pass,
        priority,
        started_unix_secs,
        ended_unix_secs,
        bytes_read,
        areas,
    })
}

fn read_finding(r: &mut Reader<'_>) -> Result<Finding, ProtoError> {
    let offset = r.u64()?;
    let what = r.u8()?;
    let page = r.u64()?;
    let lsn = r.u64()?;
    let what = match what {
        WHAT_LOG_BLOCK if page == 0 && lsn == 0 => Damaged::LogBlock,
        WHAT_PAGE_VERSION => Damaged::PageVersion { page, lsn },
        WHAT_OLDER_SLOT if lsn == 0 => Damaged::OlderSlot { page },
        WHAT_PAGE_MAP if lsn == 0 => Damaged::PageMap { first_page: page },
        WHAT_LOG_BLOCK | WHAT_OLDER_SLOT | WHAT_PAGE_MAP => {
            return Err(ProtoError::BadScrub(format!(
                "a finding of kind {what} with page {page} and LSN {lsn}: the fields it does not use must be 0"
            )));
        }
        other => return Err(ProtoError::BadScrub(format!("unknown finding kind {other}"))),
    };
    let repaired = read_bool(r, "a finding's repaired flag")?;
    let len = r.u16()? as usize;
    // Checked before reading, so an over-long text is named as such.
    if len > FINDING_ERROR_BYTES_MAX {
        return Err(ProtoError::BadScrub(format!(
            "a finding's error of {len} bytes; at most {FINDING_ERROR_BYTES_MAX}"
        )));
    }
    let error = std::str::from_utf8(r.take(len)?).map_err(|_| ProtoError::BadUtf8)?;
    Ok(Finding {
        offset,
        what,
        error: error.to_owned(),
        repaired,
    })
}

/// Make a node's status fit one `ScrubStatusOk` frame: each finding's text
/// cut (at a character boundary) to [`FINDING_ERROR_BYTES_MAX`], and, when
/// the report would still pass the frame limit (hundreds of segments each
/// with many findings left), fewer findings listed per area. The counts
/// stay whole: `found - repaired` still says how many are left.
pub fn fit_status_for_wire(s: &mut Status) {
    let Some(p) = &mut s.last else {
        return;
    };
    for (_, a) in &mut p.areas {
        for f in &mut a.left {
            if f.error.len() > FINDING_ERROR_BYTES_MAX {
                let mut cut = FINDING_ERROR_BYTES_MAX;
                while !f.error.is_char_boundary(cut) {
                    cut -= 1;
                }
                f.error.truncate(cut);
            }
        }
    }
    let mut listed_max = LEFT_LISTED_MAX;
    while FRAME_HEADER_BYTES + status_len(s) > FRAME_BYTES_MAX && listed_max > 0 {
        listed_max /= 2;
        if let Some(p) = &mut s.last {
            for (_, a) in &mut p.areas {
                a.left.truncate(listed_max);
            }
        }
    }
}
