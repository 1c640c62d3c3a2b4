//! Recovery against segments built from storaged's own segment core
//! (`storaged::segment::Segment`), answering as a storage node does.

use std::collections::{BTreeMap, HashMap};

use storaged::proto::{ErrorCode, Message};
use storaged::record::{RecordBody, RedoRecord, SegmentId, WireRecord};
use storaged::segment::Segment;

use super::*;
use storaged::membership::Member;

const VOLUME: u64 = 7;
const PAGE_BYTES: u32 = 512;
const PG_PAGES: u64 = 8;

/// One segment on one node: the chain core plus the bodies and the
/// PGMRPL a node keeps beside it.
struct FakeSegment {
    seg: Segment<u64>,
    bodies: BTreeMap<u64, RedoRecord>,
    pgmrpl: u64,
    /// Its node's incarnation: a restart gives it another.
    incarnation: u64,
    /// The membership a writer told it (`SetMembership`), if any.
    membership: Option<Membership>,
}

impl FakeSegment {
    fn new(pg: u32, epoch: u64) -> FakeSegment {
        FakeSegment {
            seg: Segment::new(SegmentId { volume: VOLUME, pg }, epoch, 100_000),
            bodies: BTreeMap::new(),
            pgmrpl: 0,
            incarnation: 1,
            membership: None,
        }
    }

    fn put(&mut self, records: &[RedoRecord]) {
        let batch: Vec<WireRecord> = records.iter().cloned().map(WireRecord::new).collect();
        let a = self.seg.admit(&batch).unwrap();
        for r in records.iter().filter(|r| a.new.contains(&r.lsn)) {
            self.bodies.insert(r.lsn, r.clone());
        }
        self.seg.on_durable(&a.new, 1).1.unwrap();
    }

    fn status(&self, pg: u32) -> Message {
        Message::SegmentStatus {
            volume: VOLUME,
            pg,
            epoch: self.seg.epoch(),
            scl: self.seg.scl(),
            highest_lsn: self.seg.highest_lsn(),
            lowest_lsn: 0,
            pgmrpl: self.pgmrpl,
            records: self.seg.records_held() as u64,
            log_bytes: 0,
            page_store_bytes: 0,
            installed_epoch: self.seg.installed_epoch(),
            incarnation: self.incarnation,
            annulled: self.seg.annulled().to_vec(),
            holes: self.seg.holes(),
            damage: Default::default(),
            membership: self.membership.clone(),
            hydration: None,
        }
    }
}

/// Six nodes, each holding one segment of each of 2 PGs (slot i of every
/// PG on node i + 1), some of them down.
struct Fake {
    segs: HashMap<(u64, u32), FakeSegment>,
    down: Vec<u64>,
}

/// Both PGs on nodes 1..=6, as a cluster file would place them.
fn placement() -> Vec<Membership> {
    let members: Vec<Member> = (1..=6)
        .map(|id| Member {
            id,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        })
        .collect();
    vec![Membership::single(1, members.clone()), Membership::single(1, members)]
}

impl Fake {
    /// A writer recovered after VDL 6 commits one transaction, LSNs `n`
    /// (no CPL) and `n + 1`, on `nodes`, and raises the PGMRPL to `n + 1`
    /// there.
    fn writer_commits_one_txn(&mut self, n: u64, nodes: std::ops::RangeInclusive<u64>) {
        let record = |lsn: u64, prev: u64, cpl: bool| RedoRecord {
            prev_lsn_pg: prev,
            cpl,
            ..history(lsn)
        };
        let odd_first = n % 2 == 1;
        let txn = [
            record(n, if odd_first { 5 } else { 6 }, false),
            record(n + 1, if odd_first { 6 } else { 5 }, true),
        ];
        for node in nodes {
            for r in &txn {
                self.segs
                    .get_mut(&(node, r.segment.pg))
                    .unwrap()
                    .put(std::slice::from_ref(r));
            }
            for pg in 0..2u32 {
                self.segs.get_mut(&(node, pg)).unwrap().pgmrpl = n + 1;
            }
        }
    }

    /// Every node holds a segment of each PG at epoch 1 with the volume's
    /// history up to `upto(node)`, and `pgmrpl(node)` as its PGMRPL.
    fn holding(upto: impl Fn(u64) -> u64, pgmrpl: impl Fn(u64) -> u64) -> Fake {
        let mut segs = HashMap::new();
        for node in 1..=6u64 {
            for pg in 0..2u32 {
                let mut s = FakeSegment::new(pg, 1);
                s.pgmrpl = pgmrpl(node);
                let mine: Vec<RedoRecord> = (1..=upto(node)).map(history).filter(|r| r.segment.pg == pg).collect();
                s.put(&mine);
                segs.insert((node, pg), s);
            }
        }
        Fake { segs, down: vec![] }
    }

