//! A segment: one replica of one protection group, as a state machine free
//! of I/O (docs/architecture.md, "State machines free of I/O"). It owns the
//! PG's record chain and its SCL.
//!
//! Records link to the previous record of their PG (`prev_lsn_pg`). The
//! segment complete LSN (SCL) is the highest LSN up to which the segment holds
//! that chain without a gap, counting only records that are durable in the
//! log. Records past a gap are kept but do not raise the SCL until the gap is
//! filled. Re-sent records are recognised and not stored twice; a record that
//! claims an LSN the segment already holds with other content is a conflict,
//! reported and never stored.
//!
//! The node's shell feeds it: a batch to [`Segment::admit`] (what is new must
//! go to the log), then [`Segment::on_durable`] once the log acknowledged it,
//! which returns the acks that may now be sent.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::record::{RedoRecord, SegmentId, WireRecord};

/// What the segment remembers of a record it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    pub prev_lsn_pg: u64,
    pub prev_lsn_page: u64,
    pub page: u64,
    /// The record closes its mini-transaction (recovery finds the VDL by it).
    pub cpl: bool,
    /// Identifies the content: CRC32C of the encoding and its length.
    pub digest: u64,
    /// Seq of the log block the record starts in, once durable.
    pub log_seq: Option<u64>,
}

impl RecordMeta {
    pub fn of(record: &RedoRecord, encoded: &[u8]) -> RecordMeta {
        RecordMeta {
            prev_lsn_pg: record.prev_lsn_pg,
            prev_lsn_page: record.prev_lsn_page,
            page: record.page,
            cpl: record.cpl,
            digest: digest(encoded),
            log_seq: None,
        }
    }

    pub fn durable(&self) -> bool {
        self.log_seq.is_some()
    }
}

pub fn digest(encoded: &[u8]) -> u64 {
    (u64::from(crc32c::crc32c(encoded)) << 32) | (encoded.len() as u64 & 0xFFFF_FFFF)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("request epoch {got} is older than the segment's epoch {current}")]
    StaleEpoch { got: u64, current: u64 },
    #[error("record at LSN {lsn} differs from the record the segment holds at that LSN")]
    Conflict { lsn: u64 },
    #[error("record at LSN {lsn} links to LSN {prev}, which record {other} already follows")]
    Fork { lsn: u64, prev: u64, other: u64 },
    #[error("the segment holds {held} records past its SCL, its limit; coalescing must catch up")]
    Full { held: usize },
    #[error(
        "epoch {got} is not installed on the segment (it has installed {installed}); \
         a Truncate at that epoch must come first"
    )]
    EpochNotInstalled { got: u64, installed: u64 },
    #[error("{0} truncation ranges; at most {ANNULLED_RANGES_MAX}")]
    TooManyRanges(usize),
}

/// Truncation ranges a recovery sends and a segment reports: the newest
/// recovery's whole set (a later recovery reads them to decide).
pub const ANNULLED_RANGES_MAX: usize = 4;

/// Holes a segment reports at most (the lowest ones): a bound on the
/// status reply, which stays small whatever the damage.
pub const HOLES_REPORTED_MAX: usize = 16;

/// Damaged pages a segment lists at most (the lowest ones; the status
/// reply carries the total besides).
pub const DAMAGED_PAGES_REPORTED_MAX: usize = 16;

/// LSNs `lo..=hi` annulled by a recovery: whatever a record there held, it
/// never happened (docs/architecture.md, "Recovery").
pub type LsnRange = (u64, u64);

pub fn in_ranges(ranges: &[LsnRange], lsn: u64) -> bool {
    ranges.iter().any(|&(lo, hi)| lo <= lsn && lsn <= hi)
}

