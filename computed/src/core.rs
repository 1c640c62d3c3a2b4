//! The writer core: everything computed decides, free of I/O
//! (docs/architecture.md: the write path, and state machines free of I/O).
//! It takes inputs — a transaction, a read, a reply from a segment, a
//! connection going up or down, a tick — and produces
//! [`Output`]s: batches to send, pages to ask for, commits and reads to
//! answer. The tokio shell (`server`) and the deterministic simulator
//! (`tests/sim.rs`) both drive it.
//!
//! Write path. A transaction (an MTR) gets contiguous LSNs, one per page
//! write; the last is its CPL. No LSN is allocated above VDL + LAL: a
//! transaction that does not fit waits in a bounded queue (the caller stops
//! taking more when [`Writer::accepting`] is false). Its records are held
//! per PG and sent to the PG's 6 segments by the boxcar in [`Writer::flush`]:
//! every segment with room in its in-flight window gets what it has not been
//! sent yet, so records queued while a window is full ride along in the next
//! batch. There is no timer on this path.
//!
//! Acks carry SCLs; the PGCL is the 4th highest of a PG's 6, the VCL the
//! point below which every record is at its PG's quorum, the VDL the highest
//! CPL at or below the VCL. The commit queue acknowledges every transaction
//! the VDL covers in one pass.
//!
//! A segment's SCL is the highest it reported within the node's current
//! incarnation (replies carry it; late or reordered acks never lower it),
//! and exactly what it reported when a reply on the current connection
//! shows a new one: a node that restarted may hold less than it
//! acknowledged (damage found at open, a replaced disk), and is counted for
//! what it holds, and sent what it lacks. A node that comes back is asked
//! each segment's status at once, so an idle PG learns this too.
//!
//! Re-sends. A segment whose connection drops, whose batch is refused, or
//! which answers everything sent and still reports an SCL below what it was
//! sent, is sent again from its SCL. Records are held until all 6 segments
//! have them, or — past `pg_held_bytes_max` — until 4 have (a segment left
//! below the oldest held record needs storage-side repair).
//!
//! Reads: see [`Writer::read`].
//!
//! Membership. Each segment is told its PG's membership (`SetMembership`:
//! the six nodes and their addresses, which gossip repair trusts and pulls
//! from) once per connection, first thing when its node comes up — so
//! before the first append ever reaches it, and at the writer's start
//! (after recovery) for every node up then — and again when a reply shows
//! the node under a new incarnation (restarted, or reformatted: telling
//! creates a segment the node no longer holds). Nothing on the commit path
//! waits for it, and a refusal is logged, never fatal: the segment is told
//! again at the next of those, after `retry_after_us` if the refusal was
//! transient, or once it installs the epoch if that was the reason.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use storaged::membership::Membership;
use storaged::proto::{ErrorCode, Message};
use storaged::record::{RecordBody, RedoRecord, SegmentId};

use crate::cache::PageCache;
use crate::cluster::{Cluster, SEGMENTS_PER_PG};
use crate::membership::{self, Change, ChangeError, MEMBERS_MAX, Member, MemberView, PgView};

/// A PG's PGMRPL is sent to its segments when it has moved this many
/// LSNs, or when it moved at all and was last sent this long ago.
const PGMRPL_STEP_LSNS: u64 = 1024;
const PGMRPL_INTERVAL_US: u64 = 100_000;
use crate::commit_queue::CommitQueue;
use crate::quorum;

/// Limits and identity of the writer. Memory is bounded by these.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub volume: u64,
    pub epoch: u64,
    pub page_bytes: usize,
    pub pg_pages: u64,
    /// For each PG, the membership the writer starts at: the cluster
    /// file's placement (`Cluster::membership`), or the one recovery found
    /// in force (`Writer::recovered`). Changes move it on (`change_membership`).
    pub memberships: Vec<Membership>,
    /// LSN allocation limit: no LSN above VDL + `lal`.
    pub lal: u64,
    /// Page writes in one transaction, at most (must not exceed `lal`).
    pub txn_writes_max: usize,
    /// Transactions waiting for the LAL, at most; beyond, `submit` says Busy.
    pub waiting_txns_max: usize,
    /// Bytes of records in one batch, at most (one record always fits).
    pub batch_bytes_max: usize,
    /// Batches in flight to one segment, at most.
    pub segment_batches_inflight_max: usize,
    /// Record bytes in flight to one segment, at most.
    pub segment_inflight_bytes_max: usize,
    /// Record bytes a PG holds for re-sends before it lets go of records that
    /// 4 segments have (the rest are repaired by storage).
    pub pg_held_bytes_max: usize,
    /// Pages cached, at most (plus those with changes above the VDL).
    pub page_cache_pages_max: usize,
    /// Reads in flight, at most; beyond, `read` says Busy.
    pub reads_inflight_max: usize,
    /// A read unanswered this long is also asked of a second segment.
    pub read_hedge_after_us: u64,
    /// A batch unanswered this long is sent again (None: rely on the
    /// connection, which reports a loss by going down).
    pub resend_after_us: Option<u64>,
    /// After a refused batch, wait this long before sending to that segment again.
    pub retry_after_us: u64,
    /// A segment whose known SCL is behind (below its PG's highest, or
    /// below what it was sent) with nothing in flight to it is asked its
    /// status at most this often: gossip repair raises its SCL without a
    /// reply from it.
    pub status_ask_us: u64,
    /// Truncation ranges of this epoch (from recovery): a segment that
    /// missed them answers `EpochNotInstalled` and is sent them first.
    pub annulled: Vec<(u64, u64)>,
}

impl WriterConfig {
    pub fn from_cluster(cluster: &Cluster, epoch: u64) -> WriterConfig {
        const PG_HELD_BYTES_DEFAULT: usize = 64 * 1024 * 1024;
        WriterConfig {
            volume: cluster.volume_id,
            epoch,
            page_bytes: cluster.page_bytes as usize,
            pg_pages: cluster.pg_pages,
            memberships: (0..cluster.pgs)
                .map(|pg| {
                    cluster
                        .membership(pg)
                        .expect("the cluster file lists every node it places")
                })
                .collect(),
            lal: 10_000,
            txn_writes_max: 256,
            waiting_txns_max: 4096,
            batch_bytes_max: 1024 * 1024,
            segment_batches_inflight_max: 32,
            segment_inflight_bytes_max: 16 * 1024 * 1024,
            pg_held_bytes_max: cluster
                .pg_held_bytes_max
                .map_or(PG_HELD_BYTES_DEFAULT, |b| usize::try_from(b).unwrap_or(usize::MAX)),
            page_cache_pages_max: 16 * 1024,
            reads_inflight_max: 4096,
            read_hedge_after_us: 50_000,
            resend_after_us: None,
            retry_after_us: 100_000,
            status_ask_us: 1_000_000,
            annulled: Vec::new(),
        }
    }

    pub fn pages(&self) -> u64 {
        self.pg_pages * self.memberships.len() as u64
    }
}

/// One change of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageWrite {
    /// The whole page (exactly `page_bytes` long).
    Image { page: u64, bytes: Vec<u8> },
    /// `bytes` replace the page's bytes at `offset`.
    Range { page: u64, offset: u32, bytes: Vec<u8> },
}

impl PageWrite {
    pub fn page(&self) -> u64 {
        match self {
            PageWrite::Image { page, .. } | PageWrite::Range { page, .. } => *page,
        }
    }

    fn into_body(self) -> RecordBody {
        match self {
            PageWrite::Image { bytes, .. } => RecordBody::PageImage(bytes),
            PageWrite::Range { offset, bytes, .. } => RecordBody::PageDelta { offset, bytes },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    #[error("a transaction needs at least one page write")]
    Empty,
    #[error("{writes} page writes in one transaction; at most {max}")]
    TooManyWrites { writes: usize, max: usize },
    #[error("page {page} is outside the volume (pages 0..{pages})")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("page {page}: {why}")]
    BadWrite { page: u64, why: String },
    #[error("too many transactions are waiting; try again")]
    Busy,
    #[error("another writer took the volume (epoch {epoch}); this one no longer writes")]
    Fenced { epoch: u64 },
}

/// A page as a read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRead {
    /// The read point: the VDL when the read started.
    pub read_point: u64,
    /// LSN of the last change to the page at or below the read point (0: never written).
    pub lsn: u64,
    pub bytes: Vec<u8>,
}

/// A record as it goes on the wire, encoded once and shared by the six sends.
#[derive(Debug, PartialEq, Eq)]
pub struct EncodedRecord {
    pub lsn: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug)]
