//! `storaged run` as a real process on 127.0.0.1 with a file device: appends
//! over TCP, acks by SCL, gaps, re-sends, conflicts, epochs, bad frames,
//! kill -9 and restart, SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use storaged::client::NodeClient;
use storaged::proto::{ErrorCode, Message, Role};
use storaged::record::{RecordBody, RedoRecord, SegmentId, WireRecord};
use support::run;
use testkit::Daemon;

mod support;

const VOLUME: u64 = 42;
/// The volume's geometry, as computed states it in every Append.
const PAGE_BYTES: u32 = 8192;
const PG_PAGES: u64 = 64;

fn tempdir() -> tempfile::TempDir {
    support::tempdir("storaged-node-")
}

fn start_daemon(device: &Path) -> Daemon {
    support::start_daemon(device, &[])
}

fn format_device(dir: &Path) -> PathBuf {
    support::format_device(dir, "32m")
}

fn rec(pg: u32, lsn: u64, prev: u64, byte: u8) -> RedoRecord {
    RedoRecord {
        segment: SegmentId { volume: VOLUME, pg },
        lsn,
        prev_lsn_pg: prev,
        prev_lsn_page: 0,
        page: pg as u64 * PG_PAGES + lsn % 7,
        cpl: true,
        body: RecordBody::PageDelta {
            offset: 16,
            bytes: vec![byte; 100],
        },
    }
}

async fn append(c: &NodeClient, pg: u32, epoch: u64, records: Vec<RedoRecord>) -> Message {
    c.request(Message::Append {
        volume: VOLUME,
        epoch,
        pg,
        page_bytes: PAGE_BYTES,
        pg_pages: PG_PAGES,
        membership_epoch: 0,
        records: records.into_iter().map(WireRecord::new).collect(),
    })
    .await
    .unwrap()
}

fn scl_of(m: &Message) -> u64 {
    match m {
        Message::AppendAck { scl, .. } => *scl,
        other => panic!("expected an AppendAck, got {other:?}"),
    }
}

/// The segment's status as an operator reads it (epoch 0).
async fn segment_status(c: &NodeClient, pg: u32) -> Message {
    c.request(Message::GetSegmentStatus {
        volume: VOLUME,
        epoch: 0,
        pg,
    })
    .await
    .unwrap()
}

async fn status(c: &NodeClient, pg: u32) -> (u64, u64, u64) {
    match segment_status(c, pg).await {
        Message::SegmentStatus {
            scl,
            epoch,
            highest_lsn,
            ..
        } => (scl, epoch, highest_lsn),
        other => panic!("expected SegmentStatus, got {other:?}"),
    }
}

#[test]
fn appends_are_acked_with_the_scl_gaps_hold_it_resends_do_not() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        assert_eq!(c.node_id, 5);
        assert_eq!(
            scl_of(&append(&c, 0, 1, vec![rec(0, 10, 0, 1), rec(0, 20, 10, 1)]).await),
            20
        );
        // 40 links to 30, which is missing: held, SCL stays.
        assert_eq!(scl_of(&append(&c, 0, 1, vec![rec(0, 40, 30, 1)]).await), 20);
        assert_eq!(status(&c, 0).await, (20, 1, 40));
        assert_eq!(scl_of(&append(&c, 0, 1, vec![rec(0, 30, 20, 1)]).await), 40);
        // A re-send changes nothing.
        assert_eq!(
            scl_of(&append(&c, 0, 1, vec![rec(0, 10, 0, 1), rec(0, 20, 10, 1)]).await),
            40
        );
        // Other content at a held LSN is a conflict, reported, not stored.
        match append(&c, 0, 1, vec![rec(0, 20, 10, 9)]).await {
            Message::Error {
                code: ErrorCode::Conflict,
                ..
            } => {}
            other => panic!("expected a conflict, got {other:?}"),
        }
        // Another segment on the same connection is independent.
        assert_eq!(scl_of(&append(&c, 3, 1, vec![rec(3, 11, 0, 1)]).await), 11);
        // Many requests in flight on one connection.
        let mut futs = Vec::new();
        for i in 0..50u64 {
            let lsn = 100 + i;
            futs.push(append(&c, 7, 1, vec![rec(7, lsn, if i == 0 { 0 } else { lsn - 1 }, 2)]));
        }
        let acks = futures_util::future::join_all(futs).await;
        assert!(acks.iter().all(|m| matches!(m, Message::AppendAck { .. })));
        assert_eq!(status(&c, 7).await.0, 149);
    });
}

