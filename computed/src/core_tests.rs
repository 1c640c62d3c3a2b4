//! Unit tests of the writer core: the commit path step by step.

use super::*;

const PAGE: usize = 4096;

fn config() -> WriterConfig {
    WriterConfig {
        volume: 1,
        epoch: 1,
        page_bytes: PAGE,
        pg_pages: 100,
        memberships: vec![membership([1, 2, 3, 4, 5, 6]), membership([2, 3, 4, 5, 6, 1])],
        lal: 8,
        txn_writes_max: 4,
        waiting_txns_max: 2,
        batch_bytes_max: 1 << 20,
        segment_batches_inflight_max: 2,
        segment_inflight_bytes_max: 1 << 20,
        pg_held_bytes_max: 1 << 20,
        page_cache_pages_max: 100,
        reads_inflight_max: 10,
        read_hedge_after_us: 1000,
        resend_after_us: None,
        retry_after_us: 100,
        status_ask_us: 10_000,
        annulled: Vec::new(),
    }
}

/// A PG's membership at the placement's epoch, node `n` at port 7100 + n.
fn membership(nodes: [u64; 6]) -> Membership {
    let members = nodes
        .iter()
        .map(|&id| storaged::membership::Member {
            id,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7100 + id as u16)),
        })
        .collect();
    Membership::single(1, members)
}

fn writer() -> Writer<u32> {
    let mut w = Writer::new(config(), 0);
    for n in 1..=6 {
        w.node_up(n);
    }
    w
}

fn delta(page: u64, byte: u8) -> PageWrite {
    PageWrite::Range {
        page,
        offset: 0,
        bytes: vec![byte; 4],
    }
}

fn outputs(w: &mut Writer<u32>) -> Vec<Output<u32>> {
    let mut out = Vec::new();
    w.take_outputs(&mut out);
    out
}

/// (node, request, pg, first lsn, last lsn) of every Append.
fn appends(out: &[Output<u32>]) -> Vec<(u64, u64, u32, u64, u64)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Append {
                node,
                request,
                pg,
                records,
                ..
            } => Some((*node, *request, *pg, records[0].lsn, records.last().unwrap().lsn)),
            _ => None,
        })
        .collect()
}

fn commits(out: &[Output<u32>]) -> Vec<(u32, u64)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Committed { token, lsn } => Some((*token, *lsn)),
            _ => None,
        })
        .collect()
}

/// Every node's incarnation in these tests, unless one restarts.
const INCARNATION: u64 = 77;

fn ack(w: &mut Writer<u32>, node: u64, request: u64, pg: u32, scl: u64) {
    ack_from(w, node, request, pg, scl, INCARNATION);
}

fn ack_from(w: &mut Writer<u32>, node: u64, request: u64, pg: u32, scl: u64, incarnation: u64) {
    let ack = Message::AppendAck {
        volume: 1,
        pg,
        scl,
        incarnation,
    };
    w.on_reply(node, request, ack);
}

#[test]
fn a_commit_is_acknowledged_at_the_fourth_ack_not_before() {
    let mut w = writer();
    w.submit(7, vec![delta(1, 1), delta(2, 1)]).unwrap();
    let out = outputs(&mut w);
    let sends = appends(&out);
    assert_eq!(sends.len(), 6, "one batch to each segment");
    assert!(sends.iter().all(|s| (s.3, s.4) == (1, 2)));
    for (i, (node, req, pg, _, last)) in sends.iter().enumerate() {
        ack(&mut w, *node, *req, *pg, *last);
        let c = commits(&outputs(&mut w));
        if i < 3 {
            assert!(c.is_empty(), "acked after {} segments", i + 1);
            assert_eq!(w.vdl(), 0);
        } else if i == 3 {
            assert_eq!(c, vec![(7, 2)]);
            assert_eq!(w.vdl(), 2);
        } else {
            assert!(c.is_empty(), "acknowledged twice");
        }
    }
}

#[test]
fn the_vdl_waits_for_every_pg_and_stops_at_a_cpl() {
    let mut w = writer();
    // Txn 1: page 1 (PG 0) and page 150 (PG 1); txn 2: page 2 (PG 0).
    w.submit(1, vec![delta(1, 1), delta(150, 1)]).unwrap();
    w.submit(2, vec![delta(2, 1)]).unwrap();
    let out = outputs(&mut w);
    // PG 0 gets LSNs 1 and 3 (one batch), PG 1 gets LSN 2.
    for (node, req, pg, _, last) in appends(&out) {
        if pg == 0 {
            ack(&mut w, node, req, pg, last);
        }
    }
    assert_eq!(w.pgcl(0), 3);
    assert_eq!(w.vcl(), 1, "LSN 2 (PG 1) is not at quorum");
    assert_eq!(w.vdl(), 0, "LSN 1 is not a CPL");
    assert!(commits(&outputs(&mut w)).is_empty());
    for (node, req, pg, _, last) in appends(&out) {
        if pg == 1 {
            ack(&mut w, node, req, pg, last);
        }
    }
    assert_eq!(commits(&outputs(&mut w)), vec![(1, 2), (2, 3)], "one pass, in order");
}

#[test]
fn records_queued_while_the_window_is_full_ride_along() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let first = appends(&outputs(&mut w));
    w.submit(2, vec![delta(1, 2)]).unwrap();
    let second = appends(&outputs(&mut w));
    assert_eq!(second.len(), 6, "window of 2: a second batch goes at once");
    for i in 3..=5 {
        w.submit(i, vec![delta(1, i as u8)]).unwrap();
    }
    assert!(appends(&outputs(&mut w)).is_empty(), "window full: nothing sent");
    // One ack frees one slot of one segment: LSNs 3..=5 go in one batch.
    let (node, req, pg, _, last) = first[0];
    ack(&mut w, node, req, pg, last);
    let third = appends(&outputs(&mut w));
    assert_eq!(third.len(), 1);
    assert_eq!((third[0].0, third[0].3, third[0].4), (node, 3, 5));
    let _ = second;
}

#[test]
fn the_lal_makes_transactions_wait_and_then_go() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1), delta(2, 1), delta(3, 1), delta(4, 1)])
        .unwrap();
    w.submit(2, vec![delta(1, 2), delta(2, 2), delta(3, 2), delta(4, 2)])
        .unwrap();
    assert_eq!(w.allocated_through(), 8);
    w.submit(3, vec![delta(5, 3)]).unwrap();
    assert_eq!(w.allocated_through(), 8, "LSN 9 would pass VDL 0 + LAL 8");
    assert_eq!(w.waiting_txns(), 1);
    w.submit(4, vec![delta(5, 4)]).unwrap();
    assert_eq!(w.submit(5, vec![delta(5, 5)]), Err(TxnError::Busy));
    assert!(!w.accepting());
    let out = outputs(&mut w);
    // One batch of LSNs 1..=8; the segments have made 1..=4 durable so far.
    for (node, req, pg, _, _) in appends(&out) {
        ack(&mut w, node, req, pg, 4);
    }
    assert_eq!(w.vdl(), 4);
    assert_eq!(w.allocated_through(), 10, "both waiting transactions got LSNs");
    assert!(w.accepting());
}

#[test]
fn a_segment_back_from_a_drop_is_sent_what_it_missed() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let first = appends(&outputs(&mut w));
    w.node_down(6);
    for &(node, req, pg, _, last) in &first {
        if node != 6 {
            ack(&mut w, node, req, pg, last);
        }
    }
    w.submit(2, vec![delta(1, 2)]).unwrap();
    let second = appends(&outputs(&mut w));
    assert_eq!(second.len(), 5, "nothing to a segment that is down");
    assert_eq!(w.vdl(), 1);
    w.node_up(6);
    let back = appends(&outputs(&mut w));
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].0, back[0].3, back[0].4), (6, 1, 2), "from its SCL on");
}

