//! What the node shows its metrics endpoint ([`crate::metrics`]): each
//! segment's watermarks and the log's space. Segments are read one at a
//! time, so a scrape holds the state lock no longer than one
//! `GetSegmentStatus` does, however many segments the node holds.

use crate::io::BLOCK_SIZE;
use crate::metrics::NodeCounters;
use crate::record::SegmentId;

use super::Node;

/// One segment's watermarks and epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentGauges {
    pub id: SegmentId,
    pub scl: u64,
    pub highest_lsn: u64,
    pub pgmrpl: u64,
    /// Every record at or below it is in page versions (the floor the log
    /// is freed below).
    pub coalesced_lsn: u64,
    /// LSN ranges the segment lacks, as `GetSegmentStatus` lists them (at
    /// most [`crate::segment::HOLES_REPORTED_MAX`]).
    pub holes: u64,
    pub records: u64,
    /// The epoch requests are checked against, and the volume epoch whose
    /// truncation the segment has installed.
    pub epoch: u64,
    pub installed_epoch: u64,
    /// 0 while the writer has set no membership.
    pub membership_epoch: u64,
    /// Pages whose current version was found damaged since the node opened.
    pub damaged_pages: u64,
}

/// The log's space and what was written to it since the node opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogGauges {
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub written_bytes: u64,
    pub entries_written: u64,
}

impl Node {
    /// Every segment's gauges, ordered by volume and PG.
    pub fn segment_gauges(&self) -> Vec<SegmentGauges> {
        let mut ids: Vec<SegmentId> = self.state().segments.keys().copied().collect();
        ids.sort_unstable_by_key(|id| (id.volume, id.pg));
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let st = self.state();
            // Gone since the ids were taken: nothing to report.
            let Some(s) = st.segments.get(&id) else { continue };
            out.push(SegmentGauges {
                id,
                scl: s.seg.scl(),
                highest_lsn: s.seg.highest_lsn(),
                pgmrpl: s.pgmrpl,
                coalesced_lsn: s.coalesced_lsn,
                holes: s.seg.holes().len() as u64,
                records: s.seg.records_held() as u64,
                epoch: s.seg.epoch(),
                installed_epoch: s.seg.installed_epoch(),
                membership_epoch: s.membership.as_ref().map_or(0, |m| m.epoch),
                damaged_pages: u64::from(s.damaged_pages),
            });
        }
        out
    }

    pub fn log_gauges(&self) -> LogGauges {
        let log = self.log.stats();
        let block = BLOCK_SIZE as u64;
        LogGauges {
            size_bytes: log.log_blocks * block,
            used_bytes: (log.next_seq - log.tail_seq) * block,
            free_bytes: log.free_blocks * block,
            written_bytes: log.blocks_written * block,
            entries_written: log.entries_acked,
        }
    }

    pub fn counters(&self) -> &NodeCounters {
        &self.counters
    }
}