#[test]
fn stale_epochs_are_refused_with_the_current_one_and_epochs_survive_restart() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        assert_eq!(scl_of(&append(&c, 0, 3, vec![rec(0, 1, 0, 1)]).await), 1);
        match append(&c, 0, 2, vec![rec(0, 2, 1, 1)]).await {
            Message::Error {
                code: ErrorCode::StaleEpoch,
                current_epoch: 3,
                ..
            } => {}
            other => panic!("expected StaleEpoch naming epoch 3, got {other:?}"),
        }
        assert_eq!(status(&c, 0).await, (1, 3, 1), "the refused record was not stored");
    });
    daemon.kill9();
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        match append(&c, 0, 2, vec![rec(0, 2, 1, 1)]).await {
            Message::Error {
                code: ErrorCode::StaleEpoch,
                current_epoch: 3,
                ..
            } => {}
            other => panic!("the epoch must survive kill -9; got {other:?}"),
        }
    });
}

#[test]
fn kill_9_at_any_moment_loses_no_acknowledged_record() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let mut acked_scl = 0;
    for round in 0..4u64 {
        let daemon = start_daemon(&dev);
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let addr = daemon.addr;
        let first = round * 10_000 + 1;
        // A writer appending as fast as acks come back, until the node dies.
        let writer = std::thread::spawn(move || {
            run(async move {
                let c = NodeClient::connect(addr, Role::Computed, 0).await.unwrap();
                // The segment does not exist before the first append.
                let mut prev = match segment_status(&c, 0).await {
                    Message::SegmentStatus { scl, .. } => scl,
                    Message::Error {
                        code: ErrorCode::UnknownSegment,
                        ..
                    } => 0,
                    other => panic!("{other:?}"),
                };
                for lsn in first.. {
                    match c
                        .request(Message::Append {
                            volume: VOLUME,
                            epoch: 1,
                            pg: 0,
                            page_bytes: PAGE_BYTES,
                            pg_pages: PG_PAGES,
                            membership_epoch: 0,
                            records: vec![WireRecord::new(rec(0, lsn, prev, 3))],
                        })
                        .await
                    {
                        Ok(Message::AppendAck { scl, .. }) => {
                            let _ = tx.send(scl);
                        }
                        _ => return,
                    }
                    prev = lsn;
                }
            })
        });
        std::thread::sleep(Duration::from_millis(150 + 97 * round));
        daemon.kill9();
        writer.join().unwrap();
        acked_scl = rx.try_iter().max().unwrap_or(acked_scl).max(acked_scl);
        let daemon = start_daemon(&dev);
        run(async {
            let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
            let (scl, ..) = status(&c, 0).await;
            assert!(
                scl >= acked_scl,
                "round {round}: SCL {scl} after restart is below the acknowledged {acked_scl}"
            );
        });
        assert!(daemon.terminate().success());
    }
    assert!(acked_scl > 0, "the writer made progress");
}

/// A GetSegmentStatus frame with request id `id`, as raw bytes.
fn status_frame(id: u64) -> Vec<u8> {
    let mut f = Vec::new();
    storaged::proto::encode_frame(
        id,
        &Message::GetSegmentStatus {
            volume: 1,
            epoch: 0,
            pg: 0,
        },
        &mut f,
    )
    .unwrap();
    f
}

/// Send raw bytes on a new connection and read everything the node sends
/// back until it closes the connection.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    reply
}