pub enum Output<T> {
    /// Send `records` (increasing LSNs, one PG) to `node` as an `Append` with
    /// request id `request`; feed its reply to [`Writer::on_reply`].
    Append {
        node: u64,
        request: u64,
        pg: u32,
        epoch: u64,
        /// The PG's membership epoch the segments are told (see
        /// `Message::Append::membership_epoch`).
        membership_epoch: u64,
        records: Vec<Arc<EncodedRecord>>,
    },
    /// Send `message` (GetPage or SetPgmrpl) to `node` with request id `request`.
    Request {
        node: u64,
        request: u64,
        message: Message,
    },
    /// The transaction is durable: VDL >= `lsn`, its CPL.
    Committed {
        token: T,
        lsn: u64,
    },
    ReadDone {
        token: T,
        page: PageRead,
    },
    /// A segment reported a newer epoch: another writer owns the volume.
    /// Nothing more is sent; waiting transactions are never acknowledged.
    Fenced {
        epoch: u64,
    },
    /// A membership change made `node` (at `addr`) a member: keep a
    /// connection to it, and report it up (`node_up`) once it is.
    Connect {
        node: u64,
        addr: std::net::SocketAddr,
    },
}

/// Where telling a segment its PG's membership stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// Not on the current connection (or not answered before it was lost).
    No,
    /// `SetMembership` sent, unanswered.
    Asked,
    /// The node answered: the segment holds the membership.
    Yes,
    /// Refused: told again at the node's next up or new incarnation, or
    /// (a transient refusal) after `retry_after_us`.
    Refused,
    /// Refused with `EpochNotInstalled`: told again once the segment
    /// installs this writer's epoch (its truncation is sent meanwhile).
    AfterInstall,
}

/// One member's segment of a PG. A slot whose `node` is 0 is free: its
/// member left (slots are reused, so requests in flight name a slot).
#[derive(Debug)]
struct Slot {
    node: u64,
    addr: SocketAddr,
    up: bool,
    /// Highest membership epoch the segment said it holds.
    held_epoch: u64,
    told: Told,
    /// Why its node last refused to take the PG's membership (a full page
    /// store, say), until it takes it: what an operator moving a segment
    /// onto the node is shown.
    refused: Option<String>,
    /// The epoch of the last membership that added the node to the PG (0:
    /// a member from the start). Taking that membership may make the node
    /// drop what it held (a node rejoining the PG), so only what it
    /// reports having taken it counts (`on_report`): a report made before
    /// can arrive after.
    joined_epoch: u64,
    scl: u64,
    /// The node's incarnation `scl` was reported under (None: not heard
    /// from since this writer started).
    incarnation: Option<u64>,
    /// Highest LSN sent on the current connection; the next batch starts above it.
    sent_through: u64,
    inflight_batches: usize,
    inflight_bytes: usize,
    /// No sends before this time (after a refusal).
    paused_until_us: u64,
    /// A status ask is unanswered on the current connection.
    status_asked: bool,
    /// When its status was last asked (asks of a segment behind are spaced).
    status_asked_us: u64,
    /// Recent reply latency (exponential average), to pick whom to read from.
    latency_us: u64,
}

#[derive(Debug)]
struct Pg {
    /// The members of `membership` and `proposed`, at most
    /// [`MEMBERS_MAX`] (read masks are a `u8`).
    slots: Vec<Slot>,
    /// The membership in force (see [`crate::membership`]).
    membership: Membership,
    /// The next step, sent and not yet in force: writes count by both.
    proposed: Option<Membership>,
    /// Highest membership epoch a segment refused ours for: a step is
    /// proposed above it.
    epoch_seen: u64,
    /// Records not yet on all 6 segments (and not let go), in LSN order.
    held: VecDeque<Arc<EncodedRecord>>,
    held_bytes: usize,
    /// Highest LSN let go of: a segment below it cannot be caught up from here.
    released_through: u64,
    /// LSN of this PG's last record (its chain tail), for `prev_lsn_pg`.
    last_lsn: u64,
    pgcl: u64,
    /// This PG's record LSNs above the VDL, in order.
    above_vdl: VecDeque<u64>,
    /// This PG's last record at or below the VDL: where a read at the VDL
    /// asks its segments to read (a segment's SCL only moves with its PG's records).
    durable_tail: u64,
    pgmrpl_sent: u64,
    pgmrpl_sent_us: u64,
    dirty: bool,
}

#[derive(Debug)]
enum Pending {
    Append {
        pg: u32,
        slot: usize,
        bytes: usize,
        sent_us: u64,
        /// The membership epoch it named: a segment that takes it holds
        /// that membership, or the one just before as a member.
        membership_epoch: u64,
    },
    Read {
        read: u64,
        pg: u32,
        slot: usize,
        sent_us: u64,
    },
    Pgmrpl {
        node: u64,
    },
    /// The epoch's truncation, sent to a segment that had not installed it.
    Truncate {
        pg: u32,
        slot: usize,
    },
    /// Where a segment stands, asked when its node comes back.
    Status {
        pg: u32,
        slot: usize,
    },
    /// The PG's membership, told to a segment.
    Membership {
        pg: u32,
        slot: usize,
    },
}

#[derive(Debug)]
struct ReadState<T> {
    token: T,
    page: u64,
    pg: u32,
    read_point: u64,
    pg_point: u64,
    /// Slots asked since the read last started over, and slots with an
    /// ask still unanswered (bitmasks). Every way an ask ends (an answer, a
    /// refusal, its connection lost) clears its bit in `asked`: a read with
    /// nothing asked is asked again, so it never waits on nobody.
    tried: u8,
    asked: u8,
    started_us: u64,
}

/// The writer. `T` identifies a transaction or read to the caller.
#[derive(Debug)]
pub struct Writer<T> {
    config: WriterConfig,
    pgs: Vec<Pg>,
    next_lsn: u64,
    commits: CommitQueue<T>,
    waiting: VecDeque<(T, Vec<PageWrite>)>,
    /// Last LSN that changed each page written since start (bounded by the volume's page count).
    page_last_lsn: HashMap<u64, u64>,
    cache: PageCache,
    pending: HashMap<u64, Pending>,
    reads: HashMap<u64, ReadState<T>>,
    next_request: u64,
    next_read: u64,
    now_us: u64,
    fenced: Option<u64>,
    outputs: Vec<Output<T>>,
    /// The LAL counts from the VDL or from this, whichever is higher: the
    /// top of the truncation range recovery left below the first new LSN.
    lal_floor: u64,
    /// Segments to tell their membership again at a time (a transient
    /// refusal): (time, PG, slot), at most one per slot.
    retell: Vec<(u64, u32, usize)>,
    /// Nodes whose refusal of a membership was logged at WARN since their
    /// connection came up: a node that cannot take it refuses every PG.
    refusal_warned: HashSet<u64>,
    /// Nodes whose connection is up: a slot a change gives one of them is
    /// up at once.
    nodes_up: HashSet<u64>,
}

impl Slot {
    /// A report made while the segment held membership epoch `taken`
    /// (None: not known) is from before the node took the membership that
    /// added it (`joined_epoch`), and counts for nothing.
    fn before_taking(&self, taken: Option<u64>) -> bool {
        self.joined_epoch > 0 && taken.is_none_or(|e| e < self.joined_epoch)
    }

    /// The node has not said it holds the membership that added it.
    fn not_taken_yet(&self) -> bool {
        self.before_taking(Some(self.held_epoch))
    }

    fn new(member: &Member) -> Slot {
        Slot {
            node: member.id,
            addr: member.addr,
            up: false,
            held_epoch: 0,
            told: Told::No,
            refused: None,
            joined_epoch: 0,
            scl: 0,
            incarnation: None,
            sent_through: 0,
            inflight_batches: 0,
            inflight_bytes: 0,
            paused_until_us: 0,
            status_asked: false,
            status_asked_us: 0,
            latency_us: 0,
        }
    }
}

impl Pg {
    /// The membership segments are told: the step under way, else the one in force.
    fn target(&self) -> &Membership {
        self.proposed.as_ref().unwrap_or(&self.membership)
    }

    fn slot_of(&self, node: u64) -> Option<usize> {
        (node != 0)
            .then(|| self.slots.iter().position(|s| s.node == node))
            .flatten()
    }

    fn scl_of(&self, node: u64) -> u64 {
        self.slot_of(node).map_or(0, |i| self.slots[i].scl)
    }
}