    fn answer(&mut self, node: u64, msg: Message) -> Message {
        let unknown = || Message::error(ErrorCode::UnknownSegment, 0, "no such segment");
        match msg {
            Message::GetSegmentStatus { pg, .. } => match self.segs.get(&(node, pg)) {
                Some(s) => s.status(pg),
                None => unknown(),
            },
            Message::Seal { pg, epoch, .. } => {
                let s = self.segs.entry((node, pg)).or_insert_with(|| {
                    let mut s = FakeSegment::new(pg, epoch);
                    s.seg.restore_epochs(epoch, 0, &[]);
                    s
                });
                match s.seg.seal(epoch) {
                    Ok(_) => s.status(pg),
                    Err(e) => Message::error(ErrorCode::StaleEpoch, s.seg.epoch(), e.to_string()),
                }
            }
            Message::ReadRecords { pg, after, .. } => {
                let s = &self.segs[&(node, pg)];
                let records = s.seg.chain_after(after).map(|(l, _)| s.bodies[&l].clone()).collect();
                Message::Records {
                    volume: VOLUME,
                    pg,
                    scl: s.seg.scl(),
                    records,
                }
            }
            Message::Truncate { pg, epoch, ranges, .. } => match self.segs.get_mut(&(node, pg)) {
                Some(s) => {
                    for (lsn, _) in s.seg.truncate(epoch, &ranges).unwrap() {
                        s.bodies.remove(&lsn);
                    }
                    s.status(pg)
                }
                None => unknown(),
            },
            Message::Append { pg, epoch, records, .. } => {
                let s = self.segs.get_mut(&(node, pg)).unwrap();
                if let Err(e) = s.seg.check_epoch(epoch) {
                    return Message::error(ErrorCode::EpochNotInstalled, 0, e.to_string());
                }
                s.put(&records.into_iter().map(WireRecord::into_record).collect::<Vec<_>>());
                Message::AppendAck {
                    volume: VOLUME,
                    pg,
                    scl: s.seg.scl(),
                    incarnation: s.incarnation,
                }
            }
            Message::SetMembership { pg, membership, .. } => match self.segs.get_mut(&(node, pg)) {
                Some(s) => {
                    if membership.rejoins(node, s.membership.as_ref()) && s.seg.records_held() > 0 {
                        // A node rejoining the PG drops what it held.
                        for (lsn, _) in s.seg.annul(&[(1, s.seg.highest_lsn())]) {
                            s.bodies.remove(&lsn);
                        }
                    }
                    s.membership = Some(membership);
                    s.status(pg)
                }
                None => unknown(),
            },
            other => panic!("recovery sent {other:?}"),
        }
    }

    /// Run a recovery with only `up` reachable for 100 rounds, whether it
    /// ends or not; requests for which `deliver` says false are lost.
    fn partial_recovery(&mut self, up: &[u64], deliver: impl Fn(u64, &Message) -> bool) -> Recovery {
        let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
        for &node in up {
            r.node_up(node);
        }
        let mut out = Vec::new();
        for _ in 0..100 {
            r.take_outputs(&mut out);
            if out.is_empty() {
                r.tick();
                r.take_outputs(&mut out);
            }
            for (node, request, msg) in out.drain(..) {
                if deliver(node, &msg) {
                    let reply = self.answer(node, msg);
                    r.on_reply(node, request, reply);
                }
            }
        }
        r
    }

    /// Run recovery to the end with the nodes in `down` unreachable.
    fn recover(&mut self) -> Recovered {
        let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
        for node in 1..=8 {
            if !self.down.contains(&node) {
                r.node_up(node);
            }
        }
        let mut out = Vec::new();
        let mut requests_through = 0;
        for _ in 0..1000 {
            r.take_outputs(&mut out);
            if out.is_empty() {
                r.tick();
                r.take_outputs(&mut out);
            }
            // The highest node answers first.
            for (node, request, msg) in out.drain(..).rev() {
                requests_through = requests_through.max(request);
                let reply = self.answer(node, msg);
                r.on_reply(node, request, reply);
            }
            if let Some(done) = r.recovered() {
                assert!(
                    done.next_request > requests_through,
                    "the writer's request ids start above recovery's"
                );
                return done;
            }
            assert!(r.failed().is_none(), "{:?}", r.failed());
        }
        panic!("recovery did not finish: {}", r.progress());
    }
}

/// Record `lsn` of the volume's history: odd LSNs go to PG 0, even to PG 1,
/// every even LSN closes a transaction (so a transaction spans both PGs).
fn history(lsn: u64) -> RedoRecord {
    let pg = if lsn % 2 == 1 { 0 } else { 1 };
    RedoRecord {
        segment: SegmentId { volume: VOLUME, pg },
        lsn,
        prev_lsn_pg: lsn.saturating_sub(2),
        prev_lsn_page: 0,
        page: u64::from(pg) * PG_PAGES,
        cpl: lsn % 2 == 0,
        body: RecordBody::PageDelta {
            offset: 0,
            bytes: lsn.to_le_bytes().to_vec(),
        },
    }
}

#[test]
fn a_fresh_volume_starts_at_epoch_1_and_lsn_1() {
    let mut f = Fake {
        segs: HashMap::new(),
        down: vec![6],
    };
    let r = f.recover();
    assert_eq!((r.epoch, r.vdl, r.next_lsn), (1, 0, 1));
    assert!(r.annulled.is_empty());
    // The seals created the segments; the truncation installed epoch 1.
    assert_eq!(f.segs.len(), 10);
    assert!(f.segs.values().all(|s| s.seg.installed_epoch() == 1));
}

/// Records 1–8 reached every segment or a write quorum (committed: the old
/// writer's VDL was 8); 9 reached one segment of PG 0, 10 two of PG 1.
/// Whatever the read quorum sees, recovery keeps every committed record,
/// stops at a CPL, annuls everything above it on a write quorum, and leaves
/// what it keeps on a write quorum of each PG.
#[test]
fn recovery_keeps_what_was_committed_and_annuls_the_rest() {
    for down in [vec![], vec![1], vec![2, 3], vec![4, 5], vec![1, 6], vec![3]] {
        let mut f = Fake {
            segs: HashMap::new(),
            down: down.clone(),
        };
        for node in 1..=6u64 {
            for pg in 0..2u32 {
                let mut s = FakeSegment::new(pg, 1);
                s.pgmrpl = 4;
                let upto = if node <= 4 { 8 } else { 6 };
                let mut mine: Vec<RedoRecord> = (1..=upto).map(history).filter(|r| r.segment.pg == pg).collect();
                if pg == 0 && node == 1 {
                    mine.push(history(9));
                }
                if pg == 1 && (node == 1 || node == 2) {
                    mine.push(history(10));
                }
                s.put(&mine);
                f.segs.insert((node, pg), s);
            }
        }
        let r = f.recover();
        assert_eq!(r.epoch, 2);
        assert!(
            r.vdl == 8 || r.vdl == 10,
            "down {down:?}: VDL {} is not a CPL at or above 8",
            r.vdl
        );
        assert!(r.next_lsn > r.vdl + LAL_MAX, "new LSNs start above the range");
        assert_eq!(r.annulled, vec![(r.vdl + 1, r.next_lsn - 1)]);
        for pg in 0..2u32 {
            let tail = r.pgs[pg as usize].tail;
            assert_eq!(tail % 2, u64::from(pg == 0), "the tail is a record of pg {pg}");
            assert!(tail <= r.vdl && tail + 2 > r.vdl);
            let holding = f
                .segs
                .iter()
                .filter(|((_, p), s)| *p == pg && s.seg.installed_epoch() == 2 && s.seg.scl() >= tail)
                .count();
            assert!(holding >= 4, "down {down:?}: pg {pg} tail {tail} on {holding} segments");
            // Nothing above the VDL is left on a truncated segment.
            for s in f.segs.values().filter(|s| s.seg.installed_epoch() == 2) {
                assert!(s.seg.highest_lsn() <= r.vdl, "down {down:?}");
            }
        }
    }
}