#[test]
fn a_malformed_frame_is_answered_and_dropped_and_others_are_served() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let good = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        for garbage in [
            b"\x10\x00\x00\x00GARBAGE-GARBAGE!".to_vec(),
            vec![0xFF, 0xFF, 0xFF, 0x7F, 1, 2, 3],
            {
                let mut f = status_frame(1);
                f[12] ^= 0x20; // CRC no longer matches
                f
            },
        ] {
            let reply = send_raw(daemon.addr, &garbage).await;
            let decoded = storaged::proto::decode_frame(&reply, 1 << 22).unwrap();
            assert!(
                matches!(
                    decoded,
                    Some((
                        storaged::proto::Frame {
                            message: Message::Error { .. },
                            ..
                        },
                        _
                    ))
                ),
                "{decoded:?}"
            );
        }
        // A request before Hello is refused too.
        let reply = send_raw(daemon.addr, &status_frame(9)).await;
        assert!(matches!(
            storaged::proto::decode_frame(&reply, 1 << 22).unwrap(),
            Some((
                storaged::proto::Frame {
                    request_id: 9,
                    message: Message::Error {
                        code: ErrorCode::BadRequest,
                        ..
                    }
                },
                _
            ))
        ));
        // The well-behaved connection was never disturbed.
        assert_eq!(scl_of(&append(&good, 0, 1, vec![rec(0, 5, 0, 1)]).await), 5);
    });
    assert!(daemon.terminate().success(), "SIGTERM exits 0");
}

#[test]
fn pgmrpl_is_durable_and_only_moves_forward() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        append(&c, 0, 1, vec![rec(0, 1, 0, 1), rec(0, 2, 1, 1)]).await;
        for (lsn, expect) in [(2, 2), (1, 2)] {
            let reply = c
                .request(Message::SetPgmrpl {
                    volume: VOLUME,
                    epoch: 1,
                    pg: 0,
                    lsn,
                })
                .await
                .unwrap();
            assert!(
                matches!(reply, Message::PgmrplOk { pgmrpl, .. } if pgmrpl == expect),
                "{reply:?}"
            );
        }
    });
    daemon.kill9();
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        match segment_status(&c, 0).await {
            Message::SegmentStatus { pgmrpl: 2, scl: 2, .. } => {}
            other => panic!("{other:?}"),
        }
    });
}

async fn get_page(c: &NodeClient, pg: u32, page: u64, read_point: u64) -> Message {
    c.request(Message::GetPage {
        volume: VOLUME,
        epoch: 1,
        pg,
        page,
        read_point,
        membership_epoch: 0,
    })
    .await
    .unwrap()
}