#[test]
fn an_answered_segment_still_behind_gets_a_resend() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let first = appends(&outputs(&mut w));
    w.submit(2, vec![delta(1, 2)]).unwrap();
    let second = appends(&outputs(&mut w));
    let (node, req, pg, _, _) = second[0];
    // The first batch to this node was lost: the second is acked with SCL 0.
    ack(&mut w, node, req, pg, 0);
    w.on_reply(node, first[0].1, Message::error(ErrorCode::Overloaded, 0, "busy"));
    assert!(appends(&outputs(&mut w)).is_empty(), "paused after a refusal");
    w.tick(1000);
    let again = appends(&outputs(&mut w));
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].0, again[0].3, again[0].4), (node, 1, 2));
}

#[test]
fn three_segments_down_stall_commits_without_error() {
    let mut w = writer();
    for n in [4, 5, 6] {
        w.node_down(n);
    }
    w.submit(1, vec![delta(1, 1)]).unwrap();
    for (node, req, pg, _, last) in appends(&outputs(&mut w)) {
        ack(&mut w, node, req, pg, last);
    }
    assert_eq!(w.vdl(), 0);
    w.node_up(5);
    let out = outputs(&mut w);
    let resent = appends(&out);
    assert_eq!(resent.len(), 1);
    ack(&mut w, resent[0].0, resent[0].1, 0, 1);
    assert_eq!(commits(&outputs(&mut w)), vec![(1, 1)]);
}

/// The writer takes over recovery's connections, and answers to recovery's
/// last requests may still come on them: its own request ids start above
/// recovery's.
#[test]
fn a_recovered_writer_numbers_its_requests_above_recoverys() {
    let r = crate::recovery::Recovered {
        epoch: 2,
        vdl: 0,
        next_lsn: 1,
        annulled: Vec::new(),
        pgs: config()
            .memberships
            .into_iter()
            .map(|membership| crate::recovery::RecoveredPg {
                tail: 0,
                records: Vec::new(),
                membership,
                scls: vec![0; SEGMENTS_PER_PG],
            })
            .collect(),
        next_request: 40,
    };
    let mut w: Writer<u32> = Writer::recovered(config(), &r);
    for n in 1..=6 {
        w.node_up(n);
    }
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let sends = appends(&outputs(&mut w));
    assert_eq!(sends.len(), 6);
    assert!(sends.iter().all(|s| s.1 >= 40), "{sends:?}");
}

/// An answer carrying the id of a request sent to another node, or about
/// another PG, is not that request's answer: its SCL counts for the
/// segment that sent it, never for the one the request went to (the
/// simulator's seed 1592590737 acknowledged a commit on 3 segments so).
#[test]
fn an_answer_from_another_segment_is_not_counted_for_the_request() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1)]).unwrap(); // PG 0, LSN 1
    let sends = appends(&outputs(&mut w));
    for (i, &(node, req, _, _, _)) in sends.iter().enumerate() {
        // PG 1's segment on another node, or on this one.
        let from = if i % 2 == 0 { node % 6 + 1 } else { node };
        ack(&mut w, from, req, 1, 1);
    }
    assert!(
        commits(&outputs(&mut w)).is_empty(),
        "committed on answers from other segments"
    );
    assert_eq!(w.pgcl(0), 0);
    // PG 1 is on nodes 2, 3, 4, 5, 6, 1.
    assert_eq!(w.scls(1), [1, 0, 1, 0, 1, 0], "each counts for its own segment");
    for &(node, req, pg, _, last) in &sends {
        ack(&mut w, node, req, pg, last);
    }
    assert_eq!(commits(&outputs(&mut w)), vec![(1, 1)]);
}

#[test]
fn a_newer_epoch_fences_the_writer() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let sends = appends(&outputs(&mut w));
    w.on_reply(
        sends[0].0,
        sends[0].1,
        Message::error(ErrorCode::StaleEpoch, 2, "stale"),
    );
    let out = outputs(&mut w);
    assert!(out.iter().any(|o| matches!(o, Output::Fenced { epoch: 2 })));
    assert_eq!(w.submit(2, vec![delta(1, 1)]), Err(TxnError::Fenced { epoch: 2 }));
}

#[test]
fn bad_transactions_are_refused_and_change_nothing() {
    let mut w = writer();
    assert_eq!(w.submit(1, vec![]), Err(TxnError::Empty));
    assert!(matches!(
        w.submit(1, vec![delta(200, 1)]),
        Err(TxnError::PageOutOfRange { .. })
    ));
    let past_end = PageWrite::Range {
        page: 1,
        offset: PAGE as u32 - 2,
        bytes: vec![1; 4],
    };
    assert!(matches!(w.submit(1, vec![past_end]), Err(TxnError::BadWrite { .. })));
    let short_image = PageWrite::Image {
        page: 1,
        bytes: vec![1; 10],
    };
    assert!(matches!(w.submit(1, vec![short_image]), Err(TxnError::BadWrite { .. })));
    assert_eq!(w.allocated_through(), 0);
}

#[test]
fn reads_see_the_vdl_from_cache_or_a_caught_up_segment() {
    let mut w = writer();
    w.submit(
        1,
        vec![
            PageWrite::Image {
                page: 3,
                bytes: vec![5; PAGE],
            },
            delta(4, 9),
        ],
    )
    .unwrap();
    let sends = appends(&outputs(&mut w));
    // Before the commit is durable a read sees zeros (PG 0 has nothing durable).
    w.read(10, 3).unwrap();
    match &outputs(&mut w)[..] {
        [Output::ReadDone { token: 10, page }] => assert_eq!((page.read_point, page.lsn, page.bytes[0]), (0, 0, 0)),
        other => panic!("{other:?}"),
    }
    for &(node, req, pg, _, last) in &sends[..4] {
        ack(&mut w, node, req, pg, last);
    }
    outputs(&mut w);
    // Page 3 was an image: cached.
    w.read(11, 3).unwrap();
    match &outputs(&mut w)[..] {
        [Output::ReadDone { token: 11, page }] => assert_eq!((page.read_point, page.lsn, page.bytes[0]), (2, 1, 5)),
        other => panic!("{other:?}"),
    }
    // Page 4 was a delta on an uncached page: asked of a segment with SCL >= 2.
    w.read(12, 4).unwrap();
    let out = outputs(&mut w);
    let (node, request) = match &out[..] {
        [
            Output::Request {
                node,
                request,
                message: Message::GetPage {
                    read_point: 2, page: 4, ..
                },
            },
        ] => (*node, *request),
        other => panic!("{other:?}"),
    };
    assert!(sends[..4].iter().any(|s| s.0 == node), "only an acked segment is asked");
    w.on_reply(node, request, Message::error(ErrorCode::ReadPointAboveScl, 0, "behind"));
    let out = outputs(&mut w);
    let (node2, request2) = match &out[..] {
        [Output::Request { node, request, .. }] => (*node, *request),
        other => panic!("{other:?}"),
    };
    assert_ne!(node2, node, "a refusal goes to another segment");
    let mut bytes = vec![0; PAGE];
    bytes[..4].copy_from_slice(&[9; 4]);
    w.on_reply(
        node2,
        request2,
        Message::Page {
            volume: 1,
            pg: 0,
            page: 4,
            lsn: 2,
            bytes: bytes.clone(),
        },
    );
    match &outputs(&mut w)[..] {
        [Output::ReadDone { token: 12, page }] => assert_eq!((page.read_point, page.lsn, &page.bytes), (2, 2, &bytes)),
        other => panic!("{other:?}"),
    }
}