/// A second recovery sees the first one's range: records it annulled on a
/// segment that missed the truncation do not come back.
#[test]
fn an_earlier_truncation_is_respected_by_the_next_recovery() {
    let mut f = Fake::holding(|node| if node == 6 { 10 } else { 6 }, |_| 0);
    f.down = vec![6];
    let first = f.recover();
    assert_eq!(first.vdl, 6, "7–10 are only on node 6, which is down");
    // Node 6 comes back holding 7–10 at epoch 1, nodes 1 and 2 go down;
    // node 6 answers first, so it is in every read quorum and has the
    // highest SCL of each PG.
    f.down = vec![1, 2];
    let second = f.recover();
    assert_eq!(second.epoch, 3);
    assert_eq!(second.vdl, 6, "7–10 were annulled by the first recovery");
    assert!(second.next_lsn > first.next_lsn);
    for pg in 0..2u32 {
        let s = &f.segs[&(6, pg)];
        assert_eq!(s.seg.installed_epoch(), 3);
        assert!(s.seg.highest_lsn() <= 6);
    }
}

/// The first write quorum of truncations may hold segments that cannot be
/// caught up from here (behind the floor: what they lack is only in page
/// versions elsewhere). The segments that answered later must still be
/// truncated and counted, or recovery never ends.
#[test]
fn segments_truncated_after_the_first_quorum_count_for_replication() {
    // Nodes 5 and 6 were down for long: they hold 1–2 only, and never
    // heard of the PGMRPL (6) the others hold.
    let mut f = Fake::holding(
        |node| if node >= 5 { 2 } else { 8 },
        |node| if node >= 5 { 0 } else { 6 },
    );
    // Nodes 6, 5, 4, 3 answer the truncation first; 5 and 6 are behind the
    // floor, so only 1–4 can make the write quorum that holds the VDL.
    let r = f.recover();
    assert_eq!(r.vdl, 8);
    for pg in 0..2u32 {
        let tail = r.pgs[pg as usize].tail;
        let holding = (1..=6u64)
            .filter(|&n| {
                let s = &f.segs[&(n, pg)];
                s.seg.installed_epoch() == 2 && s.seg.scl() >= tail
            })
            .count();
        assert_eq!(holding, 4, "pg {pg}");
    }
}

/// A recovery that dies after truncating one segment leaves its range
/// there. The next recovery may not see that segment, and may keep more
/// (records that reached only the segments it reads). What it keeps must
/// not be annulled later by the dead recovery's range.
///
/// A truncation replaces the segment's ranges with the recovery's whole
/// set (this test), and a recovery takes the set of the newest epoch it
/// sees installed (the next one, where the segment keeps the dead range).
#[test]
fn a_dead_recoverys_range_does_not_annul_what_the_next_one_keeps() {
    dead_recovery_then(true);
}

#[test]
fn a_dead_recoverys_range_left_on_a_segment_is_not_used_by_a_later_recovery() {
    dead_recovery_then(false);
}

/// Recovery A dies having truncated node 1 only; B runs without node 1;
/// then node 1 returns, is caught up by B's writer if `installed` (else it
/// keeps A's epoch and range), and recovery C reads nodes 1–4.
fn dead_recovery_then(installed: bool) {
    // 1–8 everywhere; 9 and 10 reached nodes 5 and 6 only.
    let mut f = Fake::holding(|node| if node >= 5 { 10 } else { 8 }, |_| 0);
    // Recovery A sees nodes 1–4 only (VDL 8), truncates node 1, and dies.
    let a = f.partial_recovery(&[1, 2, 3, 4], |node, msg| {
        !matches!(msg, Message::Truncate { .. }) || node == 1
    });
    assert_eq!(a.vdl, 8);
    assert_eq!(f.segs[&(1, 0)].seg.installed_epoch(), 2, "A truncated node 1");
    // Recovery B runs without node 1: it keeps 9 and 10.
    f.down = vec![1];
    let b = f.recover();
    assert_eq!(b.vdl, 10);
    // Node 1 comes back; B's writer installs its epoch there (as
    // `Writer::install` does) and catches it up.
    for pg in (0..2u32).filter(|_| installed) {
        let reply = f.answer(
            1,
            Message::Truncate {
                volume: VOLUME,
                epoch: b.epoch,
                pg,
                ranges: b.annulled.clone(),
            },
        );
        assert!(matches!(reply, Message::SegmentStatus { .. }), "{reply:?}");
        let records: Vec<RedoRecord> = (9..=10).map(history).filter(|r| r.segment.pg == pg).collect();
        let reply = f.answer(
            1,
            Message::Append {
                volume: VOLUME,
                epoch: b.epoch,
                pg,
                page_bytes: PAGE_BYTES,
                pg_pages: PG_PAGES,
                membership_epoch: 0,
                records: records.into_iter().map(WireRecord::new).collect(),
            },
        );
        assert!(matches!(reply, Message::AppendAck { .. }), "{reply:?}");
    }
    // Recovery C reads nodes 1–4 (5 and 6 are down): 9 and 10, under B's
    // VDL, must stay.
    let c = f.partial_recovery(&[1, 2, 3, 4], |_, _| true);
    assert!(c.vdl >= 10, "recovery C lost B's VDL 10: VDL {}", c.vdl);
}