impl<T> Writer<T> {
    /// A writer for a volume whose VDL is `vdl` (0 for a new volume); LSNs
    /// continue above it. Every connection starts down.
    pub fn new(config: WriterConfig, vdl: u64) -> Writer<T> {
        assert!(
            config.txn_writes_max as u64 <= config.lal,
            "a transaction must fit the LAL"
        );
        assert!(
            config.lal <= crate::recovery::LAL_MAX,
            "recovery's truncation range covers at most LAL_MAX above the VDL"
        );
        assert!(config.segment_batches_inflight_max > 0 && config.batch_bytes_max > 0);
        let pgs = config
            .memberships
            .iter()
            .map(|m| Pg {
                slots: m
                    .members
                    .iter()
                    .map(|member| Slot {
                        joined_epoch: if m.is_added(member.id) { m.epoch } else { 0 },
                        ..Slot::new(member)
                    })
                    .collect(),
                membership: m.clone(),
                proposed: None,
                epoch_seen: m.epoch,
                held: VecDeque::new(),
                held_bytes: 0,
                released_through: 0,
                last_lsn: 0,
                pgcl: 0,
                above_vdl: VecDeque::new(),
                durable_tail: 0,
                pgmrpl_sent: 0,
                pgmrpl_sent_us: 0,
                dirty: false,
            })
            .collect();
        Writer {
            cache: PageCache::new(config.page_cache_pages_max),
            config,
            pgs,
            next_lsn: vdl + 1,
            commits: CommitQueue::new(vdl),
            waiting: VecDeque::new(),
            page_last_lsn: HashMap::new(),
            pending: HashMap::new(),
            reads: HashMap::new(),
            next_request: 1,
            next_read: 1,
            now_us: 0,
            fenced: None,
            outputs: Vec::new(),
            lal_floor: 0,
            retell: Vec::new(),
            refusal_warned: HashSet::new(),
            nodes_up: HashSet::new(),
        }
    }

    /// A writer for a volume recovery brought back (`recovery`): LSNs go
    /// on above the truncation range, each PG's chain from its tail, the
    /// recovered records are held for the segments still behind, and
    /// request ids go on above recovery's (see `Recovered::next_request`).
    pub fn recovered(mut config: WriterConfig, r: &crate::recovery::Recovered) -> Writer<T> {
        config.epoch = r.epoch;
        config.annulled = r.annulled.clone();
        // The membership a quorum holds, which may differ from the cluster
        // file's (a change made, or left half-way).
        for (m, rp) in config.memberships.iter_mut().zip(&r.pgs) {
            *m = rp.membership.clone();
        }
        let mut w = Writer::new(config, r.vdl);
        w.next_request = r.next_request.max(1);
        w.next_lsn = r.next_lsn.max(r.vdl + 1);
        w.lal_floor = w.next_lsn - 1;
        for (pg, rp) in w.pgs.iter_mut().zip(&r.pgs) {
            pg.last_lsn = rp.tail;
            pg.durable_tail = rp.tail;
            for (slot, &scl) in pg.slots.iter_mut().zip(&rp.scls) {
                slot.scl = scl;
                slot.sent_through = scl;
            }
            pg.pgcl = membership::pgcl([&pg.membership], |id| pg.scl_of(id)).max(rp.tail.min(r.vdl));
            let low = rp.scls.iter().copied().min().unwrap_or(0);
            for rec in rp.records.iter().filter(|x| x.lsn > low) {
                pg.held_bytes += rec.bytes.len();
                pg.held.push_back(rec.clone());
            }
            // Below the held records, nothing can be re-sent from here.
            pg.released_through = pg.held.front().map_or(rp.tail, |x| x.lsn - 1);
        }
        w
    }

    pub fn config(&self) -> &WriterConfig {
        &self.config
    }

    pub fn vdl(&self) -> u64 {
        self.commits.vdl()
    }

    /// Highest LSN allocated so far.
    pub fn allocated_through(&self) -> u64 {
        self.next_lsn - 1
    }

    pub fn vcl(&self) -> u64 {
        quorum::vcl(
            self.pgs.iter().map(|pg| {
                // Records at or below the VDL were at quorum when it passed
                // them; a segment that lost one since needs repair, and
                // does not hold back the records above.
                let at_quorum = pg.pgcl.max(self.commits.vdl());
                // Every record above the VDL counts, held or not: one let
                // go of at the quorum of the membership of its time may not
                // be at the quorum of a step proposed since.
                let i = pg.above_vdl.partition_point(|&lsn| lsn <= at_quorum);
                pg.above_vdl.get(i).copied()
            }),
            self.allocated_through(),
        )
    }

    pub fn pgcl(&self, pg: u32) -> u64 {
        self.pgs[pg as usize].pgcl
    }

    /// Highest LSN of PG `pg` the writer let go of: a segment whose SCL is
    /// below it cannot be caught up from here (it needs storage-side repair).
    pub fn released_through(&self, pg: u32) -> u64 {
        self.pgs[pg as usize].released_through
    }

    /// The SCL each of the PG's segments last reported, in slot order
    /// (the membership's order until a change; a free slot counts 0).
    pub fn scls(&self, pg: u32) -> Vec<u64> {
        self.pgs[pg as usize].slots.iter().map(|s| s.scl).collect()
    }

    pub fn held_bytes(&self) -> usize {
        self.pgs.iter().map(|p| p.held_bytes).sum()
    }

    pub fn waiting_txns(&self) -> usize {
        self.waiting.len()
    }

    pub fn uncommitted_txns(&self) -> usize {
        self.commits.len()
    }

    pub fn reads_inflight(&self) -> usize {
        self.reads.len()
    }

    pub fn cache_hits_misses(&self) -> (u64, u64) {
        (self.cache.hits, self.cache.misses)
    }

    pub fn fenced(&self) -> Option<u64> {
        self.fenced
    }

    /// Where PG `pg`'s membership stands (`None` past the volume's end).
    pub fn pg_view(&self, pg: u32) -> Option<PgView> {
        let p = self.pgs.get(pg as usize)?;
        let members = p
            .slots
            .iter()
            .filter(|s| s.node != 0)
            .map(|s| MemberView {
                id: s.node,
                addr: s.addr,
                up: s.up,
                scl: s.scl,
                told_epoch: s.held_epoch,
                refused: s.refused.clone(),
            })
            .collect();
        Some(PgView {
            pg,
            membership: p.membership.clone(),
            proposed: p.proposed.clone(),
            pgcl: p.pgcl,
            members,
        })
    }

    /// Start `change` of PG `pg`'s membership (see [`crate::membership`]):
    /// its first step is proposed now; the writer takes the next ones by
    /// itself (the final set once every new member has caught up).
    /// Returns where the PG stands.
    pub fn change_membership(&mut self, pg: u32, change: Change) -> Result<PgView, ChangeError> {
        if let Some(epoch) = self.fenced {
            return Err(ChangeError::Fenced(epoch));
        }
        let p = self.pgs.get(pg as usize).ok_or(ChangeError::NoSuchPg(pg))?;
        if let Some(m) = &p.proposed {
            return Err(ChangeError::Installing { pg, epoch: m.epoch });
        }
        let mut next = membership::plan(pg, &p.membership, &change)?;
        // Both memberships' members need a slot while the step is proposed.
        let union = p
            .membership
            .members
            .iter()
            .chain(&next.members)
            .map(|m| m.id)
            .collect::<HashSet<_>>()
            .len();
        if union > MEMBERS_MAX {
            return Err(ChangeError::TooManyMembers {
                pg,
                replaced: union - SEGMENTS_PER_PG,
                max: MEMBERS_MAX,
            });
        }
        next.epoch = next.epoch.max(p.epoch_seen + 1);
        tracing::info!(pg, ?change, epoch = next.epoch, "membership change proposed");
        self.propose(pg, next);
        Ok(self.pg_view(pg).expect("the PG exists"))
    }

    /// Send `next` to every member of it and of the membership in force;
    /// writes count by both until it is in force.
    fn propose(&mut self, pg_no: u32, next: Membership) {
        let pg = &mut self.pgs[pg_no as usize];
        for m in &next.members {
            if pg.slot_of(m.id).is_some() {
                continue;
            }
            let slot = Slot::new(m);
            match pg.slots.iter().position(|s| s.node == 0) {
                Some(i) => pg.slots[i] = slot,
                None => pg.slots.push(slot),
            }
            self.outputs.push(Output::Connect {
                node: m.id,
                addr: m.addr,
            });
        }
        pg.epoch_seen = pg.epoch_seen.max(next.epoch);
        for s in &mut pg.slots {
            if s.told != Told::AfterInstall {
                s.told = Told::No;
            }
            if next.is_added(s.node) {
                // What it acknowledged before (as a member of an earlier
                // membership) counts for nothing until it answers the
                // telling of this one (`on_report`).
                s.joined_epoch = next.epoch;
                s.scl = 0;
            }
        }
        pg.proposed = Some(next);
        for slot_no in 0..self.pgs[pg_no as usize].slots.len() {
            let s = &self.pgs[pg_no as usize].slots[slot_no];
            if s.node == 0 {
                continue;
            }
            if !s.up && self.nodes_up.contains(&s.node) {
                // A node already serving other PGs: its new segment is up now.
                self.slot_up(pg_no as usize, slot_no);
            } else if s.up && s.told != Told::AfterInstall {
                self.tell(pg_no, slot_no);
            }
        }
        self.requorum(pg_no);
    }