/// PGMRPLs sent (pg, lsn) in `out`.
fn pgmrpls(out: &[Output<u32>]) -> Vec<(u32, u64)> {
    let mut sent: Vec<(u32, u64)> = pgmrpls_to(out).into_iter().map(|(_, pg, lsn)| (pg, lsn)).collect();
    sent.dedup();
    sent
}

/// Commit one write to `page` and ack it on every segment.
fn commit_acked(w: &mut Writer<u32>, token: u32, page: u64) {
    w.submit(token, vec![delta(page, 1)]).unwrap();
    for (node, req, pg, _, last) in appends(&outputs(w)) {
        ack(w, node, req, pg, last);
    }
    assert_eq!(commits(&outputs(w)), vec![(token, w.vdl())]);
}

#[test]
fn pgmrpl_is_sent_after_a_pause_or_a_large_move_and_its_last_value_always() {
    let mut w = writer();
    commit_acked(&mut w, 1, 1);
    w.tick(PGMRPL_INTERVAL_US);
    assert_eq!(pgmrpls(&outputs(&mut w)), vec![(0, 1)]);
    // Moved a little, soon after: not yet.
    commit_acked(&mut w, 2, 1);
    w.tick(PGMRPL_INTERVAL_US + 10_000);
    assert!(pgmrpls(&outputs(&mut w)).is_empty());
    // A PG that stopped moving still gets its last PGMRPL (its segments'
    // hot records would otherwise pin their logs), once.
    w.tick(2 * PGMRPL_INTERVAL_US);
    assert_eq!(pgmrpls(&outputs(&mut w)), vec![(0, 2)]);
    w.tick(4 * PGMRPL_INTERVAL_US);
    assert!(pgmrpls(&outputs(&mut w)).is_empty());
}

/// The GetPage requests in `out`: (node, request).
fn page_asks(out: &[Output<u32>]) -> Vec<(u64, u64)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Request {
                node,
                request,
                message: Message::GetPage { .. },
            } => Some((*node, *request)),
            _ => None,
        })
        .collect()
}

/// A read whose segment's connection drops while it is asked, and whose
/// other segments each refuse once, is asked again and answered: it never
/// waits for ever, and the PG's PGMRPL is not pinned at its read point.
#[test]
fn a_read_asked_of_a_lost_connection_and_refused_elsewhere_is_asked_again() {
    let mut w = writer();
    // Page 4 of PG 0 (a delta: not cached), on nodes 1-5; node 6 is behind.
    w.submit(1, vec![delta(4, 9)]).unwrap();
    for (node, req, pg, _, last) in appends(&outputs(&mut w)) {
        if node != 6 {
            ack(&mut w, node, req, pg, last);
        }
    }
    assert_eq!(commits(&outputs(&mut w)), vec![(1, 1)]);
    w.read(10, 4).unwrap();
    let asks = page_asks(&outputs(&mut w));
    assert_eq!(asks.len(), 1);
    let (first, _) = asks[0];
    w.node_down(first);
    w.node_up(first);
    let mut now = 0;
    let mut refused = Vec::new();
    let mut answered = None;
    for _ in 0..20 {
        let out = outputs(&mut w);
        if let Some(page) = out.iter().find_map(|o| match o {
            Output::ReadDone { token: 10, page } => Some(page.clone()),
            _ => None,
        }) {
            answered = Some(page);
            break;
        }
        for (node, request) in page_asks(&out) {
            assert_ne!(node, 6, "asked a segment below the read point");
            if node != first && !refused.contains(&node) {
                refused.push(node);
                w.on_reply(node, request, Message::error(ErrorCode::Internal, 0, "a one-off fault"));
            } else {
                let mut bytes = vec![0; PAGE];
                bytes[..4].copy_from_slice(&[9; 4]);
                let page = Message::Page {
                    volume: 1,
                    pg: 0,
                    page: 4,
                    lsn: 1,
                    bytes,
                };
                w.on_reply(node, request, page);
            }
        }
        now += 1000;
        w.tick(now);
    }
    let page = answered.expect("the read was never answered");
    assert_eq!((page.read_point, page.lsn, page.bytes[0]), (1, 1, 9));
    assert_eq!(refused.len(), 4, "every other segment that can answer was asked once");
    w.tick(now + PGMRPL_INTERVAL_US);
    assert_eq!(pgmrpls(&outputs(&mut w)), vec![(0, 1)], "the PGMRPL moves on");
}

/// The GetSegmentStatus requests in `out`: (node, request, pg).
fn status_asks(out: &[Output<u32>]) -> Vec<(u64, u64, u32)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Request {
                node,
                request,
                message: Message::GetSegmentStatus { pg, .. },
            } => Some((*node, *request, *pg)),
            _ => None,
        })
        .collect()
}

fn status(pg: u32, scl: u64, incarnation: u64) -> Message {
    Message::SegmentStatus {
        volume: 1,
        pg,
        epoch: 1,
        scl,
        highest_lsn: scl,
        lowest_lsn: 0,
        pgmrpl: 0,
        records: 0,
        log_bytes: 0,
        page_store_bytes: 0,
        installed_epoch: 1,
        incarnation,
        annulled: Vec::new(),
        holes: Vec::new(),
        damage: Default::default(),
        membership: None,
        hydration: None,
    }
}

/// A segment that acknowledged a record and comes back from a restart
/// without it (damage found at open, a replaced disk) is counted for what
/// it holds now, not what it once acknowledged: a commit in flight is
/// acknowledged only once 4 segments really hold it, and the segment is
/// sent what it lacks.
#[test]
fn a_segment_back_with_less_than_it_acknowledged_is_not_counted_for_it() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1), delta(2, 1)]).unwrap(); // PG 0, LSNs 1-2
    let sends = appends(&outputs(&mut w));
    for &(node, req, pg, _, last) in &sends[..3] {
        ack(&mut w, node, req, pg, last);
    }
    assert_eq!(w.scls(0), [2, 2, 2, 0, 0, 0]);
    // Node 1 restarts (its connection drops) and finds it holds nothing.
    w.node_down(1);
    w.node_up(1);
    for (node, request, pg) in status_asks(&outputs(&mut w)) {
        assert_eq!(node, 1);
        w.on_reply(node, request, status(pg, 0, INCARNATION + 1));
    }
    assert_eq!(w.scls(0)[0], 0, "taken as reported under its new incarnation");
    // A fourth ack: 3 segments hold the commit, not 4.
    let (node, req, pg, _, last) = sends[3];
    ack(&mut w, node, req, pg, last);
    let out = outputs(&mut w);
    assert!(commits(&out).is_empty(), "acknowledged on 3 copies");
    assert_eq!(w.pgcl(0), 0);
    // It is sent what it lacks, and once it holds it the commit is durable.
    let resent = appends(&out);
    assert_eq!(resent.len(), 1, "{resent:?}");
    let (node, req, pg, first, last) = resent[0];
    assert_eq!((node, first, last), (1, 1, 2));
    ack_from(&mut w, node, req, pg, last, INCARNATION + 1);
    assert_eq!(commits(&outputs(&mut w)), vec![(1, 2)]);
}