/// Node 6 misses the first recovery entirely (it holds 7–10, which that
/// recovery annulled), and the writer after it raises the PGMRPL past the
/// range. The next recovery sees node 6 again: the range must still be in
/// its set, or node 6 keeps the annulled records once installed.
#[test]
fn a_range_stays_while_a_segment_that_missed_it_may_hold_records_in_it() {
    let mut f = Fake::holding(|node| if node == 6 { 10 } else { 6 }, |_| 0);
    f.down = vec![6];
    let first = f.recover();
    assert_eq!(first.vdl, 6);
    let n = first.next_lsn;
    f.writer_commits_one_txn(n, 1..=5);
    f.down = vec![];
    let second = f.recover();
    assert_eq!(second.vdl, n + 1);
    for pg in 0..2u32 {
        let s = &f.segs[&(6, pg)];
        assert!(
            s.seg.highest_lsn() <= 6,
            "node 6 pg {pg} still holds annulled records at installed epoch {}",
            s.seg.installed_epoch()
        );
    }
}
/// A record of PG `pg` at `lsn` linking to `prev`, closing its transaction if `cpl`.
fn record(lsn: u64, pg: u32, prev: u64, cpl: bool) -> RedoRecord {
    RedoRecord {
        segment: SegmentId { volume: VOLUME, pg },
        lsn,
        prev_lsn_pg: prev,
        prev_lsn_page: 0,
        page: u64::from(pg) * PG_PAGES,
        cpl,
        body: RecordBody::PageDelta {
            offset: 0,
            bytes: lsn.to_le_bytes().to_vec(),
        },
    }
}

/// A PGMRPL that one segment holds is a floor for the recovery that
/// seals that segment, not for the next one, which may not: a recovery
/// must keep the earlier ranges between the two, or the next one's walk
/// from its lower floor stops at the first (the simulator's seed
/// 1592597294 lost commits so).
#[test]
fn ranges_below_a_floor_only_one_segment_holds_are_kept() {
    let mut f = Fake {
        segs: HashMap::new(),
        down: vec![],
    };
    for node in 1..=6u64 {
        for pg in 0..2u32 {
            let mut s = FakeSegment::new(pg, 1);
            s.pgmrpl = 8;
            s.put(&(1..=8).map(history).filter(|r| r.segment.pg == pg).collect::<Vec<_>>());
            f.segs.insert((node, pg), s);
        }
    }
    // Recovery A: VDL 8, range 9 up to its writer's first LSN.
    let a = f.recover();
    assert_eq!(a.vdl, 8);
    // A's writer commits 4 records on every segment, and its PGMRPL
    // reaches one segment only.
    let n = a.next_lsn;
    for node in 1..=6u64 {
        f.segs
            .get_mut(&(node, 0))
            .unwrap()
            .put(&[record(n, 0, 7, false), record(n + 2, 0, n, false)]);
        f.segs
            .get_mut(&(node, 1))
            .unwrap()
            .put(&[record(n + 1, 1, 8, false), record(n + 3, 1, n + 1, true)]);
    }
    f.segs.get_mut(&(6, 0)).unwrap().pgmrpl = n + 3;
    // Recovery B seals node 6 (it answers first): its floor is above A's range.
    let b = f.recover();
    assert_eq!(b.vdl, n + 3);
    // Recovery C does not reach node 6: its floor is 8.
    f.down = vec![6];
    let c = f.recover();
    assert_eq!(c.vdl, n + 3, "recovery C lost A's writer's commits");
}

/// Once every segment of every PG has applied a range and 3 of a PG hold a
/// PGMRPL above it, no later recovery can need it: it leaves the set.
#[test]
fn a_range_applied_everywhere_and_below_a_settled_floor_is_dropped() {
    let mut f = Fake::holding(|node| if node == 6 { 10 } else { 6 }, |_| 0);
    f.down = vec![6];
    let first = f.recover();
    assert_eq!((first.vdl, first.annulled.len()), (6, 1));
    // Node 6 returns; the writer installs the epoch there (as
    // `Writer::install` does) and commits on every node.
    for pg in 0..2u32 {
        let reply = f.answer(
            6,
            Message::Truncate {
                volume: VOLUME,
                epoch: first.epoch,
                pg,
                ranges: first.annulled.clone(),
            },
        );
        assert!(matches!(reply, Message::SegmentStatus { .. }), "{reply:?}");
    }
    let n = first.next_lsn;
    f.writer_commits_one_txn(n, 1..=6);
    f.down = vec![];
    let second = f.recover();
    assert_eq!(second.vdl, n + 1);
    assert_eq!(
        second.annulled,
        vec![(n + 2, n + 1 + LAL_MAX)],
        "the first range is gone"
    );
}

/// What becomes of a request in [`Fake::recover_with`].
enum Fate {
    Deliver,
    Lose,
    /// Answered with this in place of the segment's answer.
    Answer(Box<Message>),
}

impl Fake {
    /// Run recovery to the end with every node up; `fault` sees each
    /// request before it is delivered, may act on the nodes or the
    /// recovery (a node going down), and says what becomes of it.
    fn recover_with(&mut self, mut fault: impl FnMut(&mut Fake, &mut Recovery, u64, &Message) -> Fate) -> Recovered {
        let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
        for node in 1..=8 {
            r.node_up(node);
        }
        let mut out = Vec::new();
        for _ in 0..1000 {
            r.take_outputs(&mut out);
            if out.is_empty() {
                r.tick();
                r.take_outputs(&mut out);
            }
            for (node, request, msg) in out.drain(..) {
                if self.down.contains(&node) {
                    continue;
                }
                let reply = match fault(self, &mut r, node, &msg) {
                    Fate::Deliver => self.answer(node, msg),
                    Fate::Lose => continue,
                    Fate::Answer(m) => *m,
                };
                r.on_reply(node, request, reply);
            }
            if let Some(done) = r.recovered() {
                return done;
            }
            assert!(r.failed().is_none(), "{:?}", r.failed());
        }
        panic!("recovery did not finish: {}", r.progress());
    }
}

