//! Recovery at computed start-up (docs/architecture.md, "Recovery"), free of I/O like the
//! writer core: it takes connections going up and down, replies and ticks,
//! and produces requests to send, until it knows where the volume stands.
//!
//! 1. **Probe**: every segment's status (an operator's read, epoch 0) until
//!    each PG has a read quorum (3 of 6) of answers; the new epoch is one
//!    above the highest seen. A segment a node does not hold answers
//!    `UnknownSegment` and counts as empty.
//! 2. **Seal** every segment at the new epoch (creating the ones that do not
//!    exist): from here on a previous writer is refused, so nothing changes
//!    under what is read next. Each PG needs a write quorum of seals, so
//!    that a later recovery's probe sees this epoch (and goes above it)
//!    whenever this one got as far as truncating anything.
//! 3. **Read**: per PG, the sealed segment with the highest SCL holds every
//!    record that could have reached a write quorum (4 + 4 > 6). Its chain
//!    above the floor (the highest PGMRPL seen: a VDL of the old writer,
//!    durable everywhere) is read. So does any sealed segment whose SCL is
//!    at least the (k − 2)-th highest of the k sealed ones (a record on 4
//!    of 6 segments is on at least k − 2 of any k): when the source goes
//!    down, refuses, or answers with an SCL below that (it lost records
//!    since its seal), the read starts over from another such segment.
//!    Segments not sealed yet are sealed meanwhile: a larger k lowers the
//!    bound, so a write quorum up is always enough to find a source.
//! 4. **Decide**: LSNs are allocated contiguously, one per record, so the
//!    VCL is the end of the run of LSNs above the floor that some PG's chain
//!    (or an earlier truncation range) accounts for; the VDL is the highest
//!    CPL at or below it. Everything above the VDL, up to `VDL + LAL_MAX`
//!    (more than any writer can have allocated), is the new truncation range.
//! 5. **Truncate** every segment (a write quorum of each PG, at least): the
//!    recovery's whole set of ranges (the new one, and those of the newest
//!    recovery seen installed, above a floor every later recovery's floor
//!    reaches: a PGMRPL 3 segments of a PG hold) replaces the segment's, its
//!    records there are annulled, durably, and the new epoch installed.
//! 6. **Replicate** the chain up to the VDL to segments that lack it, until
//!    a write quorum of each PG holds it. Only then is the VDL durable, and
//!    only then does the writer serve. Segments not truncated yet (down in
//!    step 5, or answering after its quorum) are truncated meanwhile: the
//!    first to answer may be behind the floor, unable to take the chain.
//!
//! A fresh volume (no answer shows a writer's epoch or a record) needs no
//! range: LSNs start at 1.
//!
//! Memberships. Each PG starts at the membership the cluster file places
//! (epoch 1). A probe answer that shows a higher membership epoch replaces
//! it, and the probe goes on until a read quorum of *every* set of the
//! highest membership found has answered (`crate::membership`: a step in
//! force is on a write quorum of every set of the one before, so such a
//! probe cannot miss it). Every other node up is asked too (a scout): once
//! segments have moved, fewer than a read quorum of the placement may be
//! left, or members replaced long ago may be back holding the placement,
//! and a node the PG moved to knows the membership it moved under. A
//! scout's answer only ever raises the membership; the probe waits for
//! the scouts of nodes up a little (as the seal waits for stragglers), not
//! for nodes down. Every quorum after that is counted in each set:
//! a write quorum is 4 of every set, and a chain's source bound is the
//! old set's (the one set every committed record is on a write quorum of).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use storaged::proto::{ErrorCode, Message};
use storaged::record::{RedoRecord, WireRecord};
use storaged::segment::{ANNULLED_RANGES_MAX, LsnRange, in_ranges, union_ranges};

use crate::core::EncodedRecord;
use crate::membership::{self, Membership};

/// Read quorum and write quorum of a PG (docs/architecture.md, "Words").
const READ_QUORUM: usize = 3;
const WRITE_QUORUM: usize = 4;
/// No writer allocates more than this above its VDL (the LAL's ceiling,
/// enforced on the configuration): a truncation range this long covers
/// every LSN a previous writer can have used.
pub const LAL_MAX: u64 = 1_000_000;
/// Ticks a request goes unanswered before it is asked again (the shell
/// ticks every 100 ms: 3 s).
const REASK_TICKS: u64 = 30;
/// Ticks the seals of the nodes up beyond a write quorum are waited for
/// (500 ms).
const STRAGGLER_TICKS: u64 = 5;
/// Bytes of records asked for at once while reading a chain or replicating it.
const CHUNK_BYTES: usize = 1024 * 1024;

/// Where a recovered volume stands; the writer starts from it.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub epoch: u64,
    pub vdl: u64,
    /// The first LSN the new writer allocates (above the truncation range).
    pub next_lsn: u64,
    /// The truncation ranges installed, for segments that missed them.
    pub annulled: Vec<LsnRange>,
    pub pgs: Vec<RecoveredPg>,
    /// The first request id the writer may use. It takes over recovery's
    /// connections, on which answers to recovery's last requests may still
    /// come: with ids of its own below this, one of them would be taken
    /// for the answer to the writer's request of the same id.
    pub next_request: u64,
}