/// Within one incarnation a segment's SCL never goes back: an ack that
/// arrives after a later one (reordered), or late from a connection since
/// reset, keeps the highest. A late ack of an earlier incarnation is not
/// believed at all.
#[test]
fn a_late_or_reordered_ack_never_lowers_an_scl() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let first = appends(&outputs(&mut w));
    w.submit(2, vec![delta(1, 2)]).unwrap();
    let second = appends(&outputs(&mut w));
    let (node, req2, pg, _, _) = second[0];
    ack(&mut w, node, req2, pg, 2);
    ack(&mut w, node, first[0].1, pg, 1);
    assert_eq!(w.scls(0)[0], 2, "a reordered ack lowered the SCL");
    // Reconnected, same incarnation (a network blip): still 2, and an ack
    // no request waits for any more does not lower it.
    w.node_down(node);
    w.node_up(node);
    for (n, request, p) in status_asks(&outputs(&mut w)) {
        w.on_reply(n, request, status(p, if p == 0 { 2 } else { 0 }, INCARNATION));
    }
    ack(&mut w, node, first[0].1, pg, 1);
    assert_eq!(w.scls(0)[0], 2);
    // Restarted with 1 only; an ack of the old connection, handed over
    // after its loss, is no longer true.
    w.node_down(node);
    ack(&mut w, node, req2, pg, 2);
    w.node_up(node);
    for (n, request, p) in status_asks(&outputs(&mut w)) {
        w.on_reply(n, request, status(p, if p == 0 { 1 } else { 0 }, INCARNATION + 1));
    }
    assert_eq!(w.scls(0)[0], 1);
    ack_from(&mut w, node, req2, pg, 2, INCARNATION + 1);
    assert_eq!(w.scls(0)[0], 2, "an ack of the new incarnation moves it on");
}

/// The SetMembership requests in `out`: (node, request, pg), each checked
/// to carry the PG's membership from the config, the writer's epoch and
/// the volume's geometry (so that a node lacking the segment creates it).
fn tellings(out: &[Output<u32>]) -> Vec<(u64, u64, u32)> {
    tellings_at(out, config().epoch)
}

/// [`tellings`] of a writer at `writer_epoch`.
fn tellings_at(out: &[Output<u32>], writer_epoch: u64) -> Vec<(u64, u64, u32)> {
    let config = config();
    out.iter()
        .filter_map(|o| match o {
            Output::Request {
                node,
                request,
                message:
                    Message::SetMembership {
                        volume,
                        epoch,
                        pg,
                        page_bytes,
                        pg_pages,
                        membership,
                        ..
                    },
            } => {
                assert_eq!((*volume, *epoch), (config.volume, writer_epoch));
                assert_eq!((*page_bytes as usize, *pg_pages), (config.page_bytes, config.pg_pages));
                assert_eq!(membership, &config.memberships[*pg as usize], "PG {pg}'s membership");
                Some((*node, *request, *pg))
            }
            _ => None,
        })
        .collect()
}

/// The (node, PG) pairs of the placement: every segment.
fn segments_of(nodes: &[u64]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for (pg, m) in config().memberships.iter().enumerate() {
        for n in m.members.iter().map(|m| m.id).filter(|n| nodes.contains(n)) {
            out.push((n, pg as u32));
        }
    }
    out.sort_unstable();
    out
}

fn told_pairs(t: &[(u64, u64, u32)]) -> Vec<(u64, u32)> {
    let mut v: Vec<(u64, u32)> = t.iter().map(|&(n, _, pg)| (n, pg)).collect();
    v.sort_unstable();
    v
}

/// Answer every telling as a node that took it does.
fn answer_tellings(w: &mut Writer<u32>, t: &[(u64, u64, u32)], incarnation: u64) {
    for &(node, request, pg) in t {
        w.on_reply(node, request, status(pg, 0, incarnation));
    }
}

/// A node that comes up is told each of its PGs' membership once, first
/// on the connection (before any append or status ask for that PG), and
/// not again while it stays up, however much is written.
#[test]
fn a_node_coming_up_is_told_each_pgs_membership_once_per_up() {
    let mut w = writer();
    w.submit(1, vec![delta(1, 1), delta(150, 1)]).unwrap();
    let out = outputs(&mut w);
    let t = tellings(&out);
    assert_eq!(told_pairs(&t), segments_of(&[1, 2, 3, 4, 5, 6]), "every segment once");
    for &(node, request, pg) in &t {
        let first = out.iter().position(|o| match o {
            Output::Request {
                node: n,
                message: Message::GetSegmentStatus { pg: p, .. } | Message::SetMembership { pg: p, .. },
                ..
            } => (*n, *p) == (node, pg),
            Output::Append { node: n, pg: p, .. } => (*n, *p) == (node, pg),
            _ => false,
        });
        let told_at = out
            .iter()
            .position(|o| matches!(o, Output::Request { request: r, .. } if *r == request));
        assert_eq!(first, told_at, "node {node} PG {pg}: told first");
    }
    answer_tellings(&mut w, &t, INCARNATION);
    for (node, req, pg, _, last) in appends(&out) {
        ack(&mut w, node, req, pg, last);
    }
    let out = outputs(&mut w);
    assert_eq!(commits(&out), vec![(1, 2)]);
    assert!(tellings(&out).is_empty(), "told again while up");
    for i in 0..20 {
        w.submit(2 + i, vec![delta(2, 1)]).unwrap();
        w.tick(1000 * (u64::from(i) + 1));
        let out = outputs(&mut w);
        assert!(tellings(&out).is_empty(), "told again on the commit path");
        for (node, req, pg, _, last) in appends(&out) {
            ack(&mut w, node, req, pg, last);
        }
    }
    // Down and up again: that node's PGs only, once each.
    w.node_down(3);
    w.node_up(3);
    let t = tellings(&outputs(&mut w));
    assert_eq!(told_pairs(&t), segments_of(&[3]));
    // A telling lost with its connection is sent at the next up.
    w.node_down(3);
    w.node_up(3);
    let t = tellings(&outputs(&mut w));
    assert_eq!(told_pairs(&t), segments_of(&[3]));
}

/// A reply showing a node under a new incarnation (restarted, perhaps
/// reformatted: it may have lost the segment or its membership) gets the
/// segment told again, once; later replies of that incarnation do not.
#[test]
fn a_new_incarnation_is_told_the_membership_again() {
    let mut w = writer();
    let first = outputs(&mut w);
    let t = tellings(&first);
    answer_tellings(&mut w, &t, INCARNATION);
    w.submit(1, vec![delta(1, 1)]).unwrap(); // PG 0
    let sends = appends(&outputs(&mut w));
    let (node, req, pg, _, last) = sends[1];
    ack_from(&mut w, node, req, pg, last, INCARNATION + 1);
    let t = tellings(&outputs(&mut w));
    assert_eq!(told_pairs(&t), vec![(node, pg)]);
    // Its answer, and more replies of the same incarnation: nothing more.
    answer_tellings(&mut w, &t, INCARNATION + 1);
    w.submit(2, vec![delta(1, 2)]).unwrap();
    let sends = appends(&outputs(&mut w));
    for &(n, r, p, _, l) in &sends {
        ack_from(
            &mut w,
            n,
            r,
            p,
            l,
            if n == node { INCARNATION + 1 } else { INCARNATION },
        );
    }
    assert!(tellings(&outputs(&mut w)).is_empty());
    // The node's other PG learns the incarnation from its status: told too.
    let (_, ask, _) = status_asks(&first)
        .into_iter()
        .find(|&(n, _, p)| (n, p) == (node, 1))
        .expect("its status was asked");
    w.on_reply(node, ask, status(1, 0, INCARNATION + 1));
    assert_eq!(told_pairs(&tellings(&outputs(&mut w))), vec![(node, 1)]);
}