    /// A segment said which membership it holds: a proposed step a write
    /// quorum of every set in force holds comes in force.
    fn held(&mut self, pg_no: u32, slot_no: usize, membership: Option<&Membership>) {
        let pg = &mut self.pgs[pg_no as usize];
        let s = &mut pg.slots[slot_no];
        let was_not_taken = s.not_taken_yet();
        // Within one incarnation it only moves forward: a status answer
        // the node made before it took a telling can come after the
        // telling's answer (a restart or a lost segment resets it:
        // `on_report`, `UnknownSegment`).
        s.held_epoch = s.held_epoch.max(membership.map_or(0, |m| m.epoch));
        if was_not_taken && !s.not_taken_yet() && s.up && pg.pgmrpl_sent > 0 {
            // Held back from it until now (`tick`), however it learnt the
            // membership: an idle PG may never send another.
            let (node, lsn) = (s.node, pg.pgmrpl_sent);
            self.send_pgmrpl(node, pg_no, lsn);
        }
        let pg = &mut self.pgs[pg_no as usize];
        let s = &mut pg.slots[slot_no];
        // An answer that says less than the segment took (it left before
        // the telling was taken, and came after its answer): told again,
        // or a change waiting for it would wait for good.
        if s.up && s.told == Told::Yes && membership.is_some() && s.held_epoch < pg.target().epoch {
            self.tell(pg_no, slot_no);
            return;
        }
        let pg = &mut self.pgs[pg_no as usize];
        let Some(next) = &pg.proposed else {
            // A new member holding the dual membership may be all a change
            // waited for: on an idle PG no ack or status ask follows.
            self.maybe_finish(pg_no);
            return;
        };
        let epoch = next.epoch;
        let holds = |id: u64| pg.slot_of(id).is_some_and(|i| pg.slots[i].held_epoch >= epoch);
        if !membership::on_write_quorum(&pg.membership, holds) {
            return;
        }
        let next = pg.proposed.take().expect("checked");
        tracing::info!(
            pg = pg_no,
            epoch = next.epoch,
            changing = next.is_changing(),
            "membership in force"
        );
        pg.membership = next;
        // Members that left: nothing more is sent to them, and nothing of
        // theirs is counted (the final set is on a write quorum).
        let gone: Vec<usize> = (0..pg.slots.len())
            .filter(|&i| pg.slots[i].node != 0 && !pg.membership.is_member(pg.slots[i].node))
            .collect();
        for i in gone {
            self.free_slot(pg_no, i);
        }
        self.requorum(pg_no);
    }