#[derive(Debug, Clone)]
pub struct RecoveredPg {
    /// The PG's last record at or below the VDL (0: none).
    pub tail: u64,
    /// The PG's records above the floor up to the VDL, held for segments
    /// that are still behind.
    pub records: Vec<Arc<EncodedRecord>>,
    /// The membership in force: the highest a read quorum of every one of
    /// its sets showed.
    pub membership: Membership,
    /// Each member's SCL as last heard (0: not heard), in `membership`'s order.
    pub scls: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    #[error("another writer took the volume at epoch {epoch}; this one stops")]
    Fenced { epoch: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Probe,
    Seal,
    Read,
    Truncate,
    Replicate,
    Done,
}

#[derive(Debug, Clone, Copy, Default)]
struct SlotState {
    /// Epoch the probe saw (0 for a segment that does not exist).
    probed: Option<u64>,
    sealed: Option<Sealed>,
    /// SCL after the truncation (and any replication since), and the
    /// node's incarnation it was reported under: it only moves forward
    /// within one; a new one (a restart) replaces it.
    truncated: Option<u64>,
    incarnation: Option<u64>,
    /// A request of the current phase is in flight.
    asked: bool,
    /// The tick its status was last asked at while it was behind the floor.
    status_at: Option<u64>,
    /// The membership epoch its last status showed (0: none).
    membership_epoch: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Sealed {
    scl: u64,
    highest_lsn: u64,
    pgmrpl: u64,
    /// The epoch of the last recovery whose truncation the segment applied.
    installed_epoch: u64,
}

#[derive(Debug)]
enum Ask {
    /// `sent`: the tick it was sent at.
    Slot {
        pg: u32,
        slot: usize,
        phase: Phase,
        sent: u64,
    },
    /// A probe of a node that is not a member of the PG's membership.
    Scout { pg: u32, node: u64, sent: u64 },
}

impl Ask {
    fn pg(&self) -> u32 {
        match *self {
            Ask::Slot { pg, .. } | Ask::Scout { pg, .. } => pg,
        }
    }

    fn sent(&self) -> u64 {
        match *self {
            Ask::Slot { sent, .. } | Ask::Scout { sent, .. } => sent,
        }
    }
}

/// The recovery state machine. See the module documentation.
#[derive(Debug)]
pub struct Recovery {
    volume: u64,
    page_bytes: u32,
    pg_pages: u64,
    /// Per PG, the highest membership seen; `slots[pg][i]` is its member `i`.
    memberships: Vec<Membership>,
    /// Per PG, the nodes outside its membership asked in the probe (or
    /// being asked): each once while it stays up.
    scouted: Vec<BTreeSet<u64>>,
    phase: Phase,
    slots: Vec<Vec<SlotState>>,
    up: BTreeSet<u64>,
    pending: HashMap<u64, Ask>,
    /// Ticks so far: a request unanswered for [`REASK_TICKS`] is asked again.
    ticks: u64,
    /// The tick at which a write quorum of every PG had answered its seal.
    seal_quorum_at: Option<u64>,
    /// The tick at which a read quorum of every set of every PG had
    /// answered the probe.
    probe_quorum_at: Option<u64>,
    next_request: u64,
    epoch: u64,
    floor: u64,
    /// Truncation ranges seen on sealed segments (from earlier recoveries),
    /// with the installed epoch of the segment that showed them.
    seen_ranges: Vec<(u64, LsnRange)>,
    /// Per PG: the slot whose chain is read, and what was read of it.
    source: Vec<Option<usize>>,
    /// Per PG: the SCL a source must have (the (k − 2)-th highest of the k
    /// sealed SCLs), and the slots not to read from (bitmasks): those that
    /// answered with less than that, and those that refused since the read
    /// last started over.
    source_scl_min: Vec<u64>,
    source_unfit: Vec<u8>,
    source_refused: Vec<u8>,
    chains: Vec<Vec<RedoRecord>>,
    read_done: Vec<bool>,
    // Decided:
    vdl: u64,
    ranges: Vec<LsnRange>,
    next_lsn: u64,
    tails: Vec<u64>,
    outputs: Vec<(u64, u64, Message)>,
    result: Option<Result<(), RecoveryError>>,
}

impl Recovery {
    /// `memberships`: each PG's membership as the cluster file places it.
    pub fn new(volume: u64, page_bytes: u32, pg_pages: u64, memberships: Vec<Membership>) -> Recovery {
        let pgs = memberships.len();
        Recovery {
            volume,
            page_bytes,
            pg_pages,
            slots: memberships
                .iter()
                .map(|m| vec![SlotState::default(); m.members.len()])
                .collect(),
            memberships,
            scouted: vec![BTreeSet::new(); pgs],
            phase: Phase::Probe,
            up: BTreeSet::new(),
            pending: HashMap::new(),
            ticks: 0,
            seal_quorum_at: None,
            probe_quorum_at: None,
            next_request: 1,
            epoch: 0,
            floor: 0,
            seen_ranges: Vec::new(),
            source: vec![None; pgs],
            source_scl_min: vec![0; pgs],
            source_unfit: vec![0; pgs],
            source_refused: vec![0; pgs],
            chains: vec![Vec::new(); pgs],
            read_done: vec![false; pgs],
            vdl: 0,
            ranges: Vec::new(),
            next_lsn: 1,
            tails: vec![0; pgs],
            outputs: Vec::new(),
            result: None,
        }
    }