#[test]
fn get_page_at_every_read_point_equals_a_model_and_survives_kill_9() {
    const PAGE: usize = 8192;
    let dir = tempdir();
    let dev = format_device(dir.path());
    // Changes to pages 1 and 2 of pg 0, one record per LSN, chained.
    let mut records = Vec::new();
    for lsn in 1..=30u64 {
        let page = 1 + lsn % 2;
        let body = if lsn % 10 == 1 {
            RecordBody::PageImage(vec![lsn as u8; PAGE])
        } else {
            RecordBody::PageDelta {
                offset: (lsn * 97 % 8000) as u32,
                bytes: vec![lsn as u8; 150],
            }
        };
        records.push(RedoRecord {
            segment: SegmentId { volume: VOLUME, pg: 0 },
            lsn,
            prev_lsn_pg: lsn - 1,
            prev_lsn_page: lsn.saturating_sub(2),
            page,
            cpl: true,
            body,
        });
    }
    let model = |page: u64, read_point: u64| {
        let mut bytes = vec![0u8; PAGE];
        let mut at = 0;
        for r in records.iter().filter(|r| r.page == page && r.lsn <= read_point) {
            storaged::hot::apply(&mut bytes, &r.body).unwrap();
            at = r.lsn;
        }
        (bytes, at)
    };
    let check_all = |c: NodeClient| {
        let model = &model;
        async move {
            for read_point in 0..=30 {
                for page in [1u64, 2, 3] {
                    match get_page(&c, 0, page, read_point).await {
                        Message::Page { bytes, lsn, .. } => {
                            let (want, want_lsn) = model(page, read_point);
                            let differs = bytes.iter().zip(&want).position(|(a, b)| a != b);
                            assert!(
                                lsn == want_lsn && bytes.len() == want.len() && differs.is_none(),
                                "page {page} at {read_point}: lsn {lsn} (want {want_lsn}), first differing byte {differs:?}"
                            );
                        }
                        other => panic!("page {page} at {read_point}: {other:?}"),
                    }
                }
            }
        }
    };
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        for chunk in records.chunks(7) {
            assert!(matches!(
                append(&c, 0, 1, chunk.to_vec()).await,
                Message::AppendAck { .. }
            ));
        }
        check_all(c).await;
    });
    daemon.kill9();
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        // Above the SCL: refused, so computed asks another segment.
        match get_page(&c, 0, 1, 31).await {
            Message::Error {
                code: ErrorCode::ReadPointAboveScl,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        // A change that does not fit the page is refused and not stored.
        let bad = RedoRecord {
            segment: SegmentId { volume: VOLUME, pg: 0 },
            lsn: 31,
            prev_lsn_pg: 30,
            prev_lsn_page: 0,
            page: 1,
            cpl: true,
            body: RecordBody::PageDelta {
                offset: 8190,
                bytes: vec![1; 10],
            },
        };
        match append(&c, 0, 1, vec![bad]).await {
            Message::Error {
                code: ErrorCode::BadRequest,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        check_all(c).await;
    });
}

#[test]
fn a_full_log_is_refused_with_a_clear_error_not_a_hang() {
    let dir = tempdir();
    let dev = support::format_device(dir.path(), "4m");
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        // One record per append takes a whole 4 KiB block: a 1 MiB log is
        // full after a few hundred, and nothing is coalesced yet to free it.
        let mut acked = 0;
        let refusal = loop {
            let lsn = acked + 1;
            match append(&c, 0, 1, vec![rec(0, lsn, acked, 1)]).await {
                Message::AppendAck { scl, .. } => {
                    assert_eq!(scl, lsn);
                    acked = lsn;
                }
                other => break other,
            }
            assert!(acked < 1000, "a 1 MiB log cannot take 1000 blocks");
        };
        match refusal {
            Message::Error {
                code: ErrorCode::Overloaded,
                message,
                ..
            } => assert!(message.contains("log is full"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(acked > 100);
        // Reads go on, and what was acknowledged is there.
        assert_eq!(status(&c, 0).await.0, acked);
        assert!(matches!(get_page(&c, 0, 1, acked).await, Message::Page { .. }));
    });
}

/// Every page of `pg` that `records` touch (and one they do not) read at
/// each read point equals the records applied in LSN order.
async fn check_pages(c: &NodeClient, records: &[RedoRecord], pg: u32, read_points: impl IntoIterator<Item = u64>) {
    let first = pg as u64 * PG_PAGES;
    for read_point in read_points {
        for page in first..first + 10 {
            let mut want = vec![0u8; PAGE_BYTES as usize];
            let mut want_lsn = 0;
            for r in records.iter().filter(|r| r.page == page && r.lsn <= read_point) {
                storaged::hot::apply(&mut want, &r.body).unwrap();
                want_lsn = r.lsn;
            }
            match get_page(c, pg, page, read_point).await {
                Message::Page { bytes, lsn, .. } => {
                    assert!(
                        bytes == want && lsn == want_lsn,
                        "page {page} at read point {read_point}"
                    );
                }
                other => panic!("page {page} at {read_point}: {other:?}"),
            }
        }
    }
}

#[test]
fn coalesced_pages_survive_kill_9_and_read_the_same_at_every_read_point() {
    const PAGE: usize = PAGE_BYTES as usize;
    let dir = tempdir();
    let dev = format_device(dir.path());
    // 200 chained records over 9 pages of pg 3: images now and then, deltas otherwise.
    let pg = 3;
    let first = pg as u64 * PG_PAGES;
    let records: Vec<RedoRecord> = (1..=200u64)
        .map(|lsn| RedoRecord {
            segment: SegmentId { volume: VOLUME, pg },
            lsn,
            prev_lsn_pg: lsn - 1,
            prev_lsn_page: 0,
            page: first + lsn * 5 % 9,
            cpl: true,
            body: if lsn % 17 == 0 {
                RecordBody::PageImage(vec![lsn as u8; PAGE])
            } else {
                RecordBody::PageDelta {
                    offset: (lsn * 131 % 7900) as u32,
                    bytes: vec![lsn as u8; 200],
                }
            },
        })
        .collect();
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        for chunk in records.chunks(13) {
            assert!(matches!(
                append(&c, pg, 1, chunk.to_vec()).await,
                Message::AppendAck { .. }
            ));
        }
        let ok = c
            .request(Message::SetPgmrpl {
                volume: VOLUME,
                epoch: 1,
                pg,
                lsn: 150,
            })
            .await
            .unwrap();
        assert!(matches!(ok, Message::PgmrplOk { pgmrpl: 150, .. }), "{ok:?}");
        // Coalescing runs in the background: records up to PGMRPL leave memory.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let lowest = match segment_status(&c, pg).await {
                Message::SegmentStatus {
                    lowest_lsn,
                    page_store_bytes,
                    ..
                } => {
                    assert!(page_store_bytes > 0);
                    lowest_lsn
                }
                other => panic!("{other:?}"),
            };
            if lowest > 150 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not coalesced: lowest LSN held {lowest}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check_pages(&c, &records, pg, [150, 151, 190, 200]).await;
        // Below PGMRPL versions may be gone: refused, not answered wrongly.
        match get_page(&c, pg, first, 149).await {
            Message::Error {
                code: ErrorCode::ReadPointBelowPgmrpl,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    });
    daemon.kill9();
    let daemon = start_daemon(&dev);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        let (scl, _, _) = status(&c, pg).await;
        assert_eq!(scl, 200);
        check_pages(&c, &records, pg, [150, 175, 200]).await;
        // The chain goes on from where it was.
        let next = RedoRecord {
            lsn: 201,
            prev_lsn_pg: 200,
            ..records[0].clone()
        };
        assert_eq!(scl_of(&append(&c, pg, 1, vec![next]).await), 201);
    });
}