/// A node refusing the membership — one that holds a newer one, or does
/// not know the request — does not stop commits; it is told again at its
/// next up, and a one-off refusal after `retry_after_us`.
#[test]
fn a_refused_membership_does_not_stop_commits() {
    let mut w = writer();
    let t = tellings(&outputs(&mut w));
    for &(node, request, _) in &t {
        let reply = match node {
            1 => Message::error(ErrorCode::NotMember, 0, "not a member"),
            2 => Message::error(ErrorCode::Internal, 0, "a one-off fault"),
            _ => Message::error(ErrorCode::BadRequest, 0, "SetMembership is not a request"),
        };
        w.on_reply(node, request, reply);
    }
    assert_eq!(w.fenced(), None);
    // Why each refused is shown with the PG's state (`storctl repair`).
    let pg = segments_of(&[2])[0].1;
    let refused = |w: &Writer<u32>, node: u64| {
        let v = w.pg_view(pg).unwrap();
        v.members.iter().find(|m| m.id == node).unwrap().refused.clone()
    };
    assert_eq!(refused(&w, 2).as_deref(), Some("a one-off fault"));
    assert_eq!(refused(&w, 1).as_deref(), Some("not a member"));
    w.submit(1, vec![delta(1, 1), delta(150, 1)]).unwrap();
    let out = outputs(&mut w);
    for (node, req, pg, _, last) in appends(&out) {
        ack(&mut w, node, req, pg, last);
    }
    let out = outputs(&mut w);
    assert_eq!(commits(&out), vec![(1, 2)]);
    assert!(tellings(&out).is_empty());
    // The one-off refusal is asked again after a pause; the others are not.
    w.tick(config().retry_after_us);
    let t = tellings(&outputs(&mut w));
    assert_eq!(told_pairs(&t), segments_of(&[2]));
    answer_tellings(&mut w, &t, INCARNATION);
    assert_eq!(refused(&w, 2), None, "taken since");
    assert_eq!(refused(&w, 1).as_deref(), Some("not a member"));
    w.tick(10 * config().retry_after_us);
    assert!(tellings(&outputs(&mut w)).is_empty());
    // At its next up a node that refused is told again.
    w.node_down(4);
    w.node_up(4);
    assert_eq!(told_pairs(&tellings(&outputs(&mut w))), segments_of(&[4]));
}

/// A segment that had not installed the writer's epoch is sent the
/// truncation, and told its membership once it has.
#[test]
fn a_segment_not_installed_is_told_after_its_truncation() {
    let mut w = writer();
    let t = tellings(&outputs(&mut w));
    let (node, request, pg) = t[0];
    w.on_reply(
        node,
        request,
        Message::error(ErrorCode::EpochNotInstalled, 0, "not installed"),
    );
    let out = outputs(&mut w);
    let truncation = out.iter().find_map(|o| match o {
        Output::Request {
            node: n,
            request,
            message: Message::Truncate { pg: p, .. },
        } if (*n, *p) == (node, pg) => Some(*request),
        _ => None,
    });
    let truncation = truncation.expect("the truncation is sent");
    assert!(tellings(&out).is_empty());
    w.on_reply(node, truncation, status(pg, 0, INCARNATION));
    assert_eq!(told_pairs(&tellings(&outputs(&mut w))), vec![(node, pg)]);
}

/// The writer recovery hands over to tells every segment of the nodes up
/// at its start (recovery has sealed and truncated them), at its epoch and
/// before any append; a node down then is told when it comes up.
#[test]
fn a_recovered_writer_tells_the_segments_up_at_its_start() {
    let r = crate::recovery::Recovered {
        epoch: 2,
        vdl: 0,
        next_lsn: 1,
        annulled: Vec::new(),
        pgs: config()
            .memberships
            .into_iter()
            .map(|membership| crate::recovery::RecoveredPg {
                tail: 0,
                records: Vec::new(),
                membership,
                scls: vec![0; SEGMENTS_PER_PG],
            })
            .collect(),
        next_request: 40,
    };
    let mut w: Writer<u32> = Writer::recovered(config(), &r);
    for n in 1..=5 {
        w.node_up(n);
    }
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let out = outputs(&mut w);
    let t = tellings_at(&out, 2);
    assert_eq!(told_pairs(&t), segments_of(&[1, 2, 3, 4, 5]));
    let first_append = out.iter().position(|o| matches!(o, Output::Append { .. }));
    let last_telling = out.iter().rposition(|o| {
        matches!(
            o,
            Output::Request {
                message: Message::SetMembership { .. },
                ..
            }
        )
    });
    assert!(last_telling < first_append, "told before the first append");
    w.node_up(6);
    assert_eq!(told_pairs(&tellings_at(&outputs(&mut w), 2)), segments_of(&[6]));
}

/// The truncations sent in `out`: (node, request, pg).
fn truncations(out: &[Output<u32>]) -> Vec<(u64, u64, u32)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Request {
                node,
                request,
                message: Message::Truncate { pg, .. },
            } => Some((*node, *request, *pg)),
            _ => None,
        })
        .collect()
}

/// A segment the writer let go of is caught up by its peers (gossip
/// repair) with nothing sent to it: the writer asks a segment that is
/// behind, with nothing in flight to it, where it stands — one ask at a
/// time, spaced by `status_ask_us` — and an idle PG's commit waiting on it
/// goes through.
#[test]
fn a_segment_behind_is_asked_again_and_its_repair_counts() {
    let mut c = config();
    c.pg_held_bytes_max = 1; // let go of what 4 segments have at once
    let mut w: Writer<u32> = Writer::new(c, 0);
    for n in 1..=6 {
        w.node_up(n);
    }
    w.submit(1, vec![delta(1, 1)]).unwrap(); // PG 0, LSN 1
    for (node, req, pg, _, last) in appends(&outputs(&mut w)) {
        if node != 4 {
            ack(&mut w, node, req, pg, last);
        }
    }
    assert_eq!(w.vdl(), 1);
    assert_eq!(w.released_through(0), 1, "let go of once 4 held it");
    // Node 4 lost the batch with its connection and comes back without it;
    // then nodes 5 and 6 go down.
    w.node_down(4);
    w.node_up(4);
    for (node, request, pg) in status_asks(&outputs(&mut w)) {
        w.on_reply(node, request, status(pg, 0, INCARNATION));
    }
    w.node_down(5);
    w.node_down(6);
    w.submit(2, vec![delta(2, 1)]).unwrap(); // PG 0, LSN 2
    for (node, req, pg, _, last) in appends(&outputs(&mut w)) {
        // Node 4 lacks LSN 1: its SCL stays below the new record.
        ack(&mut w, node, req, pg, if node == 4 { 0 } else { last });
    }
    assert!(commits(&outputs(&mut w)).is_empty(), "3 segments hold LSN 2");
    // Gossip repair brings node 4 to LSN 2. The writer asks it, once.
    w.tick(20_000);
    let asks = status_asks(&outputs(&mut w));
    assert_eq!(asks.iter().map(|a| (a.0, a.2)).collect::<Vec<_>>(), vec![(4, 0)]);
    w.tick(40_000);
    assert!(status_asks(&outputs(&mut w)).is_empty(), "one ask at a time");
    let (node, request, pg) = asks[0];
    w.on_reply(node, request, status(pg, 2, INCARNATION));
    assert_eq!(commits(&outputs(&mut w)), vec![(2, 2)]);
    // Caught up: not asked again.
    w.tick(1_000_000);
    assert!(status_asks(&outputs(&mut w)).is_empty());
}