    /// Requests to send: `(node, request id, message)`.
    pub fn take_outputs(&mut self, out: &mut Vec<(u64, u64, Message)>) {
        out.append(&mut self.outputs);
    }

    pub fn failed(&self) -> Option<&RecoveryError> {
        match &self.result {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }

    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// What recovery waits for, for the operator's log.
    pub fn progress(&self) -> String {
        let counts = |f: &dyn Fn(&SlotState) -> bool| -> String {
            let per_pg: Vec<usize> = self.slots.iter().map(|s| s.iter().filter(|x| f(x)).count()).collect();
            let worst = per_pg.iter().copied().min().unwrap_or(0);
            format!("{worst} in the PG that has fewest")
        };
        match self.phase {
            Phase::Probe => format!("probing segments: {}", counts(&|s| s.probed.is_some())),
            Phase::Seal => format!("sealing at epoch {}: {}", self.epoch, counts(&|s| s.sealed.is_some())),
            Phase::Read => {
                let stuck: Vec<usize> = (0..self.memberships.len())
                    .filter(|&pg| !self.read_done[pg] && self.source[pg].is_none())
                    .collect();
                let mut s = format!(
                    "reading chains above LSN {}: {} of {} PGs read",
                    self.floor,
                    self.read_done.iter().filter(|d| **d).count(),
                    self.read_done.len()
                );
                if !stuck.is_empty() {
                    s.push_str(&format!(
                        "; PGs {stuck:?}: every sealed segment that could hold all committed records holds less than its seal said"
                    ));
                }
                s
            }
            Phase::Truncate => format!(
                "truncating above VDL {} at epoch {}: {}",
                self.vdl,
                self.epoch,
                counts(&|s| s.truncated.is_some())
            ),
            Phase::Replicate => format!("replicating up to VDL {}", self.vdl),
            Phase::Done => "done".into(),
        }
    }

    /// The result, once [`done`](Self::done).
    pub fn recovered(&self) -> Option<Recovered> {
        if self.phase != Phase::Done {
            return None;
        }
        let pgs = (0..self.memberships.len())
            .map(|pg| {
                let records = self.chains[pg]
                    .iter()
                    .filter(|r| r.lsn <= self.vdl)
                    .map(|r| {
                        Arc::new(EncodedRecord {
                            lsn: r.lsn,
                            bytes: r.encode(),
                        })
                    })
                    .collect();
                RecoveredPg {
                    tail: self.tails[pg],
                    records,
                    membership: self.memberships[pg].clone(),
                    scls: self.slots[pg].iter().map(|s| s.truncated.unwrap_or(0)).collect(),
                }
            })
            .collect();
        Some(Recovered {
            epoch: self.epoch,
            vdl: self.vdl,
            next_lsn: self.next_lsn,
            annulled: self.ranges.clone(),
            pgs,
            next_request: self.next_request,
        })
    }

    pub fn node_up(&mut self, node: u64) {
        self.up.insert(node);
        self.pick_sources();
        self.ask_all();
    }

    pub fn node_down(&mut self, node: u64) {
        self.up.remove(&node);
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, ask)| self.node_of_ask(ask) == node)
            .map(|(&id, _)| id)
            .collect();
        for id in lost {
            if let Some(ask) = self.pending.remove(&id) {
                self.forget_ask(ask);
            }
        }
        // Asked again if it comes back: it may have moved on meanwhile.
        for scouted in &mut self.scouted {
            scouted.remove(&node);
        }
        // A source that went down is replaced at once if another can serve.
        self.pick_sources();
        self.ask_all();
    }