/// The union of `ranges` as sorted, disjoint, non-adjacent ranges (empty ones dropped).
pub fn union_ranges(ranges: impl Iterator<Item = LsnRange>) -> Vec<LsnRange> {
    let mut sorted: Vec<LsnRange> = ranges.filter(|r| r.0 <= r.1).collect();
    sorted.sort_unstable();
    let mut out: Vec<LsnRange> = Vec::with_capacity(sorted.len());
    for (lo, hi) in sorted {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The outcome of admitting a batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// LSNs of the batch's records to write to the log, in batch order.
    pub new: Vec<u64>,
    /// Re-sent records whose first copy is not durable yet: the batch may be
    /// acknowledged only once these LSNs are.
    pub waits_for: Vec<u64>,
}

/// An acknowledgement that waits for records to become durable.
#[derive(Debug)]
struct Deferred<T> {
    waits_for: Vec<u64>,
    ticket: T,
}

/// One segment's chain. `T` is what the shell needs to send an ack later
/// (a connection and request id).
#[derive(Debug)]
pub struct Segment<T> {
    pub id: SegmentId,
    /// The highest epoch seen (a writer sealing the segment raises it).
    epoch: u64,
    /// The epoch whose truncation the segment has applied: appends and
    /// PGMRPLs are taken at this epoch only. Below `epoch` while a
    /// recovering writer has sealed the segment but not yet truncated it.
    installed_epoch: u64,
    /// Truncation ranges applied, lowest first.
    annulled: Vec<LsnRange>,
    scl: u64,
    highest_lsn: u64,
    /// Every record held, by LSN.
    records: BTreeMap<u64, RecordMeta>,
    /// The `log_seq`s of the durable records held, as a multiset (seq →
    /// records): the oldest is asked after every coalescing round, and a
    /// scan of every record was most of a round's CPU.
    log_seqs: BTreeMap<u64, usize>,
    /// Records held that are not durable yet (let in, log write under way).
    undurable: usize,
    /// Records held above the SCL (`records.range(scl + 1..).count()`),
    /// kept as records come and go and the SCL moves: admit asks for it on
    /// every batch, and counting while a long gap lasts was O(gap) a batch.
    past_scl: usize,
    /// Durable records past a gap, by the LSN they link to.
    waiting_link: HashMap<u64, u64>,
    /// The keys of `waiting_link` that are not held (`records`): where a
    /// hole ends. Kept as records and links come and go, so [`Segment::holes`]
    /// reads the lowest few in order: a segment far behind has every
    /// record the writer sends it waiting past its gap, and counting holes
    /// over all of them (gossip asks 50 times a second) was most of a
    /// catching-up node's CPU, under the lock the write path takes.
    /// May also name LSNs at or below the SCL; those are not holes.
    hole_tops: BTreeSet<u64>,
    deferred: Vec<Deferred<T>>,
    /// Records past the SCL held at most (a bound on memory while a gap lasts).
    gap_records_max: usize,
    /// Set when the node's log was found damaged at start-up: the segment
    /// may lack records above this LSN that it acknowledged (they were in
    /// the damaged blocks, and nothing it still holds links past them).
    /// Cleared once a record above it is held: its chain link then tells
    /// exactly what is missing below it.
    lost_above: Option<u64>,
}

impl<T> Segment<T> {
    pub fn new(id: SegmentId, epoch: u64, gap_records_max: usize) -> Segment<T> {
        Segment {
            id,
            epoch,
            installed_epoch: epoch,
            annulled: Vec::new(),
            scl: 0,
            highest_lsn: 0,
            records: BTreeMap::new(),
            log_seqs: BTreeMap::new(),
            undurable: 0,
            past_scl: 0,
            waiting_link: HashMap::new(),
            hole_tops: BTreeSet::new(),
            deferred: Vec::new(),
            gap_records_max,
            lost_above: None,
        }
    }

    /// The node's log was damaged: records this segment acknowledged above
    /// what it holds now may be gone (see [`Segment::holes`]).
    pub fn mark_log_damage(&mut self) {
        self.lost_above = Some(self.highest_lsn.max(self.scl));
    }

    /// Whatever the log damage took is known to be back (the segment holds
    /// what its peers hold, see `gossip::GossipCore::caught_up`): no open
    /// hole any more. Returns whether there was one.
    pub fn clear_log_damage(&mut self) -> bool {
        self.lost_above.take().is_some()
    }

    /// LSN ranges, inclusive and lowest first, where the segment lacks
    /// records of its chain: between two records it holds, from just above
    /// the lower one up to the record the upper one links to (which is
    /// missing; the SCL stops below the first hole). After log damage,
    /// also `(h + 1, u64::MAX)`: records above its highest LSN `h` may be
    /// missing too. At most [`HOLES_REPORTED_MAX`], the lowest.
    pub fn holes(&self) -> Vec<LsnRange> {
        let mut out = Vec::new();
        for &prev in self.hole_tops.range(self.scl + 1..) {
            if out.len() == HOLES_REPORTED_MAX {
                return out;
            }
            let below = self
                .records
                .range(..prev)
                .next_back()
                .map_or(0, |(&l, _)| l)
                .max(self.scl);
            out.push((below + 1, prev));
        }
        if let Some(h) = self.lost_above
            && out.len() < HOLES_REPORTED_MAX
            && h < u64::MAX
        {
            out.push((h + 1, u64::MAX));
        }
        out
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn installed_epoch(&self) -> u64 {
        self.installed_epoch
    }

    pub fn annulled(&self) -> &[LsnRange] {
        &self.annulled
    }

    /// Set what the segment table holds (at start-up, before any record is loaded).
    pub fn restore_epochs(&mut self, epoch: u64, installed_epoch: u64, annulled: &[LsnRange]) {
        self.epoch = epoch;
        self.installed_epoch = installed_epoch.min(epoch);
        self.annulled = annulled.to_vec();
    }

    pub fn scl(&self) -> u64 {
        self.scl
    }

    pub fn highest_lsn(&self) -> u64 {
        self.highest_lsn
    }

    pub fn lowest_lsn(&self) -> Option<u64> {
        self.records.keys().next().copied()
    }

    pub fn records_held(&self) -> usize {
        self.records.len()
    }

    /// Records held above the SCL: past a gap, or with their write under way.
    pub fn records_past_scl(&self) -> usize {
        debug_assert_eq!(
            self.past_scl,
            self.records.range(self.scl + 1..).count(),
            "the count follows the records held and the SCL"
        );
        self.past_scl
    }

    pub fn record(&self, lsn: u64) -> Option<&RecordMeta> {
        self.records.get(&lsn)
    }

    /// A record linking to `link` (its `prev_lsn_pg`) lands past a gap: what
    /// it links to is above the SCL and not held, so it cannot join the
    /// chain (nor be coalesced) until the gap is filled.
    pub fn past_gap(&self, link: u64) -> bool {
        link > self.scl && !self.records.contains_key(&link)
    }

    /// For writes (appends, PGMRPL): refuse an older epoch, and a newer one
    /// whose truncation the segment has not applied. A writer's epoch
    /// reaches a segment only through [`seal`](Self::seal) and
    /// [`truncate`](Self::truncate): a segment that missed a recovery
    /// still holds records the recovery annulled, and must drop them before
    /// it takes the new writer's records.
    pub fn check_epoch(&self, epoch: u64) -> Result<(), SegmentError> {
        if epoch < self.epoch {
            return Err(SegmentError::StaleEpoch {
                got: epoch,
                current: self.epoch,
            });
        }
        if epoch > self.installed_epoch {
            return Err(SegmentError::EpochNotInstalled {
                got: epoch,
                installed: self.installed_epoch,
            });
        }
        Ok(())
    }

    /// A recovering writer fences the segment: from now on requests below
    /// `epoch` are refused. Returns whether the epoch rose (the caller
    /// persists it before answering).
    pub fn seal(&mut self, epoch: u64) -> Result<bool, SegmentError> {
        if epoch < self.epoch {
            return Err(SegmentError::StaleEpoch {
                got: epoch,
                current: self.epoch,
            });
        }
        let raised = epoch > self.epoch;
        self.epoch = epoch;
        Ok(raised)
    }

    /// Apply a recovery's truncation at `epoch`: records in `ranges` are
    /// dropped (durable or not, see [`Segment::annul`]), `epoch` becomes the
    /// installed one, and `ranges` *replace* the ones held: they are the
    /// recovery's whole set, which already carries forward what it kept of
    /// earlier ones. (Merging would let a dead recovery's range come back
    /// over records a later one kept.) Returns the dropped records'
    /// `(lsn, page)`, for the shell to drop their bodies.
    pub fn truncate(&mut self, epoch: u64, ranges: &[LsnRange]) -> Result<Vec<(u64, u64)>, SegmentError> {
        if epoch < self.epoch {
            return Err(SegmentError::StaleEpoch {
                got: epoch,
                current: self.epoch,
            });
        }
        if ranges.len() > ANNULLED_RANGES_MAX {
            return Err(SegmentError::TooManyRanges(ranges.len()));
        }
        let dropped = self.annul(ranges);
        self.epoch = epoch;
        self.installed_epoch = epoch;
        self.annulled = union_ranges(ranges.iter().copied());
        Ok(dropped)
    }

    /// Drop every record held in `ranges`: the SCL falls back to the chain
    /// below the first one dropped, acks waiting on them are dropped.
    /// Returns the dropped records' `(lsn, page)`. A truncation calls it;
    /// so does start-up, at an annulment in the log (which drops only what
    /// the log held before it).
    pub fn annul(&mut self, ranges: &[LsnRange]) -> Vec<(u64, u64)> {
        let doomed: Vec<u64> = self.records.keys().copied().filter(|&l| in_ranges(ranges, l)).collect();
        let mut dropped = Vec::with_capacity(doomed.len());
        let mut cut = None;
        for lsn in doomed {
            let meta = self.records.remove(&lsn).expect("listed above");
            match meta.log_seq {
                Some(seq) => seq_remove(&mut self.log_seqs, seq),
                None => self.undurable -= 1,
            }
            if lsn <= self.scl && cut.is_none() {
                // The lowest dropped record of the chain: the chain ends below it.
                cut = Some(meta.prev_lsn_pg);
            }
            dropped.push((lsn, meta.page));
        }
        if let Some(prev) = cut {
            self.scl = prev;
        }
        // Rare (a recovery's truncation): count afresh; `link` below keeps it.
        self.past_scl = self.records.range(self.scl + 1..).count();
        // Rebuild the links past the SCL from what is left.
        self.waiting_link.clear();
        self.hole_tops.clear();
        let past: Vec<(u64, u64)> = self
            .records
            .range(self.scl + 1..)
            .filter(|(_, m)| m.durable())
            .map(|(&l, m)| (l, m.prev_lsn_pg))
            .collect();
        for (lsn, prev) in past {
            // A fork among what is left was a fork before: keep the first.
            let _ = self.link(lsn, prev);
        }
        self.highest_lsn = self.records.keys().next_back().copied().unwrap_or(0).max(self.scl);
        self.deferred
            .retain(|d| !d.waits_for.iter().any(|l| in_ranges(ranges, *l)));
        dropped
    }

    /// Drop the records of branches a recovery annulled that came back
    /// from the log: after log damage, an annulment lost with the damaged
    /// blocks whose range the writer's set no longer names (it drops a
    /// range below a PGMRPL) lets them back into the chain, and the
    /// writer's later records, which link below them, would wait for ever.
    /// A durable record past the SCL linking to `prev` below it says the
    /// chain holds nothing between `prev` and itself; the records held
    /// there are the older branch (a writer's LSNs go on above a
    /// truncation's range, so the higher branch is the one in force).
    /// Returns the dropped records' `(lsn, page)`.
    pub fn drop_superseded_branches(&mut self) -> Vec<(u64, u64)> {
        let mut dropped = Vec::new();
        loop {
            let ranges: Vec<LsnRange> = (self.waiting_link.iter())
                .filter(|&(&prev, _)| prev < self.scl)
                .map(|(&prev, &lsn)| (prev + 1, lsn - 1))
                .collect();
            let now = self.annul(&ranges);
            if now.is_empty() {
                return dropped;
            }
            dropped.extend(now);
        }
    }

    /// Some record was let in and is not durable yet: its log write is
    /// under way. A truncation waits for none to be left (after its seal
    /// lets no more in), so that its annulment follows them in the log.
    pub fn writing(&self) -> bool {
        debug_assert_eq!(
            self.undurable,
            self.records.values().filter(|m| !m.durable()).count(),
            "the count follows the records held"
        );
        self.undurable > 0
    }

    /// The lowest record held at or below `upto` whose LSN is in `ranges`.
    /// Only records still held are seen: those coalesced into page versions
    /// (and forgotten here) are the caller's to check, by its coalesced LSN.
    pub fn held_in(&self, ranges: &[LsnRange], upto: u64) -> Option<u64> {
        self.records
            .range(..=upto)
            .map(|(&l, _)| l)
            .find(|&l| in_ranges(ranges, l))
    }

    /// Why a recovery's truncation `ranges` cannot be applied, if it cannot.
    /// Records at or below `coalesced_lsn` are in page versions only, so a
    /// range reaching them cannot be applied, unless the segment applied
    /// that part already (a later recovery resends its whole set, and
    /// nothing in an applied range was coalesced). Readers may have read at
    /// the PGMRPL, so no record held at or below it may be annulled.
    pub fn truncation_refused(&self, ranges: &[LsnRange], coalesced_lsn: u64, pgmrpl: u64) -> Option<String> {
        let installed = union_ranges(self.annulled.iter().copied());
        let applied = |lo: u64, hi: u64| installed.iter().any(|&(a, b)| a <= lo && hi <= b);
        if let Some(&(lo, hi)) = ranges
            .iter()
            .find(|&&(lo, hi)| lo <= coalesced_lsn && !applied(lo, hi.min(coalesced_lsn)))
        {
            return Some(format!(
                "truncation range {lo}..={hi} reaches the segment's coalesced LSN {coalesced_lsn}: the records \
                 at or below it are in page versions, which readers may have read at"
            ));
        }
        self.held_in(ranges, pgmrpl).map(|lsn| {
            format!(
                "the truncation would annul the record at LSN {lsn}, at or below the PGMRPL {pgmrpl}, \
                 which readers may have read at"
            )
        })
    }

    /// The chain's records above `after` (up to the SCL), in LSN order:
    /// what a recovering writer reads to find the VDL and to re-replicate.
    pub fn chain_after(&self, after: u64) -> impl Iterator<Item = (u64, &RecordMeta)> + '_ {
        let scl = self.scl;
        self.records
            .range(after + 1..)
            .take_while(move |(lsn, _)| **lsn <= scl)
            .map(|(&lsn, m)| (lsn, m))
    }

    /// For reads: refuse an older epoch, adopt nothing. Epoch 0 is an
    /// operator's read (storctl), which is never fenced.
    pub fn check_epoch_read(&self, epoch: u64) -> Result<(), SegmentError> {
        if epoch != 0 && epoch < self.epoch {
            return Err(SegmentError::StaleEpoch {
                got: epoch,
                current: self.epoch,
            });
        }
        Ok(())
    }

    /// Sort a batch (of this segment, LSNs strictly increasing) into new
    /// records, re-sends and conflicts. Nothing changes on error. New records
    /// are remembered as pending; the caller writes them to the log and then
    /// calls [`on_durable`]. A record's digest is taken from the encoding it
    /// carries (the bytes that go to the log), never from a new encoding.
    pub fn admit(&mut self, batch: &[WireRecord]) -> Result<Admitted, SegmentError> {
        debug_assert!(
            batch.windows(2).all(|w| w[0].record().lsn < w[1].record().lsn),
            "a batch's LSNs increase"
        );
        let mut admitted = Admitted::default();
        for e in batch {
            let record = e.record();
            match self.records.get(&record.lsn) {
                Some(held) if held.prev_lsn_pg != record.prev_lsn_pg || held.digest != digest(e.encoded()) => {
                    return Err(SegmentError::Conflict { lsn: record.lsn });
                }
                Some(held) => {
                    if !held.durable() {
                        admitted.waits_for.push(record.lsn);
                    }
                }
                // Below the SCL and no longer held (coalesced, collected):
                // the chain already covers it, so it is a re-send.
                None if record.lsn <= self.scl => {}
                None => admitted.new.push(record.lsn),
            }
        }
        let past_scl = self.records_past_scl();
        if past_scl + admitted.new.len() > self.gap_records_max {
            return Err(SegmentError::Full { held: past_scl });
        }
        // The new records, a subsequence of the batch in the same order:
        // remembered (digest taken) only now that the batch is taken whole.
        let mut new = admitted.new.iter().peekable();
        for e in batch {
            let record = e.record();
            if new.next_if_eq(&&record.lsn).is_some() {
                self.records.insert(record.lsn, RecordMeta::of(record, e.encoded()));
                self.hole_tops.remove(&record.lsn);
            }
        }
        // All above the SCL (held ones and those at or below it are not new).
        self.undurable += admitted.new.len();
        self.past_scl += admitted.new.len();
        Ok(admitted)
    }

    /// Keep `ticket` until every LSN in `waits_for` is durable; it comes back
    /// from [`on_durable`]. Returns it at once when there is nothing to wait for.
    pub fn defer_ack(&mut self, waits_for: Vec<u64>, ticket: T) -> Option<T> {
        let pending: Vec<u64> = waits_for
            .into_iter()
            .filter(|l| self.records.get(l).is_some_and(|m| !m.durable()))
            .collect();
        if pending.is_empty() {
            return Some(ticket);
        }
        self.deferred.push(Deferred {
            waits_for: pending,
            ticket,
        });
        None
    }

    /// Records `lsns` are durable in the log, starting in block `log_seq`
    /// or after (one log write's: the seq its first entry starts in).
    /// Extends the chain, and returns the deferred acks that may now go.
    ///
    /// Every record is marked durable before any is linked, so a fork (a
    /// record claiming a predecessor another record already follows) leaves
    /// nothing of the batch pending; it is reported beside the acks, which
    /// are owed whatever the fork.
    pub fn on_durable(&mut self, lsns: &[u64], log_seq: u64) -> (Vec<T>, Result<(), SegmentError>) {
        let mut linked = Ok(());
        for &lsn in lsns {
            // Gone: a truncation dropped it while its write was in flight.
            let Some(meta) = self.records.get_mut(&lsn) else {
                continue;
            };
            let was = meta.log_seq.replace(log_seq);
            self.highest_lsn = self.highest_lsn.max(lsn);
            match was {
                Some(was) => seq_remove(&mut self.log_seqs, was),
                None => self.undurable -= 1,
            }
            *self.log_seqs.entry(log_seq).or_default() += 1;
        }
        for &lsn in lsns {
            if let Some(prev) = self.records.get(&lsn).map(|m| m.prev_lsn_pg)
                && let Err(e) = self.link(lsn, prev)
                && linked.is_ok()
            {
                linked = Err(e);
            }
        }
        let mut ready = Vec::new();
        let mut i = 0;
        // (Allocates nothing while no ack is deferred: the usual case.)
        while i < self.deferred.len() {
            let records = &self.records;
            self.deferred[i]
                .waits_for
                .retain(|l| records.get(l).is_some_and(|m| !m.durable()));
            if self.deferred[i].waits_for.is_empty() {
                ready.push(self.deferred.swap_remove(i).ticket);
            } else {
                i += 1;
            }
        }
        (ready, linked)
    }

    /// The log did not take records `lsns` that [`admit`] let in: forget
    /// the copies that are not durable, so a re-send is new again, and drop
    /// the acks deferred on them (their waiters learn the first copy failed).
    pub fn abandon(&mut self, lsns: &[u64]) {
        for lsn in lsns {
            if self.records.get(lsn).is_some_and(|m| !m.durable()) {
                self.records.remove(lsn);
                if self.waiting_link.contains_key(lsn) {
                    self.hole_tops.insert(*lsn);
                }
                self.undurable -= 1;
                if *lsn > self.scl {
                    self.past_scl -= 1;
                }
            }
        }
        self.deferred.retain(|d| !d.waits_for.iter().any(|l| lsns.contains(l)));
    }

    /// Load a record found in the log at start-up: it is durable already.
    pub fn recover(&mut self, record: &RedoRecord, encoded: &[u8], log_seq: u64) -> Result<(), SegmentError> {
        let mut meta = RecordMeta::of(record, encoded);
        meta.log_seq = Some(log_seq);
        match self.records.get(&record.lsn) {
            Some(held) if held.digest != meta.digest => {
                return Err(SegmentError::Conflict { lsn: record.lsn });
            }
            Some(_) => return Ok(()),
            None if record.lsn <= self.scl => return Ok(()),
            None => {}
        }
        self.records.insert(record.lsn, meta);
        self.hole_tops.remove(&record.lsn);
        self.past_scl += 1;
        *self.log_seqs.entry(log_seq).or_default() += 1;
        self.highest_lsn = self.highest_lsn.max(record.lsn);
        self.link(record.lsn, record.prev_lsn_pg)
    }

    /// A durable record joins the chain, or waits for the record it links to.
    fn link(&mut self, lsn: u64, prev: u64) -> Result<(), SegmentError> {
        if self.lost_above.is_some_and(|h| lsn > h) {
            // Its link tells what is missing below it from now on.
            self.lost_above = None;
        }
        if lsn <= self.scl {
            return Ok(());
        }
        if prev != self.scl {
            if let Some(&other) = self.waiting_link.get(&prev)
                && other != lsn
            {
                return Err(SegmentError::Fork { lsn, prev, other });
            }
            self.waiting_link.insert(prev, lsn);
            if !self.records.contains_key(&prev) {
                self.hole_tops.insert(prev);
            }
            return Ok(());
        }
        let old = self.scl;
        self.scl = lsn;
        while let Some(next) = self.waiting_link.remove(&self.scl) {
            self.hole_tops.remove(&self.scl);
            self.scl = next;
        }
        // Usually just `lsn` and what waited on it; a record not linked
        // (a fork's, one still being written) may lie between as well.
        self.past_scl -= self.records.range(old + 1..=self.scl).count();
        Ok(())
    }

    /// Start the chain at `lsn`: everything up to it is already held
    /// elsewhere (coalesced into page versions before a restart). Call
    /// before any record is loaded.
    pub fn start_at(&mut self, lsn: u64) {
        debug_assert!(
            self.records.is_empty(),
            "the chain's start moves only on an empty segment"
        );
        self.scl = self.scl.max(lsn);
        self.highest_lsn = self.highest_lsn.max(lsn);
    }

    /// Durable records held whose log block is at or before `seq`: what
    /// must be written to the log again before the log may let go of it.
    pub fn logged_through(&self, seq: u64) -> Vec<(u64, RecordMeta)> {
        self.records
            .iter()
            .filter(|(_, m)| m.log_seq.is_some_and(|s| s <= seq))
            .map(|(&lsn, m)| (lsn, *m))
            .collect()
    }

    /// `lsns` (durable records held) were written to the log again, in
    /// blocks from `log_seq` on: the log keeps them from there.
    pub fn relogged(&mut self, lsns: &[u64], log_seq: u64) {
        for lsn in lsns {
            let Some(meta) = self.records.get_mut(lsn) else {
                continue;
            };
            if let Some(was) = meta.log_seq.replace(log_seq) {
                seq_remove(&mut self.log_seqs, was);
                *self.log_seqs.entry(log_seq).or_default() += 1;
            } else {
                // Not durable before: its first write will say where it is.
                meta.log_seq = None;
            }
        }
    }

    /// The oldest log block any durable record held starts in: the log
    /// must keep everything from it.
    pub fn oldest_log_seq(&self) -> Option<u64> {
        let oldest = self.log_seqs.keys().next().copied();
        debug_assert_eq!(
            oldest,
            self.records.values().filter_map(|m| m.log_seq).min(),
            "the log seq multiset follows the records held"
        );
        oldest
    }

    /// Records in the chain with LSN in `after+1 ..= upto` (capped at the
    /// SCL): `(lsn, page)` in LSN order.
    pub fn chain_between(&self, after: u64, upto: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let upto = upto.min(self.scl);
        self.records
            .range(after + 1..)
            .take_while(move |(lsn, _)| **lsn <= upto)
            .map(|(&lsn, m)| (lsn, m.page))
    }

    /// The segment now holds every change of its chain at or below `floor`
    /// in page versions taken from a peer (hydration): the chain goes on
    /// from `floor`. Durable records at or below it are forgotten, whether
    /// they were in the chain or past a gap (their changes are in the
    /// versions); one still being written stays until its write ends (it is
    /// below the SCL then, and coalescing forgets it). Records held above
    /// `floor` that link to it, and those that follow them, join the chain.
    /// A `floor` at or below the SCL only forgets, as coalescing does.
    pub fn hydrated(&mut self, floor: u64) {
        if floor <= self.scl {
            self.forget_through(floor);
            return;
        }
        let above = self.records.split_off(&(floor + 1));
        let below = std::mem::replace(&mut self.records, above);
        for (lsn, meta) in below {
            match meta.log_seq {
                Some(seq) => seq_remove(&mut self.log_seqs, seq),
                None => {
                    self.records.insert(lsn, meta);
                    self.hole_tops.remove(&lsn);
                }
            }
        }
        self.scl = floor;
        self.highest_lsn = self.highest_lsn.max(floor);
        if let Some(h) = self.lost_above {
            // Records lost to log damage above `floor` are still unknown.
            self.lost_above = Some(h.max(floor));
        }
        // Rare (a rebuild): count and link afresh, as `annul` does.
        self.past_scl = self.records.range(floor + 1..).count();
        self.waiting_link.clear();
        self.hole_tops.clear();
        let past: Vec<(u64, u64)> = self
            .records
            .range(floor + 1..)
            .filter(|(_, m)| m.durable())
            .map(|(&l, m)| (l, m.prev_lsn_pg))
            .collect();
        for (lsn, prev) in past {
            // A fork among what is left was a fork before: keep the first.
            let _ = self.link(lsn, prev);
        }
    }

    /// Forget records at or below `lsn` that are in the chain (coalesced
    /// into pages); the SCL keeps covering them.
    pub fn forget_through(&mut self, lsn: u64) {
        let keep = self.records.split_off(&(lsn.min(self.scl) + 1));
        for meta in self.records.values() {
            match meta.log_seq {
                Some(seq) => seq_remove(&mut self.log_seqs, seq),
                None => self.undurable -= 1,
            }
        }
        self.records = keep;
    }
}

/// Take one `seq` out of a multiset of log seqs.
fn seq_remove(seqs: &mut BTreeMap<u64, usize>, seq: u64) {
    if let Some(n) = seqs.get_mut(&seq) {
        *n -= 1;
        if *n == 0 {
            seqs.remove(&seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordBody;
    use proptest::prelude::*;

    const SEG: SegmentId = SegmentId { volume: 1, pg: 0 };

    fn rec(lsn: u64, prev: u64, byte: u8) -> WireRecord {
        let r = RedoRecord {
            segment: SEG,
            lsn,
            prev_lsn_pg: prev,
            prev_lsn_page: 0,
            page: lsn % 5,
            cpl: true,
            body: RecordBody::PageDelta {
                offset: 0,
                bytes: vec![byte; 8],
            },
        };
        WireRecord::new(r)
    }

    /// Admit and make durable at once; returns the SCL.
    fn put(s: &mut Segment<u32>, batch: &[WireRecord]) -> u64 {
        let a = s.admit(batch).unwrap();
        s.on_durable(&a.new, 1).1.unwrap();
        s.scl()
    }

    #[test]
    fn gaps_hold_the_scl_until_filled() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        assert_eq!(put(&mut s, &[rec(3, 0, 1), rec(7, 3, 1)]), 7);
        // 12 links to 10, which is missing.
        assert_eq!(put(&mut s, &[rec(12, 10, 1), rec(15, 12, 1)]), 7);
        assert_eq!(s.highest_lsn(), 15);
        assert_eq!(put(&mut s, &[rec(10, 7, 1)]), 15);
    }

    #[test]
    fn a_record_past_a_gap_links_above_the_scl_to_one_not_held() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        assert_eq!(put(&mut s, &[rec(3, 0, 1), rec(7, 3, 1)]), 7);
        assert!(!s.past_gap(7) && !s.past_gap(3), "at or below the SCL");
        assert!(s.past_gap(10));
        // Held but not yet durable: the next batch of an in-order stream.
        s.admit(&[rec(10, 7, 1)]).unwrap();
        assert!(!s.past_gap(10));
    }

    #[test]
    fn holes_say_exactly_where_the_chain_lacks_records() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        assert_eq!(put(&mut s, &[rec(3, 0, 1), rec(7, 3, 1)]), 7);
        assert!(s.holes().is_empty());
        // 12 links to 10 and 20 to 18: 8..=10 and 13..=18 may hold records.
        assert_eq!(put(&mut s, &[rec(12, 10, 1), rec(20, 18, 1)]), 7);
        assert_eq!(s.holes(), vec![(8, 10), (13, 18)]);
        // The log was damaged: past 20 the segment cannot tell what it lost.
        s.mark_log_damage();
        assert_eq!(s.holes(), vec![(8, 10), (13, 18), (21, u64::MAX)]);
        // A newer record's link says exactly what is missing below it.
        assert_eq!(put(&mut s, &[rec(25, 23, 1)]), 7);
        assert_eq!(s.holes(), vec![(8, 10), (13, 18), (21, 23)]);
        // Filled from the bottom, the SCL follows each hole's end.
        assert_eq!(put(&mut s, &[rec(10, 7, 1)]), 12);
        assert_eq!(s.holes(), vec![(13, 18), (21, 23)]);
        assert_eq!(put(&mut s, &[rec(18, 12, 1), rec(23, 20, 1)]), 25);
        assert!(s.holes().is_empty());
    }

    #[test]
    fn scl_counts_only_durable_records() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        let batch = [rec(1, 0, 1), rec(2, 1, 1)];
        let a = s.admit(&batch).unwrap();
        assert_eq!(a.new, vec![1, 2]);
        assert_eq!(s.scl(), 0, "admitted is not durable");
        s.on_durable(&[1], 5).1.unwrap();
        assert_eq!(s.scl(), 1);
        s.on_durable(&[2], 5).1.unwrap();
        assert_eq!(s.scl(), 2);
    }

    #[test]
    fn resends_are_recognised_and_wait_for_the_first_copy() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        let batch = [rec(1, 0, 1), rec(2, 1, 1)];
        s.admit(&batch).unwrap();
        // The same batch again, before the first is durable.
        let again = s.admit(&batch).unwrap();
        assert!(again.new.is_empty());
        assert_eq!(again.waits_for, vec![1, 2]);
        assert_eq!(s.defer_ack(again.waits_for, 77), None);
        assert_eq!(s.on_durable(&[1, 2], 3), (vec![77], Ok(())));
        // And once more, now durable: acknowledged at once.
        let third = s.admit(&batch).unwrap();
        assert_eq!(third, Admitted::default());
        assert_eq!(s.defer_ack(third.waits_for, 78), Some(78));
        assert_eq!(s.records_held(), 2);
    }

    #[test]
    fn records_the_log_did_not_take_are_forgotten_and_their_waiters_released() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        let batch = [rec(1, 0, 1), rec(2, 1, 1)];
        assert_eq!(s.admit(&batch).unwrap().new, vec![1, 2]);
        let again = s.admit(&batch).unwrap();
        assert_eq!(s.defer_ack(again.waits_for, 5), None);
        // The first copy's log write failed.
        s.abandon(&[1, 2]);
        assert_eq!(s.records_held(), 0);
        assert_eq!(
            s.on_durable(&[], 1),
            (vec![], Ok(())),
            "the deferred ack is dropped, not released"
        );
        // A re-send is new again, instead of waiting on a copy that never comes.
        assert_eq!(s.admit(&batch).unwrap().new, vec![1, 2]);
    }

    #[test]
    fn a_fork_leaves_nothing_of_its_batch_pending() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        put(&mut s, &[rec(5, 3, 1)]); // waits for 3
        let batch = [rec(6, 3, 1), rec(7, 0, 1)]; // 6 also claims 3: a fork
        s.admit(&batch).unwrap();
        let (ready, linked) = s.on_durable(&[6, 7], 1);
        assert!(ready.is_empty());
        assert_eq!(
            linked,
            Err(SegmentError::Fork {
                lsn: 6,
                prev: 3,
                other: 5
            })
        );
        assert!(s.record(7).unwrap().durable(), "the rest of the batch is durable");
        assert_eq!(s.scl(), 7);
    }

    #[test]
    fn different_content_at_a_held_lsn_is_a_conflict_and_changes_nothing() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        // 5 is held past a gap (it links to the missing 4).
        put(&mut s, &[rec(1, 0, 1), rec(2, 1, 1), rec(5, 4, 1)]);
        let before = s.record(5).copied();
        assert_eq!(
            s.admit(&[rec(3, 2, 1), rec(5, 4, 9)]),
            Err(SegmentError::Conflict { lsn: 5 })
        );
        assert_eq!(s.record(5).copied(), before);
        assert!(s.record(3).is_none(), "a refused batch stores nothing");
        assert_eq!(s.records_past_scl(), 1);
    }

    #[test]
    fn stale_epochs_are_refused_newer_ones_only_through_seal_and_truncate() {
        let mut s: Segment<u32> = Segment::new(SEG, 5, 1000);
        assert_eq!(s.check_epoch(4), Err(SegmentError::StaleEpoch { got: 4, current: 5 }));
        assert_eq!(s.check_epoch(5), Ok(()));
        assert_eq!(
            s.check_epoch(6),
            Err(SegmentError::EpochNotInstalled { got: 6, installed: 5 })
        );
        assert_eq!(s.seal(6), Ok(true));
        assert_eq!(s.check_epoch(5), Err(SegmentError::StaleEpoch { got: 5, current: 6 }));
        assert_eq!(
            s.check_epoch(6),
            Err(SegmentError::EpochNotInstalled { got: 6, installed: 5 }),
            "sealed, not truncated"
        );
        assert_eq!(s.seal(4), Err(SegmentError::StaleEpoch { got: 4, current: 6 }));
        s.truncate(6, &[]).unwrap();
        assert_eq!(s.check_epoch(6), Ok(()));
        assert_eq!(s.truncate(5, &[]), Err(SegmentError::StaleEpoch { got: 5, current: 6 }));
    }

    #[test]
    fn truncation_drops_the_range_and_the_chain_goes_on_below_it() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        // Chain 1 -> 3 -> 6 -> 8, and 12 past a gap (links to 10).
        put(
            &mut s,
            &[rec(1, 0, 1), rec(3, 1, 1), rec(6, 3, 1), rec(8, 6, 1), rec(12, 10, 1)],
        );
        assert_eq!(s.scl(), 8);
        // A pending (not yet durable) record in the range, and a waiter on it.
        let a = s.admit(&[rec(9, 8, 1)]).unwrap();
        assert_eq!(a.new, vec![9]);
        let again = s.admit(&[rec(9, 8, 1)]).unwrap();
        assert_eq!(s.defer_ack(again.waits_for, 7), None);
        s.seal(2).unwrap();
        let dropped = s.truncate(2, &[(5, 104)]).unwrap();
        assert_eq!(dropped, vec![(6, 1), (8, 3), (9, 4), (12, 2)]);
        assert_eq!(s.scl(), 3, "the chain ends below the first dropped record");
        assert_eq!(s.highest_lsn(), 3);
        assert_eq!(s.annulled(), &[(5, 104)]);
        // The in-flight write of 9 completes: it is not brought back, and
        // its waiter was dropped.
        assert_eq!(s.on_durable(&[9], 1), (vec![], Ok(())));
        assert!(s.record(9).is_none());
        assert_eq!(s.scl(), 3);
        // The new writer's chain continues from 3, above the range.
        assert_eq!(put(&mut s, &[rec(105, 3, 2), rec(107, 105, 2)]), 107);
        let chain: Vec<u64> = s.chain_after(1).map(|(l, _)| l).collect();
        assert_eq!(chain, vec![3, 105, 107]);
    }

    #[test]
    fn a_truncation_replaces_the_ranges_and_a_later_resend_is_kept() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        put(&mut s, &[rec(1, 0, 1), rec(2, 1, 1), rec(3, 2, 1), rec(4, 3, 1)]);
        // A recovery at epoch 2 annuls 3 and up; one at epoch 3 (which did
        // not see it) keeps 3 and 4 and annuls 5 and up.
        s.seal(2).unwrap();
        assert_eq!(s.truncate(2, &[(3, 1000)]).unwrap(), vec![(3, 3), (4, 4)]);
        assert_eq!(s.scl(), 2);
        s.seal(3).unwrap();
        s.truncate(3, &[(5, 2000), (3000, 3100)]).unwrap();
        assert_eq!(s.annulled(), &[(5, 2000), (3000, 3100)], "replaced, not merged");
        // The writer of epoch 3 re-sends 3 and 4: they are taken.
        assert_eq!(put(&mut s, &[rec(3, 2, 1), rec(4, 3, 1)]), 4);
        assert!(
            s.truncate(3, &[(1, 2), (4, 5), (7, 8), (10, 11), (13, 14)]).is_err(),
            "at most {ANNULLED_RANGES_MAX} ranges"
        );
        assert_eq!(s.scl(), 4, "a refused truncation drops nothing");
    }

    #[test]
    fn annulling_releases_the_log_positions_of_what_it_drops() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        let batch = [rec(1, 0, 1), rec(2, 1, 1), rec(3, 2, 1)];
        s.admit(&batch).unwrap();
        assert!(s.writing());
        s.on_durable(&[1], 10).1.unwrap();
        s.on_durable(&[2], 20).1.unwrap();
        s.on_durable(&[3], 30).1.unwrap();
        assert!(!s.writing());
        assert_eq!(s.oldest_log_seq(), Some(10));
        s.annul(&[(1, 2)]);
        assert_eq!(
            s.oldest_log_seq(),
            Some(30),
            "the dropped records no longer pin the log"
        );
        assert_eq!(s.scl(), 0);
    }

    #[test]
    fn records_past_a_gap_are_bounded() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 3);
        put(&mut s, &[rec(10, 5, 1), rec(11, 10, 1)]);
        assert!(matches!(
            s.admit(&[rec(12, 11, 1), rec(13, 12, 1)]),
            Err(SegmentError::Full { held: 2 })
        ));
        put(&mut s, &[rec(5, 0, 1)]);
        assert_eq!(s.scl(), 11);
        put(&mut s, &[rec(12, 11, 1), rec(13, 12, 1)]);
        assert_eq!(s.scl(), 13);
    }

    #[test]
    fn forgotten_records_below_the_scl_still_count_as_held() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        put(&mut s, &[rec(1, 0, 1), rec(2, 1, 1), rec(3, 2, 1)]);
        s.forget_through(2);
        assert_eq!(s.lowest_lsn(), Some(3));
        assert_eq!(s.admit(&[rec(1, 0, 1)]).unwrap(), Admitted::default());
        assert_eq!(s.scl(), 3);
    }

    #[test]
    fn after_hydration_the_chain_goes_on_from_the_floor() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        // 1..=3 in the chain; 8, 9 and 20 past gaps (durable at log seq 1, 2, 3).
        put(&mut s, &[rec(1, 0, 1), rec(2, 1, 1), rec(3, 2, 1)]);
        for (r, seq) in [(rec(8, 7, 1), 2), (rec(9, 8, 1), 2), (rec(20, 18, 1), 3)] {
            let a = s.admit(&[r]).unwrap();
            s.on_durable(&a.new, seq).1.unwrap();
        }
        assert_eq!(s.scl(), 3);
        assert_eq!(s.holes(), vec![(4, 7), (10, 18)]);
        // Every change up to 7 is now in page versions: 8 links to it.
        s.hydrated(7);
        assert_eq!(s.scl(), 9);
        assert_eq!(s.lowest_lsn(), Some(8), "what the versions hold is forgotten");
        assert_eq!(s.oldest_log_seq(), Some(2), "and its log positions released");
        assert_eq!(s.records_past_scl(), 1);
        assert_eq!(s.holes(), vec![(10, 18)]);
        // A re-send of a record below the floor is recognised, not stored.
        assert_eq!(s.admit(&[rec(5, 4, 1)]).unwrap(), Admitted::default());
        // A floor past everything held: the chain starts over from it.
        s.hydrated(30);
        assert_eq!((s.scl(), s.records_held(), s.oldest_log_seq()), (30, 0, None));
        assert_eq!(put(&mut s, &[rec(31, 30, 1)]), 31);
        // A floor at or below the SCL only forgets, as coalescing does.
        s.hydrated(30);
        assert_eq!((s.scl(), s.lowest_lsn()), (31, Some(31)));
    }

    #[test]
    fn a_record_being_written_below_the_floor_finishes_and_counts_nowhere() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        let a = s.admit(&[rec(5, 4, 1)]).unwrap();
        s.hydrated(7);
        assert_eq!(s.scl(), 7);
        assert!(s.writing(), "its log write is still under way");
        assert_eq!(s.records_past_scl(), 0);
        s.on_durable(&a.new, 1).1.unwrap();
        assert!(!s.writing());
        assert_eq!(s.scl(), 7);
        s.forget_through(7);
        assert_eq!((s.records_held(), s.oldest_log_seq()), (0, None));
    }

    #[test]
    fn records_past_the_scl_are_counted_through_every_change() {
        let mut s: Segment<u32> = Segment::new(SEG, 1, 1000);
        let check = |s: &Segment<u32>, want: usize| {
            assert_eq!(s.records_past_scl(), want);
            assert_eq!(s.records_past_scl(), s.records.range(s.scl() + 1..).count());
            assert_eq!(s.holes(), holes_by_scan(s));
        };
        s.admit(&[rec(1, 0, 1), rec(2, 1, 1)]).unwrap();
        check(&s, 2);
        s.on_durable(&[1, 2], 1).1.unwrap();
        check(&s, 0);
        // Past a gap (5 links to the missing 4), and a write that fails.
        put(&mut s, &[rec(5, 4, 1), rec(6, 5, 1)]);
        check(&s, 2);
        s.admit(&[rec(7, 6, 1)]).unwrap();
        check(&s, 3);
        s.abandon(&[7]);
        check(&s, 2);
        // The gap filled: the SCL passes everything.
        put(&mut s, &[rec(3, 2, 1), rec(4, 3, 1)]);
        assert_eq!(s.scl(), 6);
        check(&s, 0);
        // The SCL rises past a record still being written that it does not
        // link through (8 and 9 both claim 6).
        s.admit(&[rec(8, 6, 1)]).unwrap();
        check(&s, 1);
        put(&mut s, &[rec(9, 6, 1)]);
        assert_eq!(s.scl(), 9);
        check(&s, 0);
        s.on_durable(&[8], 2).1.unwrap();
        check(&s, 0);
        // A truncation takes the SCL back below what is left.
        s.annul(&[(4, 4)]);
        assert_eq!(s.scl(), 3);
        check(&s, 4);
        s.forget_through(2);
        check(&s, 4);
        // Start-up loads records in log order, a gap first.
        let mut r: Segment<u32> = Segment::new(SEG, 1, 1000);
        for (lsn, prev) in [(3, 2), (2, 1), (1, 0)] {
            let e = rec(lsn, prev, 1);
            r.recover(e.record(), e.encoded(), 1).unwrap();
        }
        assert_eq!(r.scl(), 3);
        check(&r, 0);
    }

    /// [`Segment::holes`] the slow way: every link waiting on a record not
    /// held is where a hole ends.
    fn holes_by_scan(s: &Segment<u32>) -> Vec<LsnRange> {
        let mut tops: Vec<u64> = s
            .waiting_link
            .keys()
            .copied()
            .filter(|&prev| prev > s.scl && !s.records.contains_key(&prev))
            .collect();
        tops.sort_unstable();
        let mut out: Vec<LsnRange> = tops
            .into_iter()
            .take(HOLES_REPORTED_MAX)
            .map(|prev| {
                let below = s.records.range(..prev).next_back().map_or(0, |(&l, _)| l).max(s.scl);
                (below + 1, prev)
            })
            .collect();
        if let Some(h) = s.lost_above
            && out.len() < HOLES_REPORTED_MAX
            && h < u64::MAX
        {
            out.push((h + 1, u64::MAX));
        }
        out
    }

    proptest! {
        /// The holes kept as records come and go are the ones a scan of
        /// every waiting link finds, through arrivals in any order, writes
        /// that fail, truncations, hydration and coalescing.
        #[test]
        fn holes_are_kept_through_every_change(
            ops in prop::collection::vec((0u8..8, 1u64..60, 1u64..4), 1..150),
        ) {
            let mut s: Segment<u32> = Segment::new(SEG, 1, 10_000);
            let mut pending: Vec<u64> = Vec::new();
            for (op, lsn, span) in ops {
                match op {
                    // A record linking `span` below itself, written at once
                    // or left in flight.
                    0..=3 => {
                        let prev = lsn.saturating_sub(span);
                        if let Ok(a) = s.admit(&[rec(lsn, prev, 1)]) {
                            if op == 3 {
                                pending.extend_from_slice(&a.new);
                            } else {
                                let _ = s.on_durable(&a.new, 1);
                            }
                        }
                    }
                    4 => {
                        let _ = s.on_durable(&pending, 2);
                        pending.clear();
                    }
                    5 => {
                        s.abandon(&pending);
                        pending.clear();
                    }
                    6 => {
                        s.annul(&[(lsn, lsn + span)]);
                        pending.retain(|l| s.record(*l).is_some());
                    }
                    _ => {
                        if span == 1 {
                            s.hydrated(lsn);
                        } else {
                            s.forget_through(lsn);
                        }
                        pending.retain(|l| s.record(*l).is_some());
                    }
                }
                prop_assert_eq!(s.holes(), holes_by_scan(&s));
            }
        }

        /// Whatever order, duplication and batching the records arrive in,
        /// the SCL is exactly the end of the longest gap-free durable prefix
        /// of the chain, and never goes down.
        #[test]
        fn scl_is_the_gap_free_prefix(
            gaps in prop::collection::vec(1u64..5, 1..40),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..120),
            durable_lag in 0usize..4,
        ) {
            let mut lsns = Vec::new();
            let mut lsn = 0;
            for g in &gaps {
                lsn += g;
                lsns.push(lsn);
            }
            let chain: Vec<WireRecord> =
                lsns.iter().enumerate().map(|(i, &l)| rec(l, if i == 0 { 0 } else { lsns[i - 1] }, 1)).collect();
            let mut s: Segment<u32> = Segment::new(SEG, 1, 10_000);
            let mut arrived = vec![false; chain.len()];
            let mut pending: Vec<u64> = Vec::new();
            let mut last_scl = 0;
            for idx in &order {
                let i = idx.index(chain.len());
                let a = s.admit(std::slice::from_ref(&chain[i])).unwrap();
                pending.extend_from_slice(&a.new);
                arrived[i] = true;
                // The log acknowledges in order, some time later.
                while pending.len() > durable_lag {
                    let l = pending.remove(0);
                    s.on_durable(&[l], 1).1.unwrap();
                }
                prop_assert!(s.scl() >= last_scl);
                prop_assert_eq!(s.records_past_scl(), s.records.range(s.scl() + 1..).count());
                prop_assert_eq!(s.holes(), holes_by_scan(&s));
                last_scl = s.scl();
            }
            for l in pending.drain(..) {
                s.on_durable(&[l], 1).1.unwrap();
            }
            let prefix = arrived.iter().take_while(|&&a| a).count();
            let expected = if prefix == 0 { 0 } else { lsns[prefix - 1] };
            prop_assert_eq!(s.scl(), expected);
        }
    }
}