/// A segment whose status shows an older installed epoch missed this
/// writer's recovery: it is sent the truncation at once, as when it refuses
/// an append, so an idle PG's segment installs the epoch (and gossip can
/// repair it). One truncation at a time.
#[test]
fn a_status_showing_an_older_installed_epoch_sends_the_truncation() {
    let mut c = config();
    c.epoch = 2;
    c.annulled = vec![(5, 9)];
    let mut w: Writer<u32> = Writer::new(c, 0);
    w.node_up(3);
    let out = outputs(&mut w);
    let asks = status_asks(&out);
    assert_eq!(asks.len(), 2, "node 3 holds a segment of each PG");
    let tells = tellings_at(&out, 2);
    let with_installed = |pg, installed| {
        let mut m = status(pg, 0, INCARNATION);
        if let Message::SegmentStatus { installed_epoch, .. } = &mut m {
            *installed_epoch = installed;
        }
        m
    };
    // PG 0's segment installed epoch 1, PG 1's this writer's.
    w.on_reply(3, asks[0].1, with_installed(asks[0].2, 1));
    w.on_reply(3, asks[1].1, with_installed(asks[1].2, 2));
    let t = truncations(&outputs(&mut w));
    assert_eq!(t.iter().map(|x| (x.0, x.2)).collect::<Vec<_>>(), vec![(3, asks[0].2)]);
    // While it is unanswered, another status showing the old epoch (the
    // answer to its membership) sends none.
    let tell = tells.iter().find(|x| x.2 == asks[0].2).unwrap();
    w.on_reply(3, tell.1, with_installed(tell.2, 1));
    assert!(truncations(&outputs(&mut w)).is_empty(), "one truncation at a time");
    // Installed: appends to it go.
    w.on_reply(3, t[0].1, with_installed(asks[0].2, 2));
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let sends = appends(&outputs(&mut w));
    assert_eq!(sends.iter().map(|s| (s.0, s.2)).collect::<Vec<_>>(), vec![(3, 0)]);
}

fn member(id: u64) -> storaged::membership::Member {
    storaged::membership::Member {
        id,
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7100 + id as u16)),
    }
}

/// The SetMembership requests in `out`: (node, request, pg, membership).
fn membership_sends(out: &[Output<u32>]) -> Vec<(u64, u64, u32, Membership)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Request {
                node,
                request,
                message: Message::SetMembership { pg, membership, .. },
            } => Some((*node, *request, *pg, membership.clone())),
            _ => None,
        })
        .collect()
}

/// A segment's answer to a telling: it holds `m`, at `scl`.
fn holds(pg: u32, scl: u64, m: &Membership) -> Message {
    let mut reply = status(pg, scl, INCARNATION);
    if let Message::SegmentStatus { membership, .. } = &mut reply {
        *membership = Some(m.clone());
    }
    reply
}

/// Answer the tellings in `sends` from `nodes` as segments at `scl` that took them.
fn take_tellings(w: &mut Writer<u32>, sends: &[(u64, u64, u32, Membership)], nodes: &[u64], scl: u64) {
    for (node, request, pg, m) in sends {
        if nodes.contains(node) {
            w.on_reply(*node, *request, holds(*pg, scl, m));
        }
    }
}

/// Commit one transaction on PG 0 (page 1), acked by `nodes`; returns
/// whether it committed.
fn commit_on(w: &mut Writer<u32>, token: u32, nodes: &[u64]) -> bool {
    w.submit(token, vec![delta(1, token as u8)]).unwrap();
    let out = outputs(w);
    for (node, req, pg, _, last) in appends(&out) {
        if nodes.contains(&node) {
            ack(w, node, req, pg, last);
        }
    }
    commits(&outputs(w)).iter().any(|&(t, _)| t == token)
}

/// Replacing F (6) by G (7): the dual membership is proposed to every
/// member and to G (a connection to G is asked for), writes count by both
/// sets at once, it comes in force on a write quorum of the old set, G is
/// told it when it comes up, and once G has caught up the PG moves to the
/// new set, after which F is sent nothing more.
#[test]
fn replacing_a_segment_goes_dual_then_to_the_new_set_once_it_caught_up() {
    let mut w = writer();
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    assert!(commit_on(&mut w, 1, &[1, 2, 3, 4, 5, 6]));

    let view = w
        .change_membership(0, Change::Replace { old: 6, new: member(7) })
        .unwrap();
    let dual = view.proposed.clone().expect("a step proposed");
    assert_eq!(
        (dual.epoch, membership::sets(&dual)),
        (2, vec![vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 4, 5, 7]])
    );
    let out = outputs(&mut w);
    assert!(out.iter().any(|o| matches!(o, Output::Connect { node: 7, .. })));
    let sends = membership_sends(&out);
    let mut told: Vec<u64> = sends.iter().map(|s| s.0).collect();
    told.sort_unstable();
    assert_eq!(told, vec![1, 2, 3, 4, 5, 6], "every member up is told; G when it is up");
    assert!(sends.iter().all(|s| s.3 == dual));
    assert!(
        matches!(
            w.change_membership(0, Change::Abort),
            Err(ChangeError::Installing { pg: 0, epoch: 2 })
        ),
        "one step at a time"
    );

    // While proposed, a write needs 4 of each set: 1, 2, 3 and F are 4 of
    // the old set but only 3 of the new one.
    assert!(!commit_on(&mut w, 2, &[1, 2, 3, 6]), "committed on 3 of the new set");
    ack_all_pending(&mut w, &[4]);
    assert!(w.vdl() >= 2, "4 of each set hold it now");

    // In force once a write quorum of the old set holds it.
    let vdl = w.vdl();
    take_tellings(&mut w, &sends, &[1, 2, 3], vdl);
    assert_eq!(w.pg_view(0).unwrap().membership.epoch, 1);
    take_tellings(&mut w, &sends, &[4], vdl);
    let view = w.pg_view(0).unwrap();
    assert_eq!((view.membership.epoch, view.proposed.is_some()), (2, false));

    // G comes up, is told, and is behind: no switch yet.
    w.node_up(7);
    let out = outputs(&mut w);
    let g = membership_sends(&out);
    assert_eq!(g.iter().map(|s| s.0).collect::<Vec<_>>(), vec![7]);
    take_tellings(&mut w, &g, &[7], 0);
    assert!(w.pg_view(0).unwrap().proposed.is_none(), "G is behind");
    // Caught up (gossip repair; its status says so): the new set is proposed.
    let pgcl = w.pgcl(0);
    let asks = status_asks(&out);
    let (_, request, _) = asks.iter().find(|a| a.0 == 7).copied().expect("G asked its status");
    w.on_reply(7, request, holds(0, pgcl, &dual));
    let fin = w.pg_view(0).unwrap().proposed.expect("the final step");
    assert_eq!((fin.epoch, membership::sets(&fin)), (3, vec![vec![1, 2, 3, 4, 5, 7]]));
    let sends = membership_sends(&outputs(&mut w));
    let mut told: Vec<u64> = sends.iter().map(|s| s.0).collect();
    told.sort_unstable();
    assert_eq!(told, vec![1, 2, 3, 4, 5, 6, 7], "F learns it left");
    take_tellings(&mut w, &sends, &[1, 2, 3, 7], pgcl);
    assert_eq!(w.pg_view(0).unwrap().membership.epoch, 2, "3 of the new set only");
    take_tellings(&mut w, &sends, &[4], pgcl);
    let view = w.pg_view(0).unwrap();
    assert_eq!((view.membership.epoch, view.membership.is_changing()), (3, false));
    let mut ids: Vec<u64> = view.members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 7]);

    // F gets nothing more; G is written to, and counts.
    w.submit(9, vec![delta(1, 9)]).unwrap();
    let out = outputs(&mut w);
    let to: Vec<u64> = appends(&out).iter().filter(|a| a.2 == 0).map(|a| a.0).collect();
    assert!(!to.contains(&6) && to.contains(&7), "{to:?}");
    for (node, req, pg, _, last) in appends(&out) {
        if [1, 2, 3, 7].contains(&node) {
            ack(&mut w, node, req, pg, last);
        }
    }
    assert!(commits(&outputs(&mut w)).iter().any(|&(t, _)| t == 9));
}