/// The segment recovery reads a PG's chain from dies after its seal, as it
/// is asked for the chain: the read moves to another sealed segment that
/// holds every record that can have been committed, and recovery ends.
#[test]
fn recovery_reads_another_segment_when_its_source_dies() {
    // 1–8 everywhere (committed); 9 and 10 on node 1 only: it has the
    // highest SCL of both PGs.
    let mut f = Fake::holding(|node| if node == 1 { 10 } else { 8 }, |_| 0);
    let r = f.recover_with(|f, r, node, msg| {
        if node == 1 && matches!(msg, Message::ReadRecords { .. }) {
            f.down.push(1);
            r.node_down(1);
            return Fate::Lose;
        }
        Fate::Deliver
    });
    assert_eq!(r.vdl, 8, "what nodes 2-6 hold, all of it committed");
    for pg in 0..2u32 {
        let holding = (2..=6u64)
            .filter(|&n| {
                f.segs[&(n, pg)].seg.installed_epoch() == 2 && f.segs[&(n, pg)].seg.scl() >= r.pgs[pg as usize].tail
            })
            .count();
        assert!(holding >= 4, "pg {pg}");
    }
}

/// A source that answers with less than its seal said (it restarted and
/// found records lost, or its disk was replaced) may lack committed
/// records: another segment's chain is read instead, and nothing that was
/// committed is annulled.
#[test]
fn recovery_does_not_read_from_a_source_that_lost_records_since_its_seal() {
    let mut f = Fake::holding(|node| if node == 1 { 10 } else { 8 }, |_| 0);
    let mut lost = false;
    let r = f.recover_with(|f, _, node, msg| {
        if node == 1 && matches!(msg, Message::ReadRecords { .. }) && !lost {
            // Node 1 comes back from a restart with 1-4 only.
            lost = true;
            for pg in 0..2u32 {
                let mut s = FakeSegment::new(pg, 2);
                s.incarnation = 2;
                s.put(&(1..=4).map(history).filter(|r| r.segment.pg == pg).collect::<Vec<_>>());
                f.segs.insert((1, pg), s);
            }
        }
        Fate::Deliver
    });
    assert!(lost);
    assert_eq!(r.vdl, 8, "1-8 were committed");
}

/// A source that refuses every time is not waited on: another segment
/// that can serve is asked.
#[test]
fn recovery_asks_another_source_after_a_refusal() {
    let mut f = Fake::holding(|node| if node == 1 { 10 } else { 8 }, |_| 0);
    let mut refused = 0;
    let r = f.recover_with(|_, _, node, msg| {
        if node == 1 && matches!(msg, Message::ReadRecords { .. }) {
            refused += 1;
            return Fate::Answer(Box::new(Message::error(ErrorCode::Internal, 0, "a fault")));
        }
        Fate::Deliver
    });
    assert_eq!(r.vdl, 8);
    assert!(refused >= 1);
}

/// The only sealed segments that can serve a PG's chain die; the segments
/// that were down at the seal come back. They are sealed while chains are
/// read, and with 6 sealed, segments with a lower SCL can serve.
#[test]
fn segments_sealed_while_chains_are_read_can_serve() {
    // 1-8 everywhere (committed); 9 and 10 on nodes 5 and 6 only.
    let mut f = Fake::holding(|node| if node >= 5 { 10 } else { 8 }, |_| 0);
    // Nodes 1 and 2 miss the seals: with 3-6 sealed, only 5 and 6 (the 2
    // highest of 4) are known to hold every committed record.
    f.down = vec![1, 2];
    let mut died = false;
    let r = f.recover_with(|f, r, node, msg| {
        if matches!(msg, Message::ReadRecords { .. }) && node >= 5 && !died {
            died = true;
            f.down = vec![5, 6];
            r.node_down(5);
            r.node_down(6);
            return Fate::Lose;
        }
        Fate::Deliver
    });
    assert!(died);
    assert_eq!(r.vdl, 8);
}

/// Recovery's write quorum needs a segment behind the floor (what it lacks
/// is only in its peers): gossip repair catches it up with no answer to
/// recovery, so recovery tells it the PG's membership (it had none) and
/// asks its status now and then, and ends once it holds the chain.
#[test]
fn a_segment_behind_the_floor_repaired_by_its_peers_completes_recovery() {
    let mut f = Fake::holding(
        |node| if node == 4 { 0 } else { 10 },
        |node| if node == 4 { 0 } else { 10 },
    );
    let up = [1, 2, 3, 4];
    let mut r = f.partial_recovery(&up, |_, _| true);
    assert!(r.recovered().is_none(), "3 segments hold the chain: {}", r.progress());
    // Its gossip runs only with the PG's membership, which the writer that
    // would send it waits for this recovery: recovery tells it.
    for pg in 0..2u32 {
        assert_eq!(
            f.segs[&(4, pg)].membership.as_ref(),
            Some(&placement()[pg as usize]),
            "pg {pg}"
        );
    }
    // Gossip repair: node 4 pulls every record from its peers.
    for pg in 0..2u32 {
        let mine: Vec<RedoRecord> = (1..=10).map(history).filter(|x| x.segment.pg == pg).collect();
        f.segs.get_mut(&(4, pg)).unwrap().put(&mine);
    }
    let mut out = Vec::new();
    for _ in 0..100 {
        r.take_outputs(&mut out);
        if out.is_empty() {
            r.tick();
            r.take_outputs(&mut out);
        }
        for (node, request, msg) in out.drain(..) {
            let reply = f.answer(node, msg);
            r.on_reply(node, request, reply);
        }
        if r.recovered().is_some() {
            break;
        }
    }
    let done = r
        .recovered()
        .unwrap_or_else(|| panic!("recovery did not finish: {}", r.progress()));
    assert_eq!(done.vdl, 10);
}