/// Nodes 5 (the daemon) to 10, on made-up ports: the membership names them.
fn membership(epoch: u64) -> storaged::membership::Membership {
    let members = (5..=10)
        .map(|id| storaged::membership::Member {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        })
        .collect();
    storaged::membership::Membership::single(epoch, members)
}

/// The writer's `SetMembership` of PG 0 at volume epoch 1.
fn set_membership(membership: storaged::membership::Membership) -> Message {
    Message::SetMembership {
        volume: VOLUME,
        epoch: 1,
        pg: 0,
        page_bytes: PAGE_BYTES,
        pg_pages: PG_PAGES,
        membership,
        annulled: Vec::new(),
    }
}

/// A writer's connection to the node at `addr` that has set PG 0's
/// membership at `epoch`.
async fn writer_told(addr: SocketAddr, epoch: u64) -> NodeClient {
    let writer = NodeClient::connect(addr, Role::Computed, 0).await.unwrap();
    let reply = writer.request(set_membership(membership(epoch))).await.unwrap();
    assert!(
        matches!(&reply, Message::SegmentStatus { membership: Some(m), .. } if *m == membership(epoch)),
        "{reply:?}"
    );
    writer
}

/// Gossip requests are a storage node's: the writer sets the membership,
/// a member storage node gets our digest and pulls the chain; an operator's
/// connection and a node outside the membership are refused.
#[test]
fn gossip_requests_are_answered_for_member_storage_nodes_only() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let writer = writer_told(daemon.addr, 1).await;
        assert_eq!(
            scl_of(&append(&writer, 0, 1, vec![rec(0, 1, 0, 1), rec(0, 2, 1, 2)]).await),
            2
        );
        let digest = storaged::proto::GossipDigest {
            installed_epoch: 1,
            membership_epoch: 1,
            scl: 0,
            highest_lsn: 0,
            floor: 0,
        };
        let ask = Message::Digest {
            volume: VOLUME,
            pg: 0,
            digest,
        };
        let operator = NodeClient::connect(daemon.addr, Role::Operator, 6).await.unwrap();
        let reply = operator.request(ask.clone()).await.unwrap();
        assert!(
            matches!(&reply, Message::Error { code: ErrorCode::BadRequest, message, .. } if message.contains("storage node")),
            "{reply:?}"
        );
        let stranger = NodeClient::connect(daemon.addr, Role::StorageNode, 99).await.unwrap();
        let reply = stranger.request(ask.clone()).await.unwrap();
        assert!(
            matches!(
                reply,
                Message::Error {
                    code: ErrorCode::NotMember,
                    ..
                }
            ),
            "{reply:?}"
        );
        let peer = NodeClient::connect(daemon.addr, Role::StorageNode, 6).await.unwrap();
        let reply = peer.request(ask).await.unwrap();
        match reply {
            Message::DigestOk {
                volume: VOLUME,
                pg: 0,
                digest,
            } => {
                assert_eq!((digest.scl, digest.highest_lsn, digest.membership_epoch), (2, 2, 1));
            }
            other => panic!("expected DigestOk, got {other:?}"),
        }
        let pull = |membership_epoch| Message::PullRecords {
            volume: VOLUME,
            pg: 0,
            installed_epoch: 1,
            membership_epoch,
            after: 0,
            max_bytes: 1 << 20,
        };
        match peer.request(pull(1)).await.unwrap() {
            Message::Records { scl: 2, records, .. } => {
                assert_eq!(records, vec![rec(0, 1, 0, 1), rec(0, 2, 1, 2)]);
            }
            other => panic!("expected Records, got {other:?}"),
        }
        let reply = peer.request(pull(2)).await.unwrap();
        assert!(
            matches!(
                reply,
                Message::Error {
                    code: ErrorCode::StaleMembership,
                    current_epoch: 1,
                    ..
                }
            ),
            "{reply:?}"
        );
        let reply = operator.request(pull(1)).await.unwrap();
        assert!(
            matches!(
                reply,
                Message::Error {
                    code: ErrorCode::BadRequest,
                    ..
                }
            ),
            "{reply:?}"
        );
    });
}

