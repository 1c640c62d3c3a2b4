//! The scrub requests against `storaged run` as a real process on
//! 127.0.0.1: who may ask (`Scrub` and `ScrubStatus` an operator,
//! `GetPageAt` a member storage node at the segment's epochs), a priority
//! pass completing, and a page served at an exact LSN.

use std::net::SocketAddr;
use std::time::Duration;

use storaged::client::{ClientError, NodeClient, PagePeers};
use storaged::proto::{ErrorCode, Message, Role};
use storaged::record::{RecordBody, RedoRecord, SegmentId, WireRecord};
use storaged::scrub::{Filter, Peers as _};

mod support;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const VOLUME: u64 = 42;
const SEG: SegmentId = SegmentId { volume: VOLUME, pg: 0 };

fn membership(epoch: u64) -> storaged::membership::Membership {
    let members = (5..=10)
        .map(|id| storaged::membership::Member {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        })
        .collect();
    storaged::membership::Membership::single(epoch, members)
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>, want: ErrorCode, text: &str) {
    match r {
        Err(ClientError::Refused { code, message, .. }) if code == want && message.contains(text) => {}
        other => panic!("expected {want:?} saying {text:?}, got {other:?}"),
    }
}

#[test]
fn scrub_requests_are_answered_for_their_roles_only() {
    let dir = support::tempdir("storaged-scrub-");
    let dev = support::format_device(dir.path(), "32m");
    let daemon = support::start_daemon(&dev, &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let writer = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
            let reply = writer
                .request(Message::SetMembership {
                    volume: VOLUME,
                    epoch: 1,
                    pg: 0,
                    page_bytes: 8192,
                    pg_pages: 64,
                    membership: membership(1),
                    annulled: Vec::new(),
                })
                .await
                .unwrap();
            assert!(matches!(reply, Message::SegmentStatus { .. }), "{reply:?}");
            let record = RedoRecord {
                segment: SEG,
                lsn: 1,
                prev_lsn_pg: 0,
                prev_lsn_page: 0,
                page: 3,
                cpl: true,
                body: RecordBody::PageImage(vec![7; 8192]),
            };
            let reply = writer
                .request(Message::Append {
                    volume: VOLUME,
                    epoch: 1,
                    pg: 0,
                    page_bytes: 8192,
                    pg_pages: 64,
                    membership_epoch: 0,
                    records: vec![WireRecord::new(record)],
                })
                .await
                .unwrap();
            assert!(matches!(reply, Message::AppendAck { scl: 1, .. }), "{reply:?}");

            // An operator: a priority pass is numbered (once the scrubber
            // read its progress, a moment after start-up) and completes.
            let operator = NodeClient::connect(daemon.addr, Role::Operator, 0).await.unwrap();
            let pass = loop {
                match operator.scrub(Filter::Segments(vec![SEG])).await {
                    Ok(pass) => break pass,
                    Err(e) => {
                        refused(Err::<(), _>(e), ErrorCode::BadRequest, "not running");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            };
            assert!(pass >= 1);
            let last = loop {
                let st = operator.scrub_status().await.unwrap();
                if let Some(last) = st.last.filter(|l| l.pass >= pass) {
                    break last;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            };
            assert!(last.priority && last.bytes_read > 0, "{last:?}");
            assert!(last.areas.iter().all(|(_, a)| a.found == 0), "{last:?}");
            refused(
                operator.get_page_at(SEG, 1, 1, 3, 1).await,
                ErrorCode::BadRequest,
                "storage node's request",
            );

            // The writer and a peer may not ask for a pass or the status.
            refused(
                writer.scrub(Filter::All).await,
                ErrorCode::BadRequest,
                "operator's request",
            );
            let peer = NodeClient::connect(daemon.addr, Role::StorageNode, 6).await.unwrap();
            refused(peer.scrub_status().await, ErrorCode::BadRequest, "operator's request");

            // GetPageAt passes the gate of PullRecords first.
            let stranger = NodeClient::connect(daemon.addr, Role::StorageNode, 99).await.unwrap();
            refused(stranger.get_page_at(SEG, 1, 1, 3, 1).await, ErrorCode::NotMember, "99");
            match peer.get_page_at(SEG, 1, 2, 3, 1).await {
                Err(ClientError::Refused {
                    code: ErrorCode::StaleMembership,
                    current_epoch: 1,
                    ..
                }) => {}
                other => panic!("expected StaleMembership, got {other:?}"),
            }
            match peer.get_page_at(SEG, 2, 1, 3, 1).await {
                Err(ClientError::Refused {
                    code: ErrorCode::StaleEpoch,
                    current_epoch: 1,
                    ..
                }) => {}
                other => panic!("expected StaleEpoch, got {other:?}"),
            }
            refused(
                peer.get_page_at(SegmentId { volume: VOLUME, pg: 9 }, 1, 1, 3, 1).await,
                ErrorCode::UnknownSegment,
                "pg 9",
            );
            // A member at the same epochs gets the page as of the LSN; one
            // above the segment's SCL is not held.
            assert_eq!(peer.get_page_at(SEG, 1, 1, 3, 1).await.unwrap(), vec![7; 8192]);
            refused(peer.get_page_at(SEG, 1, 1, 3, 2).await, ErrorCode::NotHeld, "LSN 2");

            // The scrubber's peers, as node 6 asks them; a node that is not
            // the one the membership puts at the address is refused.
            let peers = PagePeers::new(6);
            assert_eq!(
                peers.page_at((5, daemon.addr), SEG, (1, 1), 3, 1).await.unwrap(),
                vec![7; 8192]
            );
            let e = peers.page_at((5, daemon.addr), SEG, (1, 1), 3, 2).await.unwrap_err();
            assert!(e.starts_with("node 5: ") && e.contains("NotHeld"), "{e}");
            let e = peers.page_at((7, daemon.addr), SEG, (1, 1), 3, 1).await.unwrap_err();
            assert!(e.contains("is node 5"), "{e}");
        })
        .await
        .expect("test timed out")
    });
}