/// Node `id` as a member (the address `placement` gives it).
fn node(id: u64) -> Member {
    Member {
        id,
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
    }
}

/// Replacing node 6 by node 7 half-way, at membership epoch 2: the old set
/// 1–6 and the new set 1–5, 7.
fn dual() -> Membership {
    crate::membership::plan(
        0,
        &placement()[0],
        &crate::membership::Change::Replace { old: 6, new: node(7) },
    )
    .unwrap()
}

impl Fake {
    /// The segments on `nodes` hold the membership the cluster file places,
    /// as the first writer told it.
    fn placed(&mut self, nodes: impl IntoIterator<Item = u64>) {
        for node in nodes {
            for pg in 0..2u32 {
                self.segs.get_mut(&(node, pg)).unwrap().membership = Some(placement()[pg as usize].clone());
            }
        }
    }

    /// Every PG's segment on `node` holds `m` and the volume's history up
    /// to `upto` (created if the node held none).
    fn told(&mut self, node: u64, m: &Membership, upto: u64) {
        for pg in 0..2u32 {
            let s = self.segs.entry((node, pg)).or_insert_with(|| FakeSegment::new(pg, 1));
            let have = s.seg.scl();
            let mine: Vec<RedoRecord> = (have + 1..=upto).map(history).filter(|r| r.segment.pg == pg).collect();
            s.put(&mine);
            s.membership = Some(m.clone());
        }
    }

    /// Deliver what `r` asks of the nodes in `up` for `rounds` rounds
    /// (ticking when it asks nothing); what it asks of others is lost.
    fn pump(&mut self, r: &mut Recovery, up: &[u64], rounds: usize, mut seen: impl FnMut(u64, &Message)) {
        let mut out = Vec::new();
        for _ in 0..rounds {
            r.take_outputs(&mut out);
            if out.is_empty() {
                r.tick();
                r.take_outputs(&mut out);
            }
            for (node, request, msg) in out.drain(..) {
                seen(node, &msg);
                if up.contains(&node) {
                    let reply = self.answer(node, msg);
                    r.on_reply(node, request, reply);
                }
            }
            if r.recovered().is_some() {
                return;
            }
        }
    }
}

/// `r` finished at VDL `vdl` with every PG at membership `m`, each PG's
/// tail on a write quorum of every set of it.
fn recovered_at(r: &Recovery, f: &Fake, m: &Membership, vdl: u64) -> Recovered {
    let done = r
        .recovered()
        .unwrap_or_else(|| panic!("recovery did not finish: {}", r.progress()));
    assert_eq!(done.vdl, vdl);
    for pg in 0..2 {
        assert_eq!(done.pgs[pg].membership, *m, "pg {pg}");
        let tail = done.pgs[pg].tail;
        assert!(
            on_write_quorum_of_every_set(f, m, done.epoch, pg as u32, tail),
            "pg {pg}: tail {tail} is not on a write quorum of every set"
        );
    }
    done
}

/// The tail of PG `pg` is on a write quorum of every set of `m` (at the
/// recovery's epoch).
fn on_write_quorum_of_every_set(f: &Fake, m: &Membership, epoch: u64, pg: u32, tail: u64) -> bool {
    crate::membership::on_write_quorum(m, |id| {
        f.segs
            .get(&(id, pg))
            .is_some_and(|s| s.seg.installed_epoch() == epoch && s.seg.scl() >= tail)
    })
}

/// A probe that shows a dual membership on some segments adopts it and
/// goes on until a read quorum of *both* sets has answered: 3 answers of
/// the old set are not enough, nothing is sealed before. The seal then
/// needs a write quorum of both sets too, and the recovered membership is
/// the dual one.
#[test]
fn a_dual_membership_seen_in_the_probe_needs_a_read_quorum_of_both_sets() {
    let mut f = Fake::holding(|_| 8, |_| 0);
    let m = dual();
    for n in [1, 2, 3, 4, 7] {
        f.told(n, &m, 8);
    }
    let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
    // 1, 2 and 6: a read quorum of the old set, 2 of the new one.
    let mut up = vec![1, 2, 6];
    for &n in &up {
        r.node_up(n);
    }
    let mut sealed = false;
    f.pump(&mut r, &up, 50, |_, msg| sealed |= matches!(msg, Message::Seal { .. }));
    assert!(!sealed, "sealed with a read quorum of the old set only");
    assert!(r.progress().starts_with("probing"), "{}", r.progress());
    // 3 answers of the new set: sealing starts, and needs 4 of each set.
    up.push(3);
    r.node_up(3);
    f.pump(&mut r, &up, 50, |_, msg| sealed |= matches!(msg, Message::Seal { .. }));
    assert!(sealed);
    assert!(
        r.recovered().is_none(),
        "4 of the old set sealed, 3 of the new: {}",
        r.progress()
    );
    up.push(7);
    r.node_up(7);
    f.pump(&mut r, &up, 200, |_, _| {});
    let done = recovered_at(&r, &f, &m, 8);
    for pg in 0..2 {
        assert_eq!(done.pgs[pg].scls.len(), 7, "an SCL for each member of either set");
    }
}