    /// Ask again whatever is unanswered: after refusals, and requests
    /// without an answer for [`REASK_TICKS`] ticks (a node that lost one,
    /// or is stuck; every request of recovery is safe to repeat, and a late
    /// answer to the first is ignored). Call now and then.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let ticks = self.ticks;
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, ask)| ticks - ask.sent() >= REASK_TICKS)
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            if let Some(ask) = self.pending.remove(&id) {
                self.forget_ask(ask);
            }
        }
        self.advance();
        self.ask_all();
    }

    pub fn on_reply(&mut self, node: u64, request: u64, reply: Message) {
        let (pg, slot, phase) = match self.pending.remove(&request) {
            Some(Ask::Slot { pg, slot, phase, .. }) => (pg, slot, phase),
            Some(Ask::Scout { pg, node: asked, .. }) => {
                debug_assert_eq!(asked, node);
                self.on_scout_reply(pg as usize, node, reply);
                return;
            }
            None => return,
        };
        debug_assert_eq!(self.node_of(pg as usize, slot), node);
        self.slots[pg as usize][slot].asked = false;
        if phase != self.phase {
            return; // an answer to an earlier phase, no longer needed
        }
        if let Message::Error {
            code: ErrorCode::StaleEpoch,
            current_epoch,
            ..
        } = reply
            && phase != Phase::Probe
            && current_epoch > self.epoch
        {
            self.result = Some(Err(RecoveryError::Fenced { epoch: current_epoch }));
            return;
        }
        let p = pg as usize;
        // A node the membership adds counts only for what it says once it
        // holds the membership: taking it may make the node drop what it
        // held (a node rejoining the PG: `Membership::rejoins`). An answer
        // it made before (it can arrive after) counts for nothing, so what
        // it holds counts up from nothing once it says it took it.
        let mut before_taking = false;
        if let Message::SegmentStatus { membership, .. } = &reply {
            let epoch = membership.as_ref().map_or(0, |m| m.epoch);
            let s = &mut self.slots[p][slot];
            // It only rises on a node; an answer made before another
            // can come after it.
            s.membership_epoch = Some(s.membership_epoch.map_or(epoch, |e| e.max(epoch)));
            let m = &self.memberships[p];
            before_taking = m.is_added(m.members[slot].id) && epoch < m.epoch;
        }
        match (phase, reply) {
            (Phase::Probe, Message::SegmentStatus { epoch, membership, .. }) => {
                self.slots[p][slot].probed = Some(epoch);
                if let Some(m) = membership
                    && m.epoch > self.memberships[p].epoch
                {
                    self.adopt(p, m);
                }
            }
            (
                Phase::Probe,
                Message::Error {
                    code: ErrorCode::UnknownSegment,
                    ..
                },
            ) => self.slots[p][slot].probed = Some(0),
            // While chains are read, segments not sealed yet are sealed
            // too (the only SegmentStatus of that phase): the more are
            // sealed, the more can serve as a source.
            (
                Phase::Seal | Phase::Read,
                Message::SegmentStatus {
                    scl,
                    highest_lsn,
                    pgmrpl,
                    installed_epoch,
                    annulled,
                    incarnation,
                    ..
                },
            ) => {
                if phase == Phase::Read {
                    tracing::info!(node, pg, scl, "segment sealed while chains are read");
                }
                self.slots[p][slot].incarnation = Some(incarnation);
                self.slots[p][slot].sealed = Some(Sealed {
                    scl,
                    highest_lsn,
                    pgmrpl,
                    installed_epoch,
                });
                for r in annulled {
                    if !self.seen_ranges.contains(&(installed_epoch, r)) {
                        self.seen_ranges.push((installed_epoch, r));
                    }
                }
                if phase == Phase::Read {
                    self.set_source_bound(p, false);
                    self.pick_sources();
                }
            }
            (Phase::Read, Message::Records { scl, records, .. }) if self.source[p] == Some(slot) => {
                if scl < self.source_scl_min[p] {
                    // It holds less than when it was sealed (a restart that
                    // found damage, a replaced disk): it may lack a record
                    // that was committed.
                    tracing::warn!(
                        node,
                        pg,
                        scl,
                        needed = self.source_scl_min[p],
                        "recovery's source holds less than its seal said; reading another segment"
                    );
                    self.source_unfit[p] |= 1 << slot;
                    self.pick_sources();
                } else {
                    let last = records.last().map(|r| r.lsn);
                    self.chains[p].extend(records);
                    match last {
                        Some(l) if l < scl => {}
                        _ => self.read_done[p] = true,
                    }
                }
            }
            // Truncations go on during replication, to segments that had not answered.
            (Phase::Truncate | Phase::Replicate, Message::SegmentStatus { scl, incarnation, .. })
            | (Phase::Replicate, Message::AppendAck { scl, incarnation, .. }) => {
                let s = &mut self.slots[p][slot];
                if before_taking {
                    // Truncated; what it holds counts once it took the
                    // membership (above).
                    s.truncated = Some(s.truncated.unwrap_or(0));
                    s.incarnation = Some(incarnation);
                } else if s.incarnation != Some(incarnation) && s.truncated.is_some() {
                    // Restarted since its truncation: it holds what it says
                    // (its truncation is durable; only records can be lost).
                    tracing::warn!(node, pg, scl, "segment restarted during recovery");
                    s.truncated = Some(scl);
                } else {
                    s.truncated = Some(s.truncated.unwrap_or(0).max(scl));
                }
                s.incarnation = Some(incarnation);
            }
            (_, other) => {
                tracing::debug!(node, pg, ?phase, reply = ?other, "recovery request refused; asking again later");
                if phase == Phase::Read && self.source[p] == Some(slot) {
                    // Another segment that can serve is asked instead (and
                    // this one again once every one has refused).
                    self.source_refused[p] |= 1 << slot;
                    self.pick_sources();
                    self.ask_all();
                }
                return;
            }
        }
        self.advance();
        self.ask_all();
    }

    /// The node of member `slot` of PG `pg`.
    fn node_of(&self, pg: usize, slot: usize) -> u64 {
        self.memberships[pg].members[slot].id
    }

    /// Each set of PG `pg`'s membership, as member indices.
    fn sets(&self, pg: usize) -> Vec<Vec<usize>> {
        let m = &self.memberships[pg];
        membership::sets(m)
            .into_iter()
            .map(|set| {
                set.into_iter()
                    .filter_map(|id| m.members.iter().position(|x| x.id == id))
                    .collect()
            })
            .collect()
    }

    /// A probe showed a higher membership of PG `pg`: its members are the
    /// ones to hear from now (what was heard of those that stay is kept).
    fn adopt(&mut self, pg: usize, next: Membership) {
        tracing::info!(
            pg,
            epoch = next.epoch,
            changing = next.is_changing(),
            "recovery found a newer membership"
        );
        let old = std::mem::replace(&mut self.memberships[pg], next);
        let slots = std::mem::take(&mut self.slots[pg]);
        self.slots[pg] = self.memberships[pg]
            .members
            .iter()
            .map(|m| {
                old.members
                    .iter()
                    .position(|x| x.id == m.id)
                    .map_or_else(SlotState::default, |i| slots[i])
            })
            .collect();
        // Asks in flight name the old slots: asked again under the new ones
        // (and a scout still out is a probe of a member now, or of a node
        // that may be scouted again).
        self.pending.retain(|_, ask| ask.pg() as usize != pg);
        for s in &mut self.slots[pg] {
            s.asked = false;
        }
        self.scouted[pg].clear();
    }

    /// A scout's answer: a membership above the one held is adopted; any
    /// other answer (no such segment, an older membership, a refusal) says
    /// nothing the probe needs.
    fn on_scout_reply(&mut self, pg: usize, node: u64, reply: Message) {
        if self.phase != Phase::Probe {
            return;
        }
        if let Message::SegmentStatus {
            membership: Some(m), ..
        } = reply
            && m.epoch > self.memberships[pg].epoch
        {
            tracing::info!(
                node,
                pg,
                epoch = m.epoch,
                "a node outside the PG's membership knows a newer one"
            );
            self.adopt(pg, m);
            self.advance();
            self.ask_all();
        }
    }

    /// The node an ask went to.
    fn node_of_ask(&self, ask: &Ask) -> u64 {
        match *ask {
            Ask::Slot { pg, slot, .. } => self.node_of(pg as usize, slot),
            Ask::Scout { node, .. } => node,
        }
    }

    /// An ask that will not be answered (lost, or its node went down): what
    /// it asked is asked again.
    fn forget_ask(&mut self, ask: Ask) {
        match ask {
            Ask::Slot { pg, slot, .. } => self.slots[pg as usize][slot].asked = false,
            Ask::Scout { pg, node, .. } => {
                self.scouted[pg as usize].remove(&node);
            }
        }
    }

    /// At least `n` of every set of every PG's membership satisfy `f`.
    fn quorum_everywhere(&self, n: usize, f: impl Fn(&SlotState) -> bool) -> bool {
        (0..self.slots.len()).all(|pg| {
            self.sets(pg)
                .iter()
                .all(|set| set.iter().filter(|&&i| f(&self.slots[pg][i])).count() >= n)
        })
    }

    fn advance(&mut self) {
        loop {
            let sealed = self.phase == Phase::Seal
                && self.quorum_everywhere(WRITE_QUORUM, |s| s.sealed.is_some())
                && self.stragglers_done();
            let probed = self.phase == Phase::Probe
                && self.quorum_everywhere(READ_QUORUM, |s| s.probed.is_some())
                && self.scouts_done();
            let next = match self.phase {
                Phase::Probe if probed => {
                    let highest = self.slots.iter().flatten().filter_map(|s| s.probed).max().unwrap_or(0);
                    self.epoch = highest + 1;
                    Phase::Seal
                }
                // A write quorum of seals, not a read quorum: the next
                // recovery's probe (a read quorum) then meets this one's
                // seals in every PG and picks a higher epoch. Two
                // recoveries at one epoch would install different ranges
                // under the same number.
                //
                // The seals of every node up are waited for a little
                // longer: a range leaves the set only once every segment
                // is known to have applied it (`decide`).
                Phase::Seal if sealed => {
                    self.start_read();
                    Phase::Read
                }
                Phase::Read if self.read_done.iter().all(|d| *d) => {
                    self.decide();
                    Phase::Truncate
                }
                Phase::Truncate if self.quorum_everywhere(WRITE_QUORUM, |s| s.truncated.is_some()) => Phase::Replicate,
                Phase::Replicate if self.replicated() => Phase::Done,
                _ => return,
            };
            tracing::debug!(from = ?self.phase, to = ?next, "recovery phase");
            self.phase = next;
            // Requests of the earlier phase still in flight are ignored when answered.
            for s in self.slots.iter_mut().flatten() {
                s.asked = false;
            }
            self.pending.clear();
        }
    }

    fn start_read(&mut self) {
        self.floor = self
            .slots
            .iter()
            .flatten()
            .filter_map(|s| s.sealed.map(|x| x.pgmrpl))
            .max()
            .unwrap_or(0);
        for pg in 0..self.memberships.len() {
            self.set_source_bound(pg, true);
        }
        self.pick_sources_now();
    }

    /// The SCL a source of `pg` must have: a record on a write quorum (4 of
    /// 6) is on at least k - 2 of the k sealed segments, so at or below
    /// the (k - 2)-th highest sealed SCL. k is at least a write quorum once
    /// chains are read, and only grows. Each bound found is enough, so a
    /// later seal only ever lowers it (`first`: the first one).
    ///
    /// A membership being changed has two sets. Only the old set is
    /// known to hold every committed record on a write quorum: it never
    /// changes during a change, and records committed before the change
    /// were counted by it alone, so the new set may hold them on fewer
    /// than 4 while its new members catch up. Its bound could be too low
    /// (a source lacking committed records), so the old set's is taken.
    fn set_source_bound(&mut self, pg: usize, first: bool) {
        let old = self.sets(pg).swap_remove(0);
        let mut scls: Vec<u64> = old
            .iter()
            .filter_map(|&i| self.slots[pg][i].sealed.map(|x| x.scl))
            .collect();
        scls.sort_unstable_by(|a, b| b.cmp(a));
        debug_assert!(scls.len() >= WRITE_QUORUM);
        let bound = scls.get(scls.len().saturating_sub(3)).copied().unwrap_or(0);
        let m = &mut self.source_scl_min[pg];
        *m = if first { bound } else { (*m).min(bound) };
    }

    /// Per PG still to be read: keep the source if it is up, fit and has not
    /// refused, else take the sealed segment with the highest SCL among
    /// those that can serve (SCL at least `source_scl_min`, not found
    /// lacking), preferring one that is up and has not refused. The read of
    /// a PG whose source changes starts over: a chain is read from one
    /// segment. A PG whose best segment that can serve is at or below the
    /// floor needs no read: nothing of it above the floor can have been
    /// committed.
    fn pick_sources(&mut self) {
        if self.phase == Phase::Read {
            self.pick_sources_now();
        }
    }

    fn pick_sources_now(&mut self) {
        for pg in 0..self.memberships.len() {
            if self.read_done[pg] {
                continue;
            }
            let up = |i: usize| self.up.contains(&self.node_of(pg, i));
            let refused = |i: usize| self.source_refused[pg] & (1 << i) != 0;
            // (One sealed late may have coalesced above the floor: what it
            // holds there cannot be read.)
            let fit = |i: usize| {
                self.source_unfit[pg] & (1 << i) == 0
                    && self.slots[pg][i]
                        .sealed
                        .is_some_and(|s| s.scl >= self.source_scl_min[pg] && s.pgmrpl <= self.floor)
            };
            if let Some(i) = self.source[pg]
                && fit(i)
                && up(i)
                && !refused(i)
            {
                continue;
            }
            let rank = |i: usize| {
                let scl = self.slots[pg][i].sealed.map_or(0, |s| s.scl);
                (up(i), !refused(i), scl, Reverse(i))
            };
            let Some(best) = (0..self.slots[pg].len()).filter(|&i| fit(i)).max_by_key(|&i| rank(i)) else {
                // Every segment that could serve lost records since its
                // seal: nothing safe to read. `progress` says so.
                self.source[pg] = None;
                continue;
            };
            if self.slots[pg][best].sealed.is_none_or(|s| s.scl <= self.floor) {
                self.read_done[pg] = true;
                self.source[pg] = None;
                continue;
            }
            if refused(best) {
                // Every one that can serve has refused once: all again.
                self.source_refused[pg] = 0;
            }
            if self.source[pg] == Some(best) {
                continue;
            }
            if let Some(old) = self.source[pg] {
                tracing::info!(
                    pg,
                    from = self.node_of(pg, old),
                    to = self.node_of(pg, best),
                    "recovery reads the chain from another segment"
                );
                // An answer still to come from the old source is not part
                // of the new read.
                self.pending.retain(|_, ask| {
                    !matches!(*ask, Ask::Slot { pg: p, slot, phase, .. }
                        if p as usize == pg && slot == old && phase == Phase::Read)
                });
                self.slots[pg][old].asked = false;
            }
            self.source[pg] = Some(best);
            self.chains[pg].clear();
        }
    }

    /// Find the VCL and VDL from the chains read, and the truncation range.
    fn decide(&mut self) {
        // No answer has seen a writer or a record: nothing can need annulling.
        let fresh = self
            .slots
            .iter()
            .flatten()
            .all(|s| s.probed.is_none_or(|e| e == 0) && s.sealed.is_none_or(|x| x.highest_lsn == 0 && x.scl == 0));
        // The ranges in force are those of the newest recovery any answer
        // shows installed: each recovery's set carries forward what it kept
        // of the earlier ones, and a completed one's is on a write quorum,
        // which this one's write quorum of seals meets. An older set (a
        // recovery that died before its quorum, seen on a segment that
        // missed the later ones) may name LSNs a later recovery kept: it is
        // not used.
        let installed = self
            .slots
            .iter()
            .flatten()
            .filter_map(|s| s.sealed.map(|x| x.installed_epoch))
            .max()
            .unwrap_or(0);
        let mut ranges = union_ranges(
            self.seen_ranges
                .iter()
                .filter(|(e, _)| *e == installed)
                .map(|&(_, r)| r),
        );
        // Where each chain read starts: the record below its first one.
        let starts: Vec<Option<u64>> = self.chains.iter().map(|c| c.first().map(|r| r.prev_lsn_pg)).collect();
        for chain in &mut self.chains {
            chain.retain(|r| !in_ranges(&ranges, r.lsn));
        }
        let present: HashMap<u64, bool> = self.chains.iter().flatten().map(|r| (r.lsn, r.cpl)).collect();
        let mut vdl = self.floor;
        let mut lsn = self.floor + 1;
        loop {
            if let Some(&cpl) = present.get(&lsn) {
                if cpl {
                    vdl = lsn;
                }
                lsn += 1;
            } else if let Some(&(_, hi)) = ranges.iter().find(|&&(lo, hi)| lo <= lsn && lsn <= hi) {
                lsn = hi + 1;
            } else {
                break;
            }
        }
        self.vdl = vdl;
        for (pg, chain) in self.chains.iter().enumerate() {
            self.tails[pg] = match (chain.iter().rfind(|r| r.lsn <= vdl), starts[pg]) {
                (Some(r), _) => r.lsn,
                (None, Some(prev)) => prev,
                // Nothing read above the floor: every segment that could
                // serve is at or below it (one above it, gone or found
                // lacking, holds nothing that was committed above the VDL).
                (None, None) => (0..self.slots[pg].len())
                    .filter_map(|i| self.slots[pg][i].sealed.map(|s| s.scl))
                    .filter(|&scl| scl <= vdl)
                    .max()
                    .unwrap_or(0),
            };
        }
        if fresh {
            self.ranges = Vec::new();
            self.next_lsn = vdl + 1;
        } else {
            // A writer allocates at most LAL above its VDL, or above the top
            // of the range its own recovery left (its LSNs start there).
            let base = ranges.iter().map(|r| r.1).max().unwrap_or(0).max(vdl);
            let hi = base + LAL_MAX;
            ranges.push((vdl + 1, hi));
            // A range may be dropped once no later recovery can need it: it
            // ends at or below a PGMRPL that 3 segments of some PG hold (a
            // later recovery's write quorum of seals meets one of them, so
            // its floor is at least that high and it never reads below),
            // and every segment of every PG has applied it (sealed here at
            // the epoch whose set holds it: a truncation annuls the whole
            // set). A segment down all along may still hold its records, and
            // gets it with the set when it returns.
            let trim = self.safe_floor();
            let everywhere = self
                .slots
                .iter()
                .flatten()
                .all(|s| s.sealed.is_some_and(|x| x.installed_epoch == installed));
            ranges.retain(|&(_, hi)| hi > trim || !everywhere);
            let mut ranges = union_ranges(ranges.into_iter());
            // Past the limit, the lowest go: several recoveries with writes
            // between them while a segment stays down, or writers dying
            // before a PGMRPL is sent. Said loudly, since a later recovery
            // reading below them would stop at them.
            let keep = ranges.len().saturating_sub(ANNULLED_RANGES_MAX);
            if keep > 0 {
                tracing::warn!(dropped = ?&ranges[..keep], "more truncation ranges still needed than a segment keeps; the lowest are dropped");
            }
            self.ranges = ranges.split_off(keep);
            self.next_lsn = hi + 1;
        }
        tracing::info!(
            floor = self.floor,
            vdl,
            epoch = self.epoch,
            ranges = ?self.ranges,
            "recovery decided the VDL"
        );
    }

    /// Every node up asked outside a PG's membership has answered, or
    /// [`STRAGGLER_TICKS`] have passed since a read quorum of every set of
    /// every PG's membership had: a node the PG moved to is heard before
    /// the membership is settled, unless it is stuck.
    fn scouts_done(&mut self) -> bool {
        let out = self.pending.values().any(|a| matches!(a, Ask::Scout { .. }));
        let since = *self.probe_quorum_at.get_or_insert(self.ticks);
        !out || self.ticks - since >= STRAGGLER_TICKS
    }

    /// Every segment of a node up has answered its seal, or
    /// [`STRAGGLER_TICKS`] have passed since a write quorum of every PG had.
    fn stragglers_done(&mut self) -> bool {
        let all = self.memberships.iter().zip(&self.slots).all(|(m, slots)| {
            m.members
                .iter()
                .zip(slots)
                .all(|(node, s)| s.sealed.is_some() || !self.up.contains(&node.id))
        });
        let since = *self.seal_quorum_at.get_or_insert(self.ticks);
        all || self.ticks - since >= STRAGGLER_TICKS
    }

    /// The highest PGMRPL that 3 sealed segments of every set of some PG
    /// hold at least.
    fn safe_floor(&self) -> u64 {
        (0..self.slots.len())
            .map(|pg| {
                self.sets(pg)
                    .iter()
                    .map(|set| {
                        let mut held: Vec<u64> = set
                            .iter()
                            .filter_map(|&i| self.slots[pg][i].sealed.map(|x| x.pgmrpl))
                            .collect();
                        held.sort_unstable_by(|a, b| b.cmp(a));
                        held.get(READ_QUORUM - 1).copied().unwrap_or(0)
                    })
                    .min()
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    fn replicated(&self) -> bool {
        (0..self.slots.len()).all(|pg| {
            let tail = self.tails[pg];
            self.sets(pg).iter().all(|set| {
                set.iter()
                    .filter(|&&i| self.slots[pg][i].truncated.is_some_and(|scl| scl >= tail))
                    .count()
                    >= WRITE_QUORUM
            })
        })
    }

    fn ask_all(&mut self) {
        if self.result.is_some() || self.phase == Phase::Done {
            return;
        }
        for pg in 0..self.memberships.len() {
            for slot in 0..self.slots[pg].len() {
                let node = self.node_of(pg, slot);
                if self.slots[pg][slot].asked || !self.up.contains(&node) {
                    continue;
                }
                if let Some(msg) = self.request_for(pg, slot) {
                    self.slots[pg][slot].asked = true;
                    if matches!(msg, Message::GetSegmentStatus { .. } | Message::SetMembership { .. }) {
                        self.slots[pg][slot].status_at = Some(self.ticks);
                    }
                    let ask = Ask::Slot {
                        pg: pg as u32,
                        slot,
                        phase: self.phase,
                        sent: self.ticks,
                    };
                    self.send(node, ask, msg);
                }
            }
        }
        if self.phase == Phase::Probe {
            self.scout();
        }
    }

    /// Probe every node up that is not a member of a PG's membership and
    /// was not asked yet (see the module documentation).
    fn scout(&mut self) {
        for pg in 0..self.memberships.len() {
            let members = &self.memberships[pg].members;
            let new: Vec<u64> = (self.up.iter())
                .filter(|&&n| !members.iter().any(|m| m.id == n) && !self.scouted[pg].contains(&n))
                .copied()
                .collect();
            for node in new {
                self.scouted[pg].insert(node);
                let ask = Ask::Scout {
                    pg: pg as u32,
                    node,
                    sent: self.ticks,
                };
                let msg = Message::GetSegmentStatus {
                    volume: self.volume,
                    epoch: 0,
                    pg: pg as u32,
                };
                self.send(node, ask, msg);
            }
        }
    }

    /// Sends `msg` to `node` under a new request id, remembered as `ask`.
    fn send(&mut self, node: u64, ask: Ask, msg: Message) {
        let request = self.next_request;
        self.next_request += 1;
        self.pending.insert(request, ask);
        self.outputs.push((node, request, msg));
    }

    /// What slot `slot` of `pg` is to be asked in this phase, if anything.
    fn request_for(&self, pg: usize, slot: usize) -> Option<Message> {
        let s = &self.slots[pg][slot];
        let (volume, pg_no) = (self.volume, pg as u32);
        match self.phase {
            Phase::Probe if s.probed.is_none() => Some(Message::GetSegmentStatus {
                volume,
                epoch: 0,
                pg: pg_no,
            }),
            Phase::Seal | Phase::Read if s.sealed.is_none() => Some(Message::Seal {
                volume,
                epoch: self.epoch,
                pg: pg_no,
                page_bytes: self.page_bytes,
                pg_pages: self.pg_pages,
            }),
            Phase::Read if self.source[pg] == Some(slot) && !self.read_done[pg] => Some(Message::ReadRecords {
                volume,
                epoch: self.epoch,
                pg: pg_no,
                after: self.chains[pg].last().map_or(self.floor, |r| r.lsn),
                max_bytes: CHUNK_BYTES as u32,
            }),
            Phase::Truncate if s.truncated.is_none() => Some(Message::Truncate {
                volume,
                epoch: self.epoch,
                pg: pg_no,
                ranges: self.ranges.clone(),
            }),
            Phase::Replicate => {
                let Some(scl) = s.truncated else {
                    // Down during the truncation, or answered after its
                    // quorum: the write quorum that ends recovery may need
                    // it (those that answered first may be behind the floor).
                    return Some(Message::Truncate {
                        volume,
                        epoch: self.epoch,
                        pg: pg_no,
                        ranges: self.ranges.clone(),
                    });
                };
                let tail = self.tails[pg];
                if scl >= tail {
                    return None;
                }
                let mut bytes = 0;
                let records: Vec<WireRecord> = self.chains[pg]
                    .iter()
                    .filter(|r| r.lsn > scl && r.lsn <= tail)
                    .take_while(|r| {
                        bytes += r.encoded_len();
                        bytes <= CHUNK_BYTES
                    })
                    .map(|r| WireRecord::new(r.clone()))
                    .collect();
                // A segment holding an older membership is told it first:
                // gossip runs only between segments that hold the same one,
                // and a segment takes appends at a later one only once
                // told (a telling may make a node rejoining the PG drop
                // what it holds, acknowledged or not). The writer that
                // would tell it waits for this recovery.
                let due = s.status_at.is_none_or(|at| self.ticks >= at + REASK_TICKS);
                let membership = &self.memberships[pg];
                if s.membership_epoch.is_some_and(|e| e < membership.epoch) {
                    return due.then(|| Message::SetMembership {
                        volume,
                        epoch: self.epoch,
                        pg: pg_no,
                        page_bytes: self.page_bytes,
                        pg_pages: self.pg_pages,
                        membership: membership.clone(),
                        annulled: self.ranges.clone(),
                    });
                }
                if records.first().is_none_or(|r| r.record().prev_lsn_pg > scl) {
                    // Behind the floor: what it lacks is only in page versions
                    // elsewhere (storage-side repair); the quorum does without
                    // it, unless it has to wait for it. Gossip repair raises
                    // its SCL with no answer to recovery: asked now and then.
                    return due.then_some(Message::GetSegmentStatus {
                        volume,
                        epoch: self.epoch,
                        pg: pg_no,
                    });
                }
                Some(Message::Append {
                    volume,
                    epoch: self.epoch,
                    pg: pg_no,
                    page_bytes: self.page_bytes,
                    pg_pages: self.pg_pages,
                    // Not checked: told above if it held an older one,
                    // and one holding a later step (never in force) takes
                    // this recovery's records all the same.
                    membership_epoch: 0,
                    records,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