    /// A member left the PG: its slot is freed, with whatever was in
    /// flight to it.
    fn free_slot(&mut self, pg_no: u32, slot_no: usize) {
        let mine = |p: &Pending| match p {
            Pending::Append { pg, slot, .. }
            | Pending::Read { pg, slot, .. }
            | Pending::Truncate { pg, slot }
            | Pending::Status { pg, slot }
            | Pending::Membership { pg, slot } => *pg == pg_no && *slot == slot_no,
            Pending::Pgmrpl { .. } => false,
        };
        let mut lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| mine(p))
            .map(|(&id, _)| id)
            .collect();
        lost.sort_unstable();
        let mut reads = Vec::new();
        for id in lost {
            if let Some(Pending::Read { read, .. }) = self.pending.remove(&id) {
                reads.push(read);
            }
        }
        self.retell.retain(|&(_, p, s)| (p, s) != (pg_no, slot_no));
        let s = &mut self.pgs[pg_no as usize].slots[slot_no];
        tracing::info!(pg = pg_no, node = s.node, "segment left the PG");
        s.node = 0;
        s.up = false;
        s.scl = 0;
        s.held_epoch = 0;
        s.incarnation = None;
        s.inflight_batches = 0;
        s.inflight_bytes = 0;
        s.status_asked = false;
        for r in self.reads.values_mut().filter(|r| r.pg == pg_no) {
            r.tried &= !(1 << slot_no);
            r.asked &= !(1 << slot_no);
        }
        for read in reads {
            self.read_failed(read);
        }
    }

    /// The PG's quorum changed (a membership step, an SCL): recompute the
    /// PGCL, let go of what is held enough, move the VDL, and take the
    /// next step of a change when it is due.
    fn requorum(&mut self, pg_no: u32) {
        let pg = &mut self.pgs[pg_no as usize];
        let ms = std::iter::once(&pg.membership).chain(pg.proposed.as_ref());
        // It falls when a segment reports less under a new incarnation:
        // records above it are not on a write quorum any more.
        pg.pgcl = membership::pgcl(ms, |id| pg.scl_of(id));
        // Let go of what every member has, and past the memory bound of
        // what a write quorum of every set has.
        let all = pg
            .slots
            .iter()
            .filter(|s| s.node != 0)
            .map(|s| s.scl)
            .min()
            .unwrap_or(0);
        while let Some(front) = pg.held.front() {
            let over = pg.held_bytes > self.config.pg_held_bytes_max;
            if front.lsn > all && !(over && front.lsn <= pg.pgcl) {
                break;
            }
            pg.held_bytes -= front.bytes.len();
            pg.released_through = front.lsn;
            pg.held.pop_front();
        }
        self.maybe_finish(pg_no);
        self.advance();
    }

    /// A dual membership in force whose new members have all caught up
    /// (told it, up, at the PGCL) moves to its new set, once that set holds
    /// every committed record of the PG on a write quorum.
    fn maybe_finish(&mut self, pg_no: u32) {
        let pg = &self.pgs[pg_no as usize];
        if pg.proposed.is_some() || !pg.membership.is_changing() || self.fenced.is_some() {
            return;
        }
        let m = &pg.membership;
        let caught_up = m.members.iter().enumerate().all(|(i, member)| {
            let new_only = m.new & (1 << i) != 0 && m.old & (1 << i) == 0;
            !new_only
                || pg.slot_of(member.id).is_some_and(|j| {
                    let s = &pg.slots[j];
                    s.up && s.held_epoch >= m.epoch && s.scl >= pg.pgcl
                })
        });
        // The new set alone must hold every committed record on a write
        // quorum: those committed before the change were counted by the
        // old set only, and may be on 3 of the new one (F among their 4).
        let next = membership::finish(m);
        let committed = membership::pgcl([&next], |id| pg.scl_of(id)) >= pg.durable_tail;
        if caught_up && committed {
            let mut next = next;
            next.epoch = next.epoch.max(pg.epoch_seen + 1);
            tracing::info!(
                pg = pg_no,
                epoch = next.epoch,
                "new members caught up; moving to the new set"
            );
            self.propose(pg_no, next);
        }
    }

    /// Whether a new transaction would be taken (not Busy, not fenced).
    pub fn accepting(&self) -> bool {
        self.fenced.is_none() && self.waiting.len() < self.config.waiting_txns_max
    }

    /// The time, in microseconds from any fixed origin, for latencies and retries.
    pub fn set_now(&mut self, now_us: u64) {
        self.now_us = self.now_us.max(now_us);
    }

    /// Take a transaction. It is acknowledged by an [`Output::Committed`]
    /// once durable; until then it may wait for the LAL, but it never fails
    /// once taken.
    pub fn submit(&mut self, token: T, writes: Vec<PageWrite>) -> Result<(), TxnError> {
        if let Some(epoch) = self.fenced {
            return Err(TxnError::Fenced { epoch });
        }
        self.check_txn(&writes)?;
        if !self.waiting.is_empty() || !self.fits(writes.len()) {
            if self.waiting.len() >= self.config.waiting_txns_max {
                return Err(TxnError::Busy);
            }
            self.waiting.push_back((token, writes));
            return Ok(());
        }
        self.allocate(token, writes);
        Ok(())
    }

    fn check_txn(&self, writes: &[PageWrite]) -> Result<(), TxnError> {
        if writes.is_empty() {
            return Err(TxnError::Empty);
        }
        if writes.len() > self.config.txn_writes_max {
            return Err(TxnError::TooManyWrites {
                writes: writes.len(),
                max: self.config.txn_writes_max,
            });
        }
        let pages = self.config.pages();
        for w in writes {
            let page = w.page();
            if page >= pages {
                return Err(TxnError::PageOutOfRange { page, pages });
            }
            let why = match w {
                PageWrite::Image { bytes, .. } if bytes.len() != self.config.page_bytes => Some(format!(
                    "an image of {} bytes for a {}-byte page",
                    bytes.len(),
                    self.config.page_bytes
                )),
                PageWrite::Range { offset, bytes, .. }
                    if (*offset as usize).saturating_add(bytes.len()) > self.config.page_bytes =>
                {
                    Some(format!(
                        "{} bytes at offset {offset} run past the {}-byte page",
                        bytes.len(),
                        self.config.page_bytes
                    ))
                }
                _ => None,
            };
            if let Some(why) = why {
                return Err(TxnError::BadWrite { page, why });
            }
        }
        Ok(())
    }

    fn fits(&self, records: usize) -> bool {
        // The truncation range below `lal_floor` is void: nothing in it waits.
        self.next_lsn + records as u64 - 1 <= self.commits.vdl().max(self.lal_floor) + self.config.lal
    }

    fn allocate(&mut self, token: T, writes: Vec<PageWrite>) {
        let n = writes.len();
        let mut cpl = 0;
        for (i, w) in writes.into_iter().enumerate() {
            let lsn = self.next_lsn;
            self.next_lsn += 1;
            let page = w.page();
            let pg_no = (page / self.config.pg_pages) as u32;
            let body = w.into_body();
            self.cache.on_write(page, lsn, &body);
            let prev_lsn_page = self.page_last_lsn.insert(page, lsn).unwrap_or(0);
            let pg = &mut self.pgs[pg_no as usize];
            let record = RedoRecord {
                segment: SegmentId {
                    volume: self.config.volume,
                    pg: pg_no,
                },
                lsn,
                prev_lsn_pg: pg.last_lsn,
                prev_lsn_page,
                page,
                cpl: i + 1 == n,
                body,
            };
            let bytes = record.encode();
            pg.held_bytes += bytes.len();
            pg.held.push_back(Arc::new(EncodedRecord { lsn, bytes }));
            pg.last_lsn = lsn;
            pg.above_vdl.push_back(lsn);
            pg.dirty = true;
            cpl = lsn;
        }
        self.commits.push(cpl, token);
    }

    /// The boxcar: send each segment what it has not been sent, as far as
    /// its in-flight window allows. Call after a round of inputs; the
    /// outputs come back from [`Writer::take_outputs`].
    pub fn flush(&mut self) {
        if self.fenced.is_some() {
            return;
        }
        for pg_no in 0..self.pgs.len() {
            if !self.pgs[pg_no].dirty {
                continue;
            }
            self.pgs[pg_no].dirty = false;
            for slot in 0..self.pgs[pg_no].slots.len() {
                self.send_to(pg_no, slot);
            }
        }
    }

    fn send_to(&mut self, pg_no: usize, slot_no: usize) {
        let config = &self.config;
        let pg = &mut self.pgs[pg_no];
        let slot = &mut pg.slots[slot_no];
        if !slot.up || slot.paused_until_us > self.now_us {
            return;
        }
        loop {
            if slot.inflight_batches >= config.segment_batches_inflight_max
                || slot.inflight_bytes >= config.segment_inflight_bytes_max
            {
                return;
            }
            let from = pg.held.partition_point(|r| r.lsn <= slot.sent_through);
            if from == pg.held.len() {
                return;
            }
            let room = config
                .batch_bytes_max
                .min(config.segment_inflight_bytes_max - slot.inflight_bytes);
            let mut records = Vec::new();
            let mut bytes = 0;
            for r in pg.held.range(from..) {
                if !records.is_empty() && bytes + r.bytes.len() > room {
                    break;
                }
                bytes += r.bytes.len();
                records.push(r.clone());
            }
            let Some(last) = records.last() else {
                return;
            };
            slot.sent_through = last.lsn;
            slot.inflight_batches += 1;
            slot.inflight_bytes += bytes;
            let request = self.next_request;
            self.next_request += 1;
            self.pending.insert(
                request,
                Pending::Append {
                    pg: pg_no as u32,
                    slot: slot_no,
                    bytes,
                    sent_us: self.now_us,
                    membership_epoch: pg.proposed.as_ref().unwrap_or(&pg.membership).epoch,
                },
            );
            self.outputs.push(Output::Append {
                node: slot.node,
                request,
                pg: pg_no as u32,
                epoch: config.epoch,
                membership_epoch: pg.proposed.as_ref().unwrap_or(&pg.membership).epoch,
                records,
            });
        }
    }

    /// Everything decided since the last call (sends included: this flushes first).
    pub fn take_outputs(&mut self, out: &mut Vec<Output<T>>) {
        self.flush();
        out.append(&mut self.outputs);
    }

    /// The connection to `node` is established (Hello answered). Each of
    /// its segments is told its PG's membership and asked where it stands:
    /// if the node restarted, its new incarnation's SCLs replace the old
    /// ones (see the module header).
    pub fn node_up(&mut self, node: u64) {
        self.refusal_warned.remove(&node);
        self.nodes_up.insert(node);
        for pg_no in 0..self.pgs.len() {
            if let Some(slot_no) = self.pgs[pg_no].slot_of(node) {
                self.slot_up(pg_no, slot_no);
            }
        }
    }

    fn slot_up(&mut self, pg_no: usize, slot_no: usize) {
        self.pgs[pg_no].slots[slot_no].up = true;
        // First on the connection: a segment the node lacks is created with
        // it before an append or a status ask arrives.
        self.tell(pg_no as u32, slot_no);
        let pg = &mut self.pgs[pg_no];
        let slot = &mut pg.slots[slot_no];
        slot.sent_through = slot.scl.max(pg.released_through);
        pg.dirty = true;
        self.ask_status(pg_no as u32, slot_no);
    }

    /// Ask a segment where it stands (`GetSegmentStatus`); the answer is
    /// taken as any report of its SCL.
    fn ask_status(&mut self, pg: u32, slot: usize) {
        let request = self.next_request;
        self.next_request += 1;
        let s = &mut self.pgs[pg as usize].slots[slot];
        s.status_asked = true;
        s.status_asked_us = self.now_us;
        let node = s.node;
        self.pending.insert(request, Pending::Status { pg, slot });
        self.outputs.push(Output::Request {
            node,
            request,
            message: Message::GetSegmentStatus {
                volume: self.config.volume,
                epoch: self.config.epoch,
                pg,
            },
        });
    }

    /// The connection to `node` is gone: whatever was in flight on it is
    /// lost; it will be sent again from the segments' SCLs when it is back.
    pub fn node_down(&mut self, node: u64) {
        self.nodes_up.remove(&node);
        for pg in &mut self.pgs {
            for slot in pg.slots.iter_mut().filter(|s| s.node == node) {
                slot.up = false;
                if slot.told == Told::Asked {
                    slot.told = Told::No; // lost with the connection; told at the next up
                }
                if slot.paused_until_us == u64::MAX {
                    slot.paused_until_us = 0; // its truncation was lost with the connection
                }
                slot.status_asked = false;
                slot.inflight_batches = 0;
                slot.inflight_bytes = 0;
                slot.sent_through = slot.scl.max(pg.released_through);
            }
        }
        let mut lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| match p {
                Pending::Append { pg, slot, .. } | Pending::Read { pg, slot, .. } => {
                    self.pgs[*pg as usize].slots[*slot].node == node
                }
                Pending::Pgmrpl { node: n } => *n == node,
                Pending::Truncate { pg, slot } | Pending::Status { pg, slot } | Pending::Membership { pg, slot } => {
                    self.pgs[*pg as usize].slots[*slot].node == node
                }
            })
            .map(|(&id, _)| id)
            .collect();
        // In request order, not the map's: the simulator replays a seed exactly.
        lost.sort_unstable();
        for id in lost {
            if let Some(Pending::Read { read, slot, .. }) = self.pending.remove(&id) {
                // The ask is over: without this the read would wait for an
                // answer that cannot come, and never be asked again.
                if let Some(r) = self.reads.get_mut(&read) {
                    r.asked &= !(1 << slot);
                }
                self.read_failed(read);
            }
        }
    }

    /// A reply from `node` to request `request`. Replies to requests the
    /// writer no longer waits for (lost connections, hedged reads) are
    /// still believed for what they say about a segment's SCL.
    pub fn on_reply(&mut self, node: u64, request: u64, reply: Message) {
        if let Message::Error {
            code: ErrorCode::StaleEpoch,
            current_epoch,
            ..
        } = reply
            && current_epoch > self.config.epoch
        {
            self.fence(current_epoch);
            return;
        }
        let mut pending = self.pending.remove(&request);
        if let Some(p) = pending.take_if(|p| !self.may_answer(p, node, &reply)) {
            // Not the answer to it. Ids are the writer's own (above
            // recovery's, whose late answers come on the same connections),
            // so this is somebody's bug; the answer is still believed for
            // what it says of its own segment, as a late one is, and never
            // credited to the segment the request went to.
            tracing::warn!(
                node,
                request,
                "an answer from another node or about another PG than its request's"
            );
            self.pending.insert(request, p);
        }
        match (pending, reply) {
            (
                Some(Pending::Append {
                    pg,
                    slot,
                    bytes,
                    sent_us,
                    membership_epoch,
                }),
                reply,
            ) => {
                let s = &mut self.pgs[pg as usize].slots[slot];
                s.inflight_batches -= 1;
                s.inflight_bytes -= bytes;
                s.latency_us = (s.latency_us * 7 + self.now_us.saturating_sub(sent_us)) / 8;
                match reply {
                    Message::AppendAck { scl, incarnation, .. } => {
                        self.on_report(pg, slot, scl, incarnation, Some(membership_epoch))
                    }
                    Message::Error {
                        code: ErrorCode::EpochNotInstalled,
                        ..
                    } => self.install(pg, slot),
                    other => {
                        if let Message::Error {
                            code: ErrorCode::StaleMembership,
                            current_epoch,
                            ..
                        } = &other
                        {
                            self.segment_ahead(node, pg, *current_epoch);
                            self.segment_behind(pg, slot, *current_epoch);
                        }
                        tracing::debug!(node, pg, reply = ?other, "append refused; will send again");
                        let released = self.pgs[pg as usize].released_through;
                        let s = &mut self.pgs[pg as usize].slots[slot];
                        s.sent_through = s.scl.max(released);
                        s.paused_until_us = self.now_us + self.config.retry_after_us;
                    }
                }
                self.pgs[pg as usize].dirty = true;
            }
            (
                Some(Pending::Read {
                    read,
                    pg,
                    slot,
                    sent_us,
                }),
                reply,
            ) => {
                let s = &mut self.pgs[pg as usize].slots[slot];
                s.latency_us = (s.latency_us * 7 + self.now_us.saturating_sub(sent_us)) / 8;
                if let Some(r) = self.reads.get_mut(&read) {
                    r.asked &= !(1 << slot);
                }
                match reply {
                    Message::Page { lsn, bytes, page, .. } if bytes.len() == self.config.page_bytes => {
                        self.read_succeeded(read, page, lsn, bytes)
                    }
                    Message::Error {
                        code: ErrorCode::StaleMembership,
                        current_epoch,
                        ..
                    } => {
                        self.segment_ahead(node, pg, current_epoch);
                        self.read_failed(read);
                    }
                    _ => self.read_failed(read),
                }
            }
            (Some(Pending::Pgmrpl { .. }), _) => {}
            (Some(Pending::Truncate { pg, slot }), reply) => {
                let p = &mut self.pgs[pg as usize];
                match reply {
                    Message::SegmentStatus {
                        scl,
                        installed_epoch,
                        incarnation,
                        membership,
                        ..
                    } if installed_epoch == self.config.epoch => {
                        tracing::info!(node, pg, scl, "segment installed this writer's epoch");
                        let s = &mut p.slots[slot];
                        // A node a change added counts only from its answer
                        // to the telling on (`on_report`).
                        let before_taking = s.before_taking(membership.as_ref().map(|m| m.epoch));
                        s.paused_until_us = 0;
                        // The truncation dropped what it held above the
                        // epoch's range: its SCL is what it says now.
                        s.scl = if before_taking { 0 } else { scl };
                        s.incarnation = Some(incarnation);
                        s.sent_through = scl.max(p.released_through);
                        let retell = s.told == Told::AfterInstall;
                        p.dirty = true;
                        self.set_scl(pg, slot);
                        if retell {
                            self.tell(pg, slot);
                        }
                    }
                    other => {
                        tracing::debug!(node, pg, reply = ?other, "truncation refused; will try again");
                        p.slots[slot].paused_until_us = self.now_us + self.config.retry_after_us;
                    }
                }
            }
            (Some(Pending::Status { pg, slot }), reply) => match reply {
                Message::SegmentStatus {
                    scl,
                    incarnation,
                    installed_epoch,
                    membership,
                    ..
                } => {
                    self.pgs[pg as usize].slots[slot].status_asked = false;
                    let taken = membership.as_ref().map(|m| m.epoch);
                    self.on_report(pg, slot, scl, incarnation, taken);
                    self.held(pg, slot, membership.as_ref());
                    self.install_if_missed(pg, slot, installed_epoch);
                }
                Message::Error {
                    code: ErrorCode::UnknownSegment,
                    ..
                } => {
                    // The node holds nothing of the PG (a replaced disk):
                    // its SCL is 0 under an incarnation its first ack names.
                    let p = &mut self.pgs[pg as usize];
                    let s = &mut p.slots[slot];
                    s.status_asked = false;
                    if s.scl > 0 {
                        tracing::warn!(
                            node,
                            pg,
                            scl = s.scl,
                            "segment is gone from its node; counted for nothing"
                        );
                    }
                    s.scl = 0;
                    s.incarnation = None;
                    s.held_epoch = 0;
                    s.sent_through = p.released_through;
                    p.dirty = true;
                    self.set_scl(pg, slot);
                    // Telling creates it, with this writer's ranges (a
                    // first append would create it without them, and the
                    // next recovery's truncation could be refused). A
                    // telling already on its way, or refused, goes by its
                    // own rules. The answer may also predate the telling
                    // that created it: telling again is harmless.
                    let s = &self.pgs[pg as usize].slots[slot];
                    if s.up && matches!(s.told, Told::Yes | Told::No) {
                        self.tell(pg, slot);
                    }
                }
                // Anything else: its acks will tell, or the next ask.
                other => {
                    self.pgs[pg as usize].slots[slot].status_asked = false;
                    tracing::debug!(node, pg, reply = ?other, "segment status refused");
                }
            },
            (Some(Pending::Membership { pg, slot }), reply) => self.on_told(node, pg, slot, reply),
            (
                None,
                Message::AppendAck {
                    pg, scl, incarnation, ..
                },
            ) => {
                // An ack no request waits for any more (re-sent since, or
                // answered twice): its SCL is still true.
                if let Some(slot) = self
                    .pgs
                    .get(pg as usize)
                    .and_then(|p| p.slots.iter().position(|s| s.node == node))
                {
                    self.on_report(pg, slot, scl, incarnation, None);
                }
            }
            (None, _) => {}
        }
    }

    /// Whether `reply` from `node` can answer request `p`: it comes from
    /// the node `p` went to, and is about the PG `p` asked about.
    fn may_answer(&self, p: &Pending, node: u64, reply: &Message) -> bool {
        let (to, pg) = match p {
            Pending::Append { pg, slot, .. }
            | Pending::Read { pg, slot, .. }
            | Pending::Truncate { pg, slot }
            | Pending::Status { pg, slot }
            | Pending::Membership { pg, slot } => (self.pgs[*pg as usize].slots[*slot].node, Some(*pg)),
            Pending::Pgmrpl { node } => (*node, None),
        };
        let about = match reply {
            Message::AppendAck { pg, .. }
            | Message::Page { pg, .. }
            | Message::SegmentStatus { pg, .. }
            | Message::PgmrplOk { pg, .. } => Some(*pg),
            _ => None,
        };
        to == node && (pg.is_none() || about.is_none() || pg == about)
    }

    /// A segment missed this epoch's recovery: send it the truncation, and
    /// nothing else until it answers (the pause ends then).
    fn install(&mut self, pg: u32, slot: usize) {
        let request = self.next_request;
        self.next_request += 1;
        let s = &mut self.pgs[pg as usize].slots[slot];
        if s.paused_until_us == u64::MAX {
            return; // already asked
        }
        s.sent_through = s.scl;
        s.paused_until_us = u64::MAX;
        let node = s.node;
        self.pending.insert(request, Pending::Truncate { pg, slot });
        self.outputs.push(Output::Request {
            node,
            request,
            message: Message::Truncate {
                volume: self.config.volume,
                epoch: self.config.epoch,
                pg,
                ranges: self.config.annulled.clone(),
            },
        });
    }

    /// A segment's status shows an installed epoch older than this
    /// writer's: it missed a recovery, refuses this writer's appends, and
    /// gossip will not repair it (peers at another installed epoch are
    /// refused). Sent the truncation now, as after an `EpochNotInstalled`,
    /// rather than at the next append, which an idle PG may never send.
    /// At most one truncation is in flight per segment (`install`), and one
    /// is lost with its connection.
    fn install_if_missed(&mut self, pg: u32, slot: usize, installed_epoch: u64) {
        if installed_epoch < self.config.epoch && self.pgs[pg as usize].slots[slot].up {
            tracing::info!(
                node = self.pgs[pg as usize].slots[slot].node,
                pg,
                installed_epoch,
                "segment missed this writer's recovery; sending it the truncation"
            );
            self.install(pg, slot);
        }
    }

    fn fence(&mut self, epoch: u64) {
        if self.fenced.is_none() {
            tracing::error!(epoch, "a segment reports a newer epoch: another writer owns the volume");
            self.fenced = Some(epoch);
            self.outputs.push(Output::Fenced { epoch });
        }
    }

    /// A segment reported `scl` under the node's `incarnation`.
    ///
    /// The shells hand over a connection's replies before its loss
    /// (`node_down`), and a new connection's after `node_up`; a node's
    /// incarnation changes only when it opens its device, which ends every
    /// connection. So a reply taken while the slot is up came on the
    /// current connection, from the node as it is now.
    ///
    /// `taken`: a membership epoch the segment is known to have held (or
    /// been a member of the one just before) when it made the report. A
    /// node a change added counts for nothing but reports made since it
    /// took the membership that added it (`Slot::joined_epoch`).
    fn on_report(&mut self, pg_no: u32, slot_no: usize, scl: u64, incarnation: u64, taken: Option<u64>) {
        let pg = &mut self.pgs[pg_no as usize];
        let slot = &mut pg.slots[slot_no];
        if !slot.up {
            return; // its connection is gone: never from the node as it is now
        }
        if slot.before_taking(taken) {
            return;
        }
        let mut retell = false;
        if slot.incarnation == Some(incarnation) {
            // Acks of one incarnation may come out of order; its SCL only
            // moves forward.
            slot.scl = slot.scl.max(scl);
        } else {
            // A node under a new incarnation may have lost the segment
            // (reformatted) or its membership: tell it again, unless a
            // telling is already on its way to the node as it is now.
            retell = slot.incarnation.is_some() && slot.told != Told::Asked;
            // The node opened its device since (or this writer had not
            // heard from it): it holds what it says now.
            if scl < slot.scl {
                tracing::warn!(
                    node = slot.node,
                    pg = pg_no,
                    was = slot.scl,
                    scl,
                    "segment came back with less than it acknowledged; sending it what it lacks"
                );
                slot.sent_through = scl.max(pg.released_through);
                pg.dirty = true;
            }
            slot.scl = scl;
            slot.incarnation = Some(incarnation);
            // What it holds now is what its answers say from here on.
            slot.held_epoch = 0;
        }
        self.set_scl(pg_no, slot_no);
        if retell {
            self.tell(pg_no, slot_no);
        }
    }

    /// Send a segment its PG's membership (`SetMembership`, at this
    /// writer's epoch, with the PG's geometry so that a node lacking the
    /// segment creates it).
    fn tell(&mut self, pg: u32, slot: usize) {
        let request = self.next_request;
        self.next_request += 1;
        let s = &mut self.pgs[pg as usize].slots[slot];
        s.told = Told::Asked;
        let node = s.node;
        self.pending.insert(request, Pending::Membership { pg, slot });
        self.outputs.push(Output::Request {
            node,
            request,
            message: Message::SetMembership {
                volume: self.config.volume,
                epoch: self.config.epoch,
                pg,
                page_bytes: self.config.page_bytes as u32,
                pg_pages: self.config.pg_pages,
                membership: self.pgs[pg as usize].target().clone(),
                // A segment this creates (a replaced disk) takes them as
                // applied, so a later recovery's truncation is not refused.
                annulled: self.config.annulled.clone(),
            },
        });
    }

    /// A segment holds membership epoch `current` of PG `pg`, which this
    /// writer's is below: a step a writer before it sent to a few
    /// segments only, never in force (recovery would have found it). It is
    /// not lowered: what this writer has is proposed again above it, with
    /// the same members. At this writer's own epoch it is this writer's
    /// step, taken since the refused request named the one before (an
    /// append or a read sent before the step was proposed): nothing to do.
    fn segment_ahead(&mut self, node: u64, pg: u32, current: u64) {
        let p = &mut self.pgs[pg as usize];
        if current <= p.target().epoch {
            return;
        }
        tracing::warn!(
            node,
            pg,
            segment_membership_epoch = current,
            epoch = p.target().epoch,
            "segment holds a newer membership than this writer's; proposing this one above it"
        );
        p.epoch_seen = p.epoch_seen.max(current);
        let mut again = p.target().clone();
        again.epoch = p.epoch_seen + 1;
        self.propose(pg, again);
    }

    /// Send `node` PG `pg`'s PGMRPL.
    fn send_pgmrpl(&mut self, node: u64, pg: u32, lsn: u64) {
        let request = self.next_request;
        self.next_request += 1;
        self.pending.insert(request, Pending::Pgmrpl { node });
        self.outputs.push(Output::Request {
            node,
            request,
            message: Message::SetPgmrpl {
                volume: self.config.volume,
                epoch: self.config.epoch,
                pg,
                lsn,
            },
        });
    }

    /// A segment refused an append for holding an older membership than
    /// the writer's (`current`): it takes appends only once told, since a
    /// telling may make it drop what it holds (a node rejoining the PG).
    /// Told now, unless a telling is on its way or waits for the segment
    /// to install this writer's epoch (it is sent the truncation then).
    fn segment_behind(&mut self, pg: u32, slot: usize, current: u64) {
        let p = &self.pgs[pg as usize];
        let s = &p.slots[slot];
        if current >= p.target().epoch || !s.up {
            return;
        }
        match s.told {
            Told::Asked => {}
            Told::AfterInstall => self.install(pg, slot),
            Told::No | Told::Yes | Told::Refused => self.tell(pg, slot),
        }
    }

    /// A segment answered its membership. A refusal is never fatal (the
    /// writer goes on; gossip repair is what waits for it) and is logged
    /// where it is handled: a node that cannot take memberships refuses
    /// each of its PGs, so only the first refusal of a connection is a WARN.
    fn on_told(&mut self, node: u64, pg: u32, slot: usize, reply: Message) {
        match reply {
            Message::SegmentStatus {
                scl,
                incarnation,
                installed_epoch,
                membership,
                ..
            } => {
                // Told while still `Asked`: a new incarnation in this
                // answer is one the node was told under. A node the step
                // added counts from this answer on, up from nothing
                // (`propose`, `on_report`): it may have dropped what it
                // held on taking the step (a node rejoining the PG).
                let s = &mut self.pgs[pg as usize].slots[slot];
                s.told = Told::Yes;
                s.refused = None;
                let taken = membership.as_ref().map(|m| m.epoch);
                self.on_report(pg, slot, scl, incarnation, taken);
                self.held(pg, slot, membership.as_ref());
                self.install_if_missed(pg, slot, installed_epoch);
            }
            Message::Error {
                code: ErrorCode::EpochNotInstalled,
                ..
            } => {
                tracing::debug!(node, pg, "membership waits for the segment to install the epoch");
                self.pgs[pg as usize].slots[slot].told = Told::AfterInstall;
                self.install(pg, slot);
            }
            Message::Error {
                code: ErrorCode::StaleMembership,
                current_epoch,
                ..
            } => {
                // The segment holds a later membership than this writer's
                // (a step a writer before it sent to a few segments only,
                // never in force). It is not lowered: what this writer
                // has is proposed again above it, the same members.
                self.pgs[pg as usize].slots[slot].told = Told::Refused;
                self.segment_ahead(node, pg, current_epoch);
            }
            Message::Error { code, message, .. } => {
                if self.refusal_warned.insert(node) {
                    tracing::warn!(
                        node,
                        pg,
                        ?code,
                        reason = %message,
                        "storage node refused a PG's membership; writing goes on, its segments are told again when it comes back"
                    );
                } else {
                    tracing::debug!(node, pg, ?code, reason = %message, "membership refused");
                }
                let s = &mut self.pgs[pg as usize].slots[slot];
                s.told = Told::Refused;
                s.refused = Some(message);
                // A one-off refusal: told again soon, not only at the next up.
                if matches!(code, ErrorCode::Internal | ErrorCode::Overloaded)
                    && !self.retell.iter().any(|&(_, p, s)| (p, s) == (pg, slot))
                {
                    self.retell.push((self.now_us + self.config.retry_after_us, pg, slot));
                }
            }
            other => {
                tracing::warn!(node, pg, reply = ?other, "unexpected answer to a membership");
                self.pgs[pg as usize].slots[slot].told = Told::Refused;
            }
        }
    }

    /// A slot's SCL changed: re-send what it missed, recompute the PGCL,
    /// let go of what is held enough, and move the VDL.
    fn set_scl(&mut self, pg_no: u32, slot_no: usize) {
        let pg = &mut self.pgs[pg_no as usize];
        let slot = &mut pg.slots[slot_no];
        // Everything sent was answered and the segment is still behind:
        // something it was sent never arrived. Send it again.
        if slot.inflight_batches == 0 && slot.scl < slot.sent_through && slot.scl >= pg.released_through {
            slot.sent_through = slot.scl;
            pg.dirty = true;
        }
        self.requorum(pg_no);
    }

    /// Move VCL → VDL, acknowledge what it covers, and let waiting
    /// transactions in under the raised LAL.
    fn advance(&mut self) {
        let vcl = self.vcl();
        let outputs = &mut self.outputs;
        let moved = self
            .commits
            .advance(vcl, |lsn, token| outputs.push(Output::Committed { token, lsn }));
        if !moved {
            return;
        }
        let vdl = self.commits.vdl();
        self.cache.on_vdl(vdl);
        for pg in &mut self.pgs {
            while let Some(&lsn) = pg.above_vdl.front() {
                if lsn > vdl {
                    break;
                }
                pg.durable_tail = lsn;
                pg.above_vdl.pop_front();
            }
        }
        while let Some((_, writes)) = self.waiting.front() {
            if !self.fits(writes.len()) {
                break;
            }
            let Some((token, writes)) = self.waiting.pop_front() else {
                break;
            };
            self.allocate(token, writes);
        }
    }

    /// Read `page` as of the current VDL (the read point). Served from the
    /// page cache when it holds the page; otherwise asked of the segment of
    /// the page's PG with the best recent latency among those whose SCL
    /// reaches the read point, and of a second one if the first refuses, is
    /// slow (`read_hedge_after_us`) or its connection drops. The answer comes
    /// as [`Output::ReadDone`].
    pub fn read(&mut self, token: T, page: u64) -> Result<(), TxnError> {
        if let Some(epoch) = self.fenced {
            return Err(TxnError::Fenced { epoch });
        }
        let pages = self.config.pages();
        if page >= pages {
            return Err(TxnError::PageOutOfRange { page, pages });
        }
        let read_point = self.commits.vdl();
        if let Some((lsn, bytes)) = self.cache.get(page) {
            self.outputs.push(Output::ReadDone {
                token,
                page: PageRead { read_point, lsn, bytes },
            });
            return Ok(());
        }
        let pg_no = (page / self.config.pg_pages) as u32;
        let pg_point = self.pgs[pg_no as usize].durable_tail;
        if pg_point == 0 {
            // No record of the PG is durable: every page of it is zeros.
            self.outputs.push(Output::ReadDone {
                token,
                page: PageRead {
                    read_point,
                    lsn: 0,
                    bytes: vec![0; self.config.page_bytes],
                },
            });
            return Ok(());
        }
        if self.reads.len() >= self.config.reads_inflight_max {
            return Err(TxnError::Busy);
        }
        let read = self.next_read;
        self.next_read += 1;
        self.reads.insert(
            read,
            ReadState {
                token,
                page,
                pg: pg_no,
                read_point,
                pg_point,
                tried: 0,
                asked: 0,
                started_us: self.now_us,
            },
        );
        self.ask(read);
        Ok(())
    }

    /// Ask one more segment for a read; false if none can answer now.
    fn ask(&mut self, read: u64) -> bool {
        let Some(r) = self.reads.get_mut(&read) else {
            return false;
        };
        let pg = &self.pgs[r.pg as usize];
        let mut best: Option<(u64, usize)> = None;
        for (i, s) in pg.slots.iter().enumerate() {
            if !s.up || s.scl < r.pg_point || r.tried & (1 << i) != 0 {
                continue;
            }
            if best.is_none_or(|(lat, _)| s.latency_us < lat) {
                best = Some((s.latency_us, i));
            }
        }
        let Some((_, slot)) = best else {
            return false;
        };
        r.tried |= 1 << slot;
        r.asked |= 1 << slot;
        let request = self.next_request;
        self.next_request += 1;
        let node = pg.slots[slot].node;
        self.pending.insert(
            request,
            Pending::Read {
                read,
                pg: r.pg,
                slot,
                sent_us: self.now_us,
            },
        );
        self.outputs.push(Output::Request {
            node,
            request,
            message: Message::GetPage {
                volume: self.config.volume,
                epoch: self.config.epoch,
                pg: r.pg,
                page: r.page,
                read_point: r.pg_point,
                membership_epoch: pg.target().epoch,
            },
        });
        true
    }

    fn read_failed(&mut self, read: u64) {
        let Some(r) = self.reads.get(&read) else {
            return;
        };
        if r.asked == 0 && !self.ask(read) {
            // Nobody can answer now: start over at the next tick.
            if let Some(r) = self.reads.get_mut(&read) {
                r.tried = 0;
            }
        }
    }

    fn read_succeeded(&mut self, read: u64, page: u64, lsn: u64, bytes: Vec<u8>) {
        let Some(r) = self.reads.remove(&read) else {
            return; // a hedged read already answered
        };
        if page != r.page || lsn > r.pg_point {
            debug_assert!(false, "a segment answered another page or read point");
            self.reads.insert(read, r);
            self.read_failed(read);
            return;
        }
        // Still current if nothing was written to it since the read point.
        if self.page_last_lsn.get(&page).is_none_or(|&l| l <= r.pg_point) {
            self.cache.insert(page, lsn, bytes.clone());
        }
        self.outputs.push(Output::ReadDone {
            token: r.token,
            page: PageRead {
                read_point: r.read_point,
                lsn,
                bytes,
            },
        });
    }

    /// Periodic work off the commit path: hedge slow reads, retry reads
    /// nobody could answer, resume paused segments, re-send batches
    /// unanswered too long (if configured), and tell segments the PGMRPL.
    pub fn tick(&mut self, now_us: u64) {
        self.set_now(now_us);
        if self.fenced.is_some() {
            return;
        }
        let mut slow: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.asked == 0 || now_us.saturating_sub(r.started_us) >= self.config.read_hedge_after_us)
            .map(|(&id, _)| id)
            .collect();
        slow.sort_unstable();
        for read in slow {
            if let Some(r) = self.reads.get_mut(&read) {
                r.started_us = now_us;
            }
            if !self.ask(read) {
                // Every segment that can answer was tried: start over with
                // those not already waited on (at most one ask per segment).
                if let Some(r) = self.reads.get_mut(&read) {
                    r.tried = r.asked;
                }
                self.ask(read);
            }
        }
        if let Some(resend_after) = self.config.resend_after_us {
            let mut stale: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| match p {
                    Pending::Append { sent_us, .. } | Pending::Read { sent_us, .. } => {
                        now_us.saturating_sub(*sent_us) >= resend_after
                    }
                    _ => false,
                })
                .map(|(&id, _)| id)
                .collect();
            stale.sort_unstable();
            for id in stale {
                match self.pending.remove(&id) {
                    Some(Pending::Append { pg, slot, bytes, .. }) => {
                        let p = &mut self.pgs[pg as usize];
                        let s = &mut p.slots[slot];
                        s.inflight_batches -= 1;
                        s.inflight_bytes -= bytes;
                        s.sent_through = s.scl.max(p.released_through);
                        p.dirty = true;
                    }
                    // Taken as lost, as a batch is: the read may ask that segment again.
                    Some(Pending::Read { read, slot, .. }) => {
                        if let Some(r) = self.reads.get_mut(&read) {
                            r.asked &= !(1 << slot);
                        }
                        self.read_failed(read);
                    }
                    other => debug_assert!(other.is_none()),
                }
            }
        }
        if !self.retell.is_empty() {
            let mut due = Vec::new();
            self.retell.retain(|&(at, pg, slot)| {
                if at <= now_us {
                    due.push((pg, slot));
                }
                at > now_us
            });
            for (pg, slot) in due {
                let s = &self.pgs[pg as usize].slots[slot];
                // Down: told when it is back up.
                if s.up && s.told == Told::Refused {
                    self.tell(pg, slot);
                }
            }
        }
        for pg_no in 0..self.pgs.len() {
            let pg = &mut self.pgs[pg_no];
            if pg
                .slots
                .iter()
                .any(|s| s.paused_until_us != 0 && s.paused_until_us <= now_us)
            {
                for s in &mut pg.slots {
                    if s.paused_until_us <= now_us {
                        s.paused_until_us = 0;
                    }
                }
                pg.dirty = true;
            }
            // A segment behind with nothing in flight learns nothing from
            // acks; gossip may have caught it up since it last answered.
            let highest = pg.slots.iter().map(|s| s.scl).max().unwrap_or(0);
            for slot_no in 0..self.pgs[pg_no].slots.len() {
                let s = &self.pgs[pg_no].slots[slot_no];
                let behind = s.scl < highest.max(s.sent_through);
                if s.up
                    && behind
                    && !s.status_asked
                    && s.inflight_batches == 0
                    && s.paused_until_us != u64::MAX
                    && now_us >= s.status_asked_us.saturating_add(self.config.status_ask_us)
                {
                    self.ask_status(pg_no as u32, slot_no);
                }
            }
            let pg = &mut self.pgs[pg_no];
            // PGMRPL: the lowest read point a reader of this PG still holds.
            let mut pgmrpl = pg.durable_tail;
            for r in self.reads.values().filter(|r| r.pg as usize == pg_no) {
                pgmrpl = pgmrpl.min(r.pg_point);
            }
            // Each SetPgmrpl is a durable segment-table write on every node
            // of the PG, and coalescing (all it is for) has no use for
            // a step per tick: sent after a large move, or after a pause.
            // A lower PGMRPL than possible is always safe; never sending a
            // PG's last one is not (its hot records would pin the log).
            let due = pgmrpl >= pg.pgmrpl_sent.saturating_add(PGMRPL_STEP_LSNS)
                || now_us >= pg.pgmrpl_sent_us.saturating_add(PGMRPL_INTERVAL_US);
            if pgmrpl > pg.pgmrpl_sent && due {
                pg.pgmrpl_sent = pgmrpl;
                pg.pgmrpl_sent_us = now_us;
                // Not to a node a change added that has not taken that
                // membership yet: taking it may make it drop records it
                // holds now, which must not be coalesced first. It is
                // sent the PGMRPL once it has (`held`).
                let to: Vec<u64> = (pg.slots.iter())
                    .filter(|s| s.up && !s.not_taken_yet())
                    .map(|s| s.node)
                    .collect();
                for node in to {
                    self.send_pgmrpl(node, pg_no as u32, pgmrpl);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