/// A step a writer sent to one segment only (never in force) is adopted
/// when the probe sees it, though no read quorum shows it, and the
/// recovered membership says so: the writer goes on from it.
#[test]
fn a_membership_seen_on_one_segment_is_adopted_and_reported() {
    let mut f = Fake::holding(|_| 8, |_| 0);
    let m = dual();
    // Only node 1 (which answers first) has it, and only for PG 0.
    f.told(1, &m, 8);
    f.segs.get_mut(&(1, 1)).unwrap().membership = None;
    let r = f.recover_with(|_, _, _, _| Fate::Deliver);
    assert_eq!(r.vdl, 8);
    assert_eq!(r.pgs[0].membership, m);
    assert_eq!(r.pgs[1].membership, placement()[1], "PG 1 never changed");
    // Node 7 joins as a member: sealed and truncated with the others, and
    // counted in the write quorum of the new set.
    assert_eq!(f.segs[&(7, 0)].seg.installed_epoch(), r.epoch);
    assert!(!f.segs.contains_key(&(7, 1)), "PG 1 has nothing on node 7");
    assert!(on_write_quorum_of_every_set(&f, &m, r.epoch, 0, r.pgs[0].tail));
}

/// Records 7–10 were committed while the PG was dual: on 4 of each set
/// (3, 4, 5 and 6 of the old, 3, 4, 5 and 7 of the new), 1 and 2 missed
/// them. Whichever two nodes are down (a write quorum of each set is up),
/// recovery keeps them, even when it reads only 3 of the new set at first.
#[test]
fn writes_committed_by_a_dual_quorum_survive_a_recovery() {
    for down in [vec![1, 2], vec![6, 7], vec![1, 7], vec![2, 6], vec![3], vec![]] {
        let mut f = Fake::holding(|n| if n <= 2 { 6 } else { 10 }, |_| 0);
        let m = dual();
        for n in 1..=6 {
            let upto = f.segs[&(n, 0)].seg.scl();
            f.told(n, &m, upto);
        }
        f.told(7, &m, 10);
        f.down = down.clone();
        let r = f.recover();
        assert_eq!(r.vdl, 10, "down {down:?}");
        for pg in 0..2u32 {
            assert_eq!(r.pgs[pg as usize].membership, m);
            let tail = r.pgs[pg as usize].tail;
            assert!(
                on_write_quorum_of_every_set(&f, &m, r.epoch, pg, tail),
                "down {down:?}: pg {pg} tail {tail} is not on 4 of each set"
            );
        }
    }
}

/// Records 5–8 were committed before the change, on 1, 2, 3 and 6 (a
/// write quorum of the old set; 4 and 5 hold 1–4): the new set (1–5, 7)
/// holds them on only 3. Nodes 1 and 2 die as they are asked for the
/// chain, 3 and 6 refuse once each: 4 and 5 must not serve as the source
/// (they lack committed records); 3 or 6 is asked again.
#[test]
fn a_lagging_new_set_does_not_lower_the_bar_for_a_chain_source() {
    let mut f = Fake::holding(|n| if n == 4 || n == 5 { 4 } else { 8 }, |_| 0);
    let m = dual();
    for n in 1..=6 {
        let upto = f.segs[&(n, 0)].seg.scl();
        f.told(n, &m, upto);
    }
    f.told(7, &m, 0);
    let mut refused = Vec::new();
    let r = f.recover_with(|f, r, node, msg| {
        if !matches!(msg, Message::ReadRecords { .. }) {
            return Fate::Deliver;
        }
        if node <= 2 {
            f.down.push(node);
            r.node_down(node);
            return Fate::Lose;
        }
        if (node == 3 || node == 6) && !refused.contains(&node) {
            refused.push(node);
            return Fate::Answer(Box::new(Message::error(ErrorCode::Internal, 0, "a fault")));
        }
        Fate::Deliver
    });
    assert_eq!(r.vdl, 8, "1-8 were committed");
}

/// Each PG moved off four of the nodes the cluster file places it on (3–6
/// replaced by 7–10, one change after another, while 1 and 2 were down:
/// they still hold the placement), and those four are gone: only 2 of the
/// placement answer, fewer than a read quorum of it, and neither knows of
/// the changes. The nodes the PG moved to are asked too, and the
/// membership they hold is adopted; recovery then needs a read quorum of
/// it, not of the placement, and ends with the committed records on a
/// write quorum of it.
#[test]
fn a_pg_moved_off_most_of_its_placement_is_found_on_the_nodes_it_moved_to() {
    let mut m = placement()[0].clone();
    for (old, new) in [(3, 7), (4, 8), (5, 9), (6, 10)] {
        m = crate::membership::finish(
            &crate::membership::plan(0, &m, &crate::membership::Change::Replace { old, new: node(new) }).unwrap(),
        );
    }
    let mut f = Fake::holding(|_| 8, |_| 0);
    f.placed([1, 2]);
    for n in [7, 8, 9, 10] {
        f.told(n, &m, 8);
    }
    let up = [1, 2, 7, 8, 9, 10];
    let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
    for &n in &up {
        r.node_up(n);
    }
    f.pump(&mut r, &up, 300, |_, _| {});
    recovered_at(&r, &f, &m, 8);
}

/// A node asked outside the membership that holds an older one (a member
/// replaced long ago, still up with its segment) or no segment changes
/// nothing: the membership the members hold is the one recovered, and the
/// node is sent nothing but the probe.
#[test]
fn a_node_outside_the_membership_with_an_older_one_changes_nothing() {
    let m = crate::membership::finish(&dual());
    let mut f = Fake::holding(|_| 8, |_| 0);
    for n in [1, 2, 3, 4, 5, 7] {
        f.told(n, &m, 8);
    }
    // Node 6 keeps the placement's membership (epoch 1); node 8 holds nothing.
    f.placed([6]);
    let up = [1, 2, 3, 4, 5, 6, 7, 8];
    let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
    for &n in &up {
        r.node_up(n);
    }
    let mut sent_outside = Vec::new();
    f.pump(&mut r, &up, 300, |node, msg| {
        if node == 8 || node == 6 {
            sent_outside.push((node, msg.kind()));
        }
    });
    recovered_at(&r, &f, &m, 8);
    assert!(
        sent_outside
            .iter()
            .all(|(_, k)| *k == storaged::proto::MessageType::GetSegmentStatus),
        "{sent_outside:?}"
    );
    assert!(
        !f.segs.contains_key(&(8, 0)),
        "no segment made on a node outside the membership"
    );
}