/// A writer's appends and reads name the PG's membership epoch as the
/// writer has it: one below the segment's is refused with the segment's
/// epoch, and stores nothing; the same, or 0 (not checked) are served. A
/// higher one is from a writer that has not told this segment yet: a read
/// is served, an append only at the next epoch (the node is a member of
/// the one it holds); further ahead it is refused, naming the lower epoch
/// the segment holds, until the writer tells it (the telling may make a
/// node that rejoins the PG drop what it holds).
#[test]
fn a_request_from_behind_a_membership_change_is_refused_with_the_current_epoch() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let writer = writer_told(daemon.addr, 3).await;
        let append_at = |membership_epoch: u64, lsn: u64| Message::Append {
            volume: VOLUME,
            epoch: 1,
            pg: 0,
            page_bytes: PAGE_BYTES,
            pg_pages: PG_PAGES,
            membership_epoch,
            records: vec![WireRecord::new(rec(0, lsn, lsn - 1, lsn as u8))],
        };
        // Behind, and two steps ahead.
        for refused in [2, 5] {
            match writer.request(append_at(refused, 1)).await.unwrap() {
                Message::Error {
                    code: ErrorCode::StaleMembership,
                    current_epoch: 3,
                    ..
                } => {}
                other => panic!("{refused}: expected StaleMembership naming epoch 3, got {other:?}"),
            }
            assert_eq!(status(&writer, 0).await.0, 0, "the refused record was not stored");
        }
        assert_eq!(scl_of(&writer.request(append_at(3, 1)).await.unwrap()), 1);
        assert_eq!(scl_of(&writer.request(append_at(4, 2)).await.unwrap()), 2);
        assert_eq!(scl_of(&writer.request(append_at(0, 3)).await.unwrap()), 3);
        let read_at = |membership_epoch: u64| Message::GetPage {
            volume: VOLUME,
            epoch: 1,
            pg: 0,
            page: 3, // LSN 3's page
            read_point: 3,
            membership_epoch,
        };
        assert!(matches!(
            writer.request(read_at(1)).await.unwrap(),
            Message::Error {
                code: ErrorCode::StaleMembership,
                current_epoch: 3,
                ..
            }
        ));
        assert!(matches!(
            writer.request(read_at(3)).await.unwrap(),
            Message::Page { lsn: 3, .. }
        ));
    });
}