/// Ack every append in flight from `nodes` up to what it was sent.
fn ack_all_pending(w: &mut Writer<u32>, nodes: &[u64]) {
    let pending: Vec<(u64, u64, u32, usize)> = w
        .pending
        .iter()
        .filter_map(|(&req, p)| match p {
            Pending::Append { pg, slot, .. } => Some((w.pgs[*pg as usize].slots[*slot].node, req, *pg, *slot)),
            _ => None,
        })
        .collect();
    for (node, req, pg, slot) in pending {
        if nodes.contains(&node) {
            let scl = w.pgs[pg as usize].slots[slot].sent_through;
            ack(w, node, req, pg, scl);
        }
    }
}

/// An abort proposes the old set again; once in force, G's slot is gone
/// and nothing more is sent to it.
#[test]
fn an_aborted_change_goes_back_to_the_old_set() {
    let mut w = writer();
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    assert!(matches!(
        w.change_membership(0, Change::Abort),
        Err(ChangeError::NothingToAbort(0))
    ));
    assert!(commit_on(&mut w, 1, &[1, 2, 3, 4, 5, 6]));
    w.change_membership(0, Change::Replace { old: 6, new: member(7) })
        .unwrap();
    w.node_up(7);
    let sends = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &sends, &[1, 2, 3, 4], 1);
    take_tellings(&mut w, &sends, &[7], 0);
    let view = w.pg_view(0).unwrap();
    assert!(view.proposed.is_none() && view.membership.is_changing(), "{view:?}");
    let view = w.change_membership(0, Change::Abort).unwrap();
    let back = view.proposed.expect("the old set proposed");
    assert_eq!((back.epoch, membership::sets(&back)), (3, vec![vec![1, 2, 3, 4, 5, 6]]));
    let sends = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &sends, &[1, 2, 3, 4, 5, 6, 7], 0);
    let view = w.pg_view(0).unwrap();
    assert_eq!((view.membership.epoch, view.membership.is_changing()), (3, false));
    assert!(view.members.iter().all(|m| m.id != 7));
    w.submit(2, vec![delta(1, 2)]).unwrap();
    assert!(appends(&outputs(&mut w)).iter().all(|a| a.0 != 7));
}

/// A segment that refuses an append because it holds a newer membership
/// (a step of a writer before this one that never came in force) gets this
/// writer's membership proposed again above it, the same members; the
/// batch is sent again.
#[test]
fn a_segment_ahead_of_the_writers_membership_gets_it_proposed_above() {
    let mut w = writer();
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let out = outputs(&mut w);
    let (node, req, pg, _, _) = appends(&out).into_iter().find(|a| a.2 == 0).unwrap();
    assert!(
        out.iter()
            .all(|o| !matches!(o, Output::Append { membership_epoch, .. } if *membership_epoch != 1))
    );
    w.on_reply(
        node,
        req,
        Message::error(ErrorCode::StaleMembership, 5, "membership epoch 1 is older than 5"),
    );
    let view = w.pg_view(pg).unwrap();
    let again = view.proposed.expect("proposed again");
    assert_eq!(again.epoch, 6);
    assert_eq!(again.members, view.membership.members);
    let sends = membership_sends(&outputs(&mut w));
    assert_eq!(sends.len(), 6, "every member told");
    take_tellings(&mut w, &sends, &[1, 2, 3, 4], 0);
    assert_eq!(w.pg_view(pg).unwrap().membership.epoch, 6);
    w.tick(config().retry_after_us);
    let out = outputs(&mut w);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Append { node: n, membership_epoch: 6, .. } if *n == node)),
        "the refused batch is sent again at the new epoch"
    );
}

/// An append sent before a step was proposed names the epoch below it; a
/// segment that took the step since refuses it naming the writer's own
/// epoch. That is no segment ahead: nothing is proposed again.
#[test]
fn a_refusal_naming_the_writers_own_step_proposes_nothing() {
    let mut w = writer();
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let (node, req, pg, _, _) = appends(&outputs(&mut w)).into_iter().find(|a| a.2 == 0).unwrap();
    w.change_membership(pg, Change::Replace { old: 6, new: member(7) })
        .unwrap();
    let step = w.pg_view(pg).unwrap().proposed.expect("a step").epoch;
    w.on_reply(
        node,
        req,
        Message::error(ErrorCode::StaleMembership, step, "the segment took the step"),
    );
    let proposed = w.pg_view(pg).unwrap().proposed.map(|m| m.epoch);
    assert_eq!(proposed, Some(step), "nothing proposed above the writer's own step");
}

/// A segment that refuses an append because it holds an older membership
/// than the writer's (it takes appends only once told) is told at once,
/// unless a telling is already on its way; nothing is proposed.
#[test]
fn a_segment_behind_the_writers_membership_is_told_it() {
    let mut w = writer();
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    w.submit(1, vec![delta(1, 1)]).unwrap();
    let (node, req, pg, _, _) = appends(&outputs(&mut w)).into_iter().find(|a| a.2 == 0).unwrap();
    w.on_reply(
        node,
        req,
        Message::error(ErrorCode::StaleMembership, 0, "the segment holds none"),
    );
    let out = outputs(&mut w);
    assert_eq!(told_pairs(&tellings(&out)), vec![(node, pg)]);
    assert!(w.pg_view(pg).unwrap().proposed.is_none());
    // The batch goes again after the pause; refused again while the
    // telling is out, it is not told twice.
    w.tick(config().retry_after_us);
    let again = appends(&outputs(&mut w));
    let (_, req, _, _, _) = again.into_iter().find(|a| a.0 == node && a.2 == pg).unwrap();
    w.on_reply(
        node,
        req,
        Message::error(ErrorCode::StaleMembership, 0, "the segment holds none"),
    );
    assert!(tellings(&outputs(&mut w)).is_empty());
}

/// The PGMRPLs sent in `out`, with their nodes: (node, pg, lsn).
fn pgmrpls_to(out: &[Output<u32>]) -> Vec<(u64, u32, u64)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Request {
                node,
                message: Message::SetPgmrpl { pg, lsn, .. },
                ..
            } => Some((*node, *pg, *lsn)),
            _ => None,
        })
        .collect()
}