/// Every member the cluster file places was replaced (1–6 by 7–12), and
/// records 9–12 were committed since, on the new members only. The old
/// members come back holding the placement's membership and records 1–8:
/// a read quorum of the placement, which shows nothing newer. The new
/// members' answers come a round later; the probe waits for them, adopts
/// their membership, and keeps 9–12.
#[test]
fn replaced_members_back_with_the_placement_do_not_hide_the_membership_in_force() {
    let mut m = placement()[0].clone();
    for old in 1..=6 {
        let change = crate::membership::Change::Replace {
            old,
            new: node(old + 6),
        };
        m = crate::membership::finish(&crate::membership::plan(0, &m, &change).unwrap());
    }
    let mut f = Fake::holding(|_| 8, |_| 0);
    f.placed(1..=6);
    for n in 7..=12 {
        f.told(n, &m, 12);
    }
    let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
    for n in 1..=12 {
        r.node_up(n);
    }
    // What goes to 7–12 is answered one round late.
    let (mut out, mut late) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        r.take_outputs(&mut out);
        if out.is_empty() && late.is_empty() {
            r.tick();
            r.take_outputs(&mut out);
        }
        let due = std::mem::take(&mut late);
        for (node, request, msg) in out.drain(..) {
            if node > 6 {
                late.push((node, request, msg));
            } else {
                let reply = f.answer(node, msg);
                r.on_reply(node, request, reply);
            }
        }
        for (node, request, msg) in due {
            let reply = f.answer(node, msg);
            r.on_reply(node, request, reply);
        }
        if r.recovered().is_some() {
            break;
        }
    }
    // Records 9–12, committed under the newer membership, are kept.
    recovered_at(&r, &f, &m, 12);
}

/// A node the membership adds, holding a segment of the PG from before (no
/// membership, or one it was out of since), drops what it holds when told
/// (it rejoins the PG). Recovery tells it before it counts it, and counts it
/// for what it holds then: here nodes 4 and 5 are down, so the new set's
/// write quorum needs node 7, which recovery fills again.
#[test]
fn a_node_the_membership_adds_counts_only_once_told_for_what_it_holds_then() {
    let mut f = Fake::holding(|_| 10, |_| 0);
    let m = dual();
    for n in 1..=6 {
        f.told(n, &m, 10);
    }
    for pg in 0..2u32 {
        let mut s = FakeSegment::new(pg, 1);
        s.put(&(1..=10).map(history).filter(|r| r.segment.pg == pg).collect::<Vec<_>>());
        f.segs.insert((7, pg), s);
    }
    f.down = vec![4, 5];
    let done = f.recover();
    assert_eq!(done.vdl, 10);
    let seven = m.members.iter().position(|x| x.id == 7).unwrap();
    for pg in 0..2u32 {
        let s = &f.segs[&(7, pg)];
        assert_eq!(s.membership.as_ref(), Some(&m), "pg {pg}: told before counted");
        assert_eq!(done.pgs[pg as usize].scls[seven], s.seg.scl(), "pg {pg}");
        let tail = done.pgs[pg as usize].tail;
        assert!(on_write_quorum_of_every_set(&f, &m, done.epoch, pg, tail), "pg {pg}");
    }
}

/// Every member the cluster file places is replaced (1–6 by 7–12), each
/// step taken on no more than it must be: a write quorum of every set of
/// the membership in force, chosen among the newest nodes, so the old
/// members hold as little as they can. Then the new members are down and
/// the old ones up. They are a read quorum of the placement, but not of
/// what they hold: the highest membership among them always needs a node
/// that is down, since the step above it is on a write quorum of it. The
/// recovery waits rather than read the PG at a membership it left.
#[test]
fn replaced_members_back_alone_never_recover_the_pg_at_a_membership_it_left() {
    let mut m = placement()[0].clone();
    // The membership each node holds, as the steps reach it.
    let mut held: BTreeMap<u64, Membership> = (1..=6).map(|n| (n, m.clone())).collect();
    for old in 1..=6 {
        let dual = crate::membership::plan(
            0,
            &m,
            &crate::membership::Change::Replace {
                old,
                new: node(old + 6),
            },
        )
        .unwrap();
        let single = crate::membership::finish(&dual);
        for (in_force, step) in [(m.clone(), dual.clone()), (dual, single.clone())] {
            for set in crate::membership::sets(&in_force) {
                let mut newest = set.clone();
                newest.sort_unstable_by(|a, b| b.cmp(a));
                for &n in newest.iter().take(crate::cluster::WRITE_QUORUM) {
                    held.insert(n, step.clone());
                }
            }
        }
        m = single;
    }
    // What the old members hold still shows more than one membership: the
    // steps did reach them.
    assert!((1..=6).any(|n| held[&n].epoch > placement()[0].epoch));
    let mut f = Fake::holding(|_| 8, |_| 0);
    for (&n, hm) in &held {
        f.told(n, hm, if n > 6 { 12 } else { 8 });
    }
    let up: Vec<u64> = (1..=6).collect();
    let mut r = Recovery::new(VOLUME, PAGE_BYTES, PG_PAGES, placement());
    for &n in &up {
        r.node_up(n);
    }
    f.pump(&mut r, &up, 300, |_, _| {});
    assert!(
        r.recovered().is_none(),
        "recovered with the new members down: {:?}",
        r.recovered()
            .map(|d| d.pgs.iter().map(|p| p.membership.epoch).collect::<Vec<_>>())
    );
    // Once the new members are back, it recovers at the membership in force
    // and keeps what was committed under it.
    let all: Vec<u64> = (1..=12).collect();
    for n in 7..=12 {
        r.node_up(n);
    }
    f.pump(&mut r, &all, 300, |_, _| {});
    recovered_at(&r, &f, &m, 12);
}