/// `FillGaps` (what `storctl repair --pg` sends) is an operator's request,
/// for a segment the node holds with a membership: a segment it does not
/// hold, or one no writer has told its PG, is refused saying so.
#[test]
fn fill_gaps_is_an_operators_request_for_a_segment_with_a_membership() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let writer = writer_told(daemon.addr, 1).await;
        // PG 1: sealed (created) but told no membership.
        let reply = writer
            .request(Message::Seal {
                volume: VOLUME,
                epoch: 1,
                pg: 1,
                page_bytes: PAGE_BYTES,
                pg_pages: PG_PAGES,
            })
            .await
            .unwrap();
        assert!(matches!(reply, Message::SegmentStatus { .. }), "{reply:?}");

        let operator = NodeClient::connect(daemon.addr, Role::Operator, 0).await.unwrap();
        let seg = |pg| SegmentId { volume: VOLUME, pg };
        operator.fill_gaps(seg(0)).await.unwrap();
        let refused = |r: Result<(), storaged::client::ClientError>, text: &str| match r {
            Err(storaged::client::ClientError::Refused {
                code: ErrorCode::UnknownSegment,
                message,
                ..
            }) if message.contains(text) => {}
            other => panic!("expected UnknownSegment saying {text:?}, got {other:?}"),
        };
        refused(operator.fill_gaps(seg(1)).await, "no membership");
        refused(operator.fill_gaps(seg(2)).await, "unknown segment");
        only_an_operators(writer.fill_gaps(seg(0)).await);
        // The node goes on serving.
        assert_eq!(status(&writer, 0).await.1, 1);
    });
}

/// `NodeStatus` (what `storctl repair` asks before a move) says the page
/// store's room: all of it on a new device, less one segment's extent for
/// each segment the node takes; and the log's blocks. It is an operator's
/// request.
#[test]
fn node_status_says_the_room_the_page_store_has_left() {
    let dir = tempdir();
    let dev = format_device(dir.path());
    let daemon = start_daemon(&dev);
    run(async {
        let operator = NodeClient::connect(daemon.addr, Role::Operator, 0).await.unwrap();
        let empty = operator.node_status().await.unwrap();
        assert!(empty.page_store_blocks > 0);
        assert_eq!(empty.page_store_free_blocks, empty.page_store_blocks);
        assert!(empty.log_blocks > 0 && empty.log_free_blocks <= empty.log_blocks);

        let writer = writer_told(daemon.addr, 1).await;
        let per_segment = storaged::pagestore::Extent::blocks_for(PAGE_BYTES, PG_PAGES).unwrap();
        let one = operator.node_status().await.unwrap();
        assert_eq!(one.node_id, empty.node_id);
        assert_eq!(one.page_store_blocks, empty.page_store_blocks);
        assert_eq!(one.page_store_free_blocks, empty.page_store_blocks - per_segment);

        only_an_operators(writer.node_status().await);
        assert_eq!(status(&writer, 0).await.1, 1);
    });
}

/// An operator's request asked on a writer's connection: refused, saying so.
fn only_an_operators<T: std::fmt::Debug>(r: Result<T, storaged::client::ClientError>) {
    match r {
        Err(storaged::client::ClientError::Refused {
            code: ErrorCode::BadRequest,
            message,
            ..
        }) if message.contains("operator's request") => {}
        other => panic!("expected BadRequest from a writer's connection, got {other:?}"),
    }
}