/// A node a change adds gets no PGMRPL before it holds that membership:
/// taking it may make the node drop records it holds (a node rejoining
/// the PG), which must not be coalesced first. It gets it once it does.
#[test]
fn a_node_being_added_gets_the_pgmrpl_once_it_holds_the_membership() {
    // Said by its answer to the telling, or by a status it answered.
    for by_status in [false, true] {
        let mut w = writer();
        let start = membership_sends(&outputs(&mut w));
        take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
        w.change_membership(0, Change::Replace { old: 6, new: member(7) })
            .unwrap();
        w.node_up(7);
        let out = outputs(&mut w);
        let sends = membership_sends(&out);
        take_tellings(&mut w, &sends, &[1, 2, 3, 4, 5, 6], 0);
        assert!(commit_on(&mut w, 1, &[1, 2, 3, 4, 5]));
        w.tick(10 * 100_000);
        let sent = pgmrpls_to(&outputs(&mut w));
        let to: Vec<u64> = sent.iter().filter(|p| p.1 == 0).map(|p| p.0).collect();
        assert!(!to.is_empty() && !to.contains(&7), "{to:?}");
        let lsn = sent.iter().find(|p| p.1 == 0).unwrap().2;
        if by_status {
            let (node, request, pg) = status_asks(&out).into_iter().find(|a| a.0 == 7).expect("7 asked");
            let dual = &sends.iter().find(|s| s.0 == 7).unwrap().3;
            w.on_reply(node, request, holds(pg, 0, dual));
        } else {
            take_tellings(&mut w, &sends, &[7], 0);
        }
        assert_eq!(
            pgmrpls_to(&outputs(&mut w)),
            vec![(7, 0, lsn)],
            "by status: {by_status}"
        );
    }
}

/// A record committed before the change on 1, 2, 3 and F (a write quorum
/// of the old set) is on only 3 of the new set: the PG does not move to
/// the new set, however caught up G is, until 4 of the new set hold every
/// committed record (a recovery reading 3 of the new set could miss it).
#[test]
fn the_new_set_is_not_taken_before_it_holds_every_committed_record() {
    let mut w = writer();
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    assert!(commit_on(&mut w, 1, &[1, 2, 3, 6]));
    let committed = w.vdl();
    w.change_membership(0, Change::Replace { old: 6, new: member(7) })
        .unwrap();
    w.node_up(7);
    let out = outputs(&mut w);
    let sends = membership_sends(&out);
    take_tellings(&mut w, &sends, &[1, 2, 3, 6], committed);
    take_tellings(&mut w, &sends, &[4, 5, 7], 0);
    let view = w.pg_view(0).unwrap();
    assert!(
        view.membership.is_changing(),
        "the dual membership is in force: {view:?}"
    );
    assert!(
        view.proposed.is_none(),
        "moved to the new set with {committed} on 3 of it"
    );
    // 4 of the new set hold it, and G caught up: now the PG moves on.
    ack_all_pending(&mut w, &[4, 7]);
    let fin = w.pg_view(0).unwrap().proposed.expect("the final step");
    assert_eq!(membership::sets(&fin), vec![vec![1, 2, 3, 4, 5, 7]]);
}

/// On an idle PG, nothing but G's answer to its telling says it caught
/// up (no ack, no status ask of a segment that is not behind): that
/// answer moves the PG to the new set.
#[test]
fn an_idle_pg_moves_to_the_new_set_once_g_holds_the_dual_membership() {
    let mut w = writer();
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    w.change_membership(0, Change::Replace { old: 6, new: member(7) })
        .unwrap();
    let sends = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &sends, &[1, 2, 3, 4, 5, 6], 0);
    assert!(w.pg_view(0).unwrap().membership.is_changing());
    w.node_up(7);
    let g = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &g, &[7], 0);
    let fin = w.pg_view(0).unwrap().proposed.expect("the final step");
    assert_eq!(membership::sets(&fin), vec![vec![1, 2, 3, 4, 5, 7]]);
}

/// A status answer saying the node holds nothing of the PG (it came
/// after the telling that created the segment, or the segment is gone):
/// the segment is told its membership again, which creates it with the
/// writer's truncation ranges, rather than left to a first append that
/// would create it without them.
#[test]
fn a_segment_its_node_does_not_hold_is_told_again() {
    let mut w = writer();
    let out = outputs(&mut w);
    let start = membership_sends(&out);
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    let (_, request, _) = status_asks(&out)
        .into_iter()
        .find(|a| a.0 == 1 && a.2 == 0)
        .expect("node 1 asked PG 0's status");
    w.on_reply(
        1,
        request,
        Message::error(ErrorCode::UnknownSegment, 0, "no such segment"),
    );
    let again = membership_sends(&outputs(&mut w));
    assert_eq!(
        again.iter().map(|s| (s.0, s.2)).collect::<Vec<_>>(),
        vec![(1, 0)],
        "PG 0 told again on node 1"
    );
    assert_eq!(w.pg_view(0).unwrap().members[0].told_epoch, 0);
}

/// A record let go of (the PG's hold is full) once 4 of the old set had
/// it is not counted as at quorum when a change is proposed before its
/// transaction commits: the transaction waits for 4 of the new set too.
#[test]
fn a_record_let_go_of_counts_by_the_quorum_of_a_step_proposed_since() {
    let mut c = config();
    c.pg_held_bytes_max = 0;
    let mut w = Writer::new(c, 0);
    for n in 1..=6 {
        w.node_up(n);
    }
    let start = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    // LSN 1 on PG 1 (nodes 2, 3, 4, 5, 6, 1), LSN 2 on PG 0.
    w.submit(1, vec![delta(100, 1), delta(1, 1)]).unwrap();
    let sends = appends(&outputs(&mut w));
    for &(node, req, pg, _, last) in &sends {
        if pg == 1 && [2, 3, 4, 5].contains(&node) {
            ack(&mut w, node, req, pg, last);
        }
    }
    assert_eq!(w.released_through(1), 1, "let go of at the old quorum");
    // Node 2 is replaced by 7: the new set holds LSN 1 on 3, 4 and 5 only.
    w.change_membership(1, Change::Replace { old: 2, new: member(7) })
        .unwrap();
    for &(node, req, pg, _, last) in &sends {
        if pg == 0 {
            ack(&mut w, node, req, pg, last);
        }
    }
    assert!(commits(&outputs(&mut w)).is_empty(), "committed on 3 of the new set");
    let &(node, req, pg, _, last) = sends.iter().find(|s| s.2 == 1 && s.0 == 6).expect("sent to 6");
    ack(&mut w, node, req, pg, last);
    assert_eq!(commits(&outputs(&mut w)), vec![(1, 2)]);
}

/// A status answer showing an older membership than the segment took
/// (the node made it before it took the telling, and it came after the
/// telling's answer) does not lower what the segment is known to hold: a
/// change waiting for it goes on, and nothing needs telling again.
#[test]
fn an_answer_older_than_the_telling_it_follows_does_not_lower_what_the_segment_holds() {
    let mut w = writer();
    let out = outputs(&mut w);
    let start = membership_sends(&out);
    let (_, request, _) = status_asks(&out)
        .into_iter()
        .find(|a| a.0 == 1 && a.2 == 0)
        .expect("node 1 asked PG 0's status");
    take_tellings(&mut w, &start, &[1, 2, 3, 4, 5, 6], 0);
    w.change_membership(0, Change::Replace { old: 6, new: member(7) })
        .unwrap();
    let sends = membership_sends(&outputs(&mut w));
    take_tellings(&mut w, &sends, &[1], 0);
    // The status asked before the change comes now, showing epoch 1.
    let old = start.iter().find(|s| s.0 == 1 && s.2 == 0).unwrap().3.clone();
    w.on_reply(1, request, holds(0, 0, &old));
    assert!(membership_sends(&outputs(&mut w)).is_empty());
    let view = w.pg_view(0).unwrap();
    let one = view.members.iter().find(|m| m.id == 1).unwrap();
    assert_eq!(one.told_epoch, 2);
}
