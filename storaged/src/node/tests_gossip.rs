//! Gossip repair between two nodes in-process (no network), each on its own
//! simulated disk: a segment that lacks records pulls them from a member
//! peer, its SCL rises only once they are durable, and it keeps them across
//! a restart; what is refused (non-members, other membership or volume
//! epochs, annulled records) stores nothing. Paused tokio time.

use std::net::SocketAddr;
use std::sync::Arc;

use super::tests::{GEOMETRY, SEG, config, model, records, wire};
use super::*;
use crate::gossip::Digest;
use crate::io::sim::{SimDisk, SimFaults};
use crate::log::mkfs::{FormatOptions, format};
use crate::membership::Member;

const A: u64 = 1;
const B: u64 = 2;

async fn disk_of(node_id: u64) -> Arc<SimDisk> {
    let disk = Arc::new(SimDisk::new(16 << 20, node_id, SimFaults::none()));
    format(
        disk.as_ref(),
        FormatOptions {
            node_id,
            log_bytes: Some(1 << 20),
            force: false,
        },
    )
    .await
    .unwrap();
    disk
}

/// Nodes `first..first + 6` (A and B among them for `first` = 1).
pub(super) fn membership(epoch: u64, first: u64) -> Membership {
    let members = (first..first + 6)
        .map(|id| Member {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        })
        .collect();
    Membership::single(epoch, members)
}

async fn open(disk: &Arc<SimDisk>) -> Arc<Node> {
    Node::open(disk.clone(), config()).await.unwrap().0
}

/// A holds 1..=12; B holds 1..=3 and 10..=12 (it missed 4..=9), so its SCL
/// stays at 3. Both with membership epoch 1.
async fn a_and_b() -> (Arc<SimDisk>, Arc<Node>, Arc<SimDisk>, Arc<Node>, Vec<RedoRecord>) {
    let all = records(1, 12, 1);
    let (disk_a, disk_b) = (disk_of(A).await, disk_of(B).await);
    let (a, b) = (open(&disk_a).await, open(&disk_b).await);
    for node in [&a, &b] {
        node.set_membership(SEG, 1, GEOMETRY, membership(1, 1)).await.unwrap();
        assert_eq!(node.append(SEG, 1, GEOMETRY, wire(all[..3].to_vec())).await.unwrap(), 3);
    }
    assert_eq!(a.append(SEG, 1, GEOMETRY, wire(all[3..].to_vec())).await.unwrap(), 12);
    assert_eq!(b.append(SEG, 1, GEOMETRY, wire(all[9..].to_vec())).await.unwrap(), 3);
    (disk_a, a, disk_b, b, all)
}

#[tokio::test(start_paused = true)]
async fn a_segment_pulls_what_it_lacks_from_a_member_and_keeps_it_across_a_restart() {
    let (_disk_a, a, disk_b, b, all) = a_and_b().await;
    // What the gossip core is told: B lacks (3, 9], A holds the chain to 12.
    let locals = b.gossip_locals();
    assert_eq!(locals.len(), 1);
    let (id, local, m) = &locals[0];
    assert_eq!((*id, m), (SEG, &membership(1, 1)));
    assert_eq!(local.missing, vec![(3, 9)]);
    assert_eq!(local.members, (1..=6).collect::<Vec<_>>());
    let digest_b = local.digest;
    assert_eq!(
        (digest_b.scl, digest_b.highest_lsn, digest_b.installed_epoch),
        (3, 12, 1)
    );
    let digest_a = a.peer_digest(SEG, B, digest_b).unwrap();
    assert_eq!((digest_a.scl, digest_a.highest_lsn, digest_a.floor), (12, 12, 0));
    assert!(a.gossip_locals()[0].1.missing.is_empty());

    let (scl, pulled) = a.pull_records(SEG, B, 1, 1, 3, 1 << 20).unwrap();
    assert_eq!(scl, 12);
    assert_eq!(pulled, all[3..].to_vec());
    // 10..=12 are re-sends to B: fine.
    assert_eq!(b.admit_pulled(SEG, 1, 1, pulled).await.unwrap(), 12);
    assert!(b.gossip_locals()[0].1.missing.is_empty());
    for page in GEOMETRY_PAGES {
        assert_eq!(b.get_page(SEG, 1, page, 12).await.unwrap(), model(&all, page, 12));
    }
    b.shutdown().await;

    let b = open(&disk_b).await;
    let st = b.status(SEG, 0).unwrap();
    assert_eq!((st.scl, st.highest_lsn), (12, 12));
    assert_eq!(
        st.membership,
        Some(membership(1, 1)),
        "the membership survives a restart"
    );
    for page in GEOMETRY_PAGES {
        assert_eq!(b.get_page(SEG, 1, page, 12).await.unwrap(), model(&all, page, 12));
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// The pages `records()` writes (and one it does not).
const GEOMETRY_PAGES: std::ops::Range<u64> = super::tests::FIRST_PAGE..super::tests::FIRST_PAGE + 13;

#[tokio::test(start_paused = true)]
async fn peers_outside_the_membership_or_at_other_epochs_are_refused() {
    let (_disk_a, a, _disk_b, b, _) = a_and_b().await;
    let digest = b.gossip_locals()[0].1.digest;
    // Node 99 is no member.
    let err = a.pull_records(SEG, 99, 1, 1, 3, 1 << 20).unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::NotMember, "{err}");
    let err = a.peer_digest(SEG, 99, digest).unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::NotMember, "{err}");
    // A member at another membership epoch.
    let err = a.pull_records(SEG, B, 1, 2, 3, 1 << 20).unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleMembership, 1), "{err}");
    let err = a
        .peer_digest(
            SEG,
            B,
            Digest {
                membership_epoch: 2,
                ..digest
            },
        )
        .unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleMembership, 1));
    // Another installed volume epoch: a pull needs the same one (the same
    // truncation), a digest only not an older one.
    let err = a.pull_records(SEG, B, 2, 1, 3, 1 << 20).unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleEpoch, 1), "{err}");
    let newer = Digest {
        installed_epoch: 2,
        ..digest
    };
    assert!(a.peer_digest(SEG, B, newer).is_ok());
    let other = SegmentId { volume: 5, pg: 9 };
    let err = a.pull_records(other, B, 1, 1, 3, 1 << 20).unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::UnknownSegment);
    assert!(a.check_gossip_peer(SEG, B, 1, 1, true).is_ok());
    assert_eq!(
        a.check_gossip_peer(SEG, 99, 1, 1, true).unwrap_err().wire_code().0,
        ErrorCode::NotMember
    );

    // A moves to membership epoch 2 (nodes 2..=7: A itself left): B, still
    // at 1, is refused; and what B pulled at an epoch it no longer holds is
    // refused too.
    a.set_membership(SEG, 1, GEOMETRY, membership(2, 2)).await.unwrap();
    let err = a.pull_records(SEG, B, 1, 1, 3, 1 << 20).unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleMembership, 2));
    let (_, pulled) = a.pull_records(SEG, B, 1, 2, 3, 1 << 20).unwrap();
    let err = b.admit_pulled(SEG, 1, 2, pulled.clone()).await.unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleMembership, 1));
    // A segment sealed by a recovering writer takes nothing pulled.
    b.seal(SEG, 2, GEOMETRY).await.unwrap();
    for installed in [1, 2] {
        let err = b.admit_pulled(SEG, installed, 1, pulled.clone()).await.unwrap_err();
        assert_eq!(err.wire_code(), (ErrorCode::StaleEpoch, 2), "{err}");
    }
    assert_eq!(b.status(SEG, 0).unwrap().scl, 3, "nothing refused is taken");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_pulled_record_in_an_annulled_range_is_refused_and_nothing_is_stored() {
    let (_disk_a, a, disk_b, b, all) = a_and_b().await;
    // A recovery at epoch 2 kept only up to 3 on B (its writer's VDL).
    b.seal(SEG, 2, GEOMETRY).await.unwrap();
    let st = b.truncate(SEG, 2, vec![(4, 100)]).await.unwrap();
    assert_eq!((st.scl, st.highest_lsn), (3, 3));
    // A peer that missed the truncation still holds 4..=12 and serves them.
    let pulled = all[3..].to_vec();
    let err = b.admit_pulled(SEG, 2, 1, pulled.clone()).await.unwrap_err();
    assert!(
        matches!(err, NodeError::PulledAnnulled { lsn: 4, lo: 4, hi: 100 }),
        "{err}"
    );
    assert_eq!(err.wire_code().0, ErrorCode::BadRequest);
    // One annulled record among good ones refuses the whole batch.
    let mut mixed = records(101, 103, 7);
    mixed[0].prev_lsn_pg = 3;
    mixed.insert(0, all[11].clone());
    assert!(matches!(
        b.admit_pulled(SEG, 2, 1, mixed).await,
        Err(NodeError::PulledAnnulled { lsn: 12, .. })
    ));
    let st = b.status(SEG, 0).unwrap();
    assert_eq!((st.scl, st.highest_lsn, st.records), (3, 3, 3));
    b.shutdown().await;
    let b = open(&disk_b).await;
    let st = b.status(SEG, 0).unwrap();
    assert_eq!(
        (st.scl, st.highest_lsn, st.records),
        (3, 3, 3),
        "nothing reached the log"
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn membership_only_moves_forward_and_survives_a_restart() {
    let disk = disk_of(A).await;
    let node = open(&disk).await;
    // Setting a membership creates the segment, installed at the volume epoch.
    let st = node.set_membership(SEG, 3, GEOMETRY, membership(2, 1)).await.unwrap();
    assert_eq!((st.epoch, st.installed_epoch), (3, 3));
    assert_eq!(st.membership, Some(membership(2, 1)));
    // The same again changes nothing.
    node.set_membership(SEG, 3, GEOMETRY, membership(2, 1)).await.unwrap();
    let err = node
        .set_membership(SEG, 3, GEOMETRY, membership(1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleMembership, 2));
    let err = node
        .set_membership(SEG, 3, GEOMETRY, membership(2, 3))
        .await
        .unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::BadRequest, "{err}");
    // An older volume epoch, another geometry, a broken membership.
    let err = node
        .set_membership(SEG, 2, GEOMETRY, membership(3, 1))
        .await
        .unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleEpoch, 3));
    let other = PageGeometry {
        pg_pages: 64,
        ..GEOMETRY
    };
    let err = node.set_membership(SEG, 3, other, membership(3, 1)).await.unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::BadRequest);
    let mut broken = membership(3, 1);
    broken.members[1].id = broken.members[0].id;
    let err = node.set_membership(SEG, 3, GEOMETRY, broken).await.unwrap_err();
    assert!(matches!(err, NodeError::BadMembership(_)), "{err}");
    assert_eq!(node.status(SEG, 0).unwrap().membership, Some(membership(2, 1)));
    node.shutdown().await;

    let node = open(&disk).await;
    let st = node.status(SEG, 0).unwrap();
    assert_eq!(st.membership, Some(membership(2, 1)));
    assert_eq!((st.epoch, st.installed_epoch), (3, 3));
    // A newer one replaces it, durably.
    node.set_membership(SEG, 3, GEOMETRY, membership(3, 2)).await.unwrap();
    node.shutdown().await;
    let node = open(&disk).await;
    assert_eq!(node.status(SEG, 0).unwrap().membership, Some(membership(3, 2)));
    assert_eq!(node.gossip_locals()[0].1.digest.membership_epoch, 3);
    node.shutdown().await;
}

/// A device of the previous format (a page's two slots side by side in
/// its extent) is refused at open, saying which version it found and which
/// one this build reads, rather than its extents being misread.
#[tokio::test(start_paused = true)]
async fn a_device_of_the_previous_format_is_refused_naming_both_versions() {
    let disk = disk_of(A).await;
    for block in crate::log::layout::SUPERBLOCK_BLOCKS {
        disk.write_raw(block_offset(block) + 4, &7u16.to_le_bytes());
    }
    let err = Node::open(disk.clone(), config()).await.err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("unsupported format version 7") && msg.contains("reads version 8"),
        "{msg}"
    );
}

/// A segment SetMembership creates (a replaced disk) takes the writer's
/// truncation ranges as applied, durably: a later recovery that resends
/// them is not refused once the segment has coalesced past them. A segment
/// that exists keeps its own.
#[tokio::test(start_paused = true)]
async fn a_segment_membership_creates_takes_the_writers_ranges_as_applied() {
    let disk = disk_of(A).await;
    let node = open(&disk).await;
    let ranges = vec![(2, 1_000), (5_000, 6_000)];
    node.set_membership_with_ranges(SEG, 3, GEOMETRY, membership(1, 1), ranges.clone())
        .await
        .unwrap();
    let st = node
        .set_membership_with_ranges(SEG, 3, GEOMETRY, membership(2, 1), vec![(7, 9)])
        .await
        .unwrap();
    assert_eq!(st.annulled, ranges, "an existing segment keeps its own");
    node.shutdown().await;
    let node = open(&disk).await;
    let st = node.status(SEG, 0).unwrap();
    assert_eq!((st.installed_epoch, st.annulled.clone()), (3, ranges.clone()));
    // A recovery at epoch 4 resends them with its own range: accepted.
    let mut resent = ranges.clone();
    resent.push((7_000, 8_000));
    let st = node.truncate(SEG, 4, resent.clone()).await.unwrap();
    assert_eq!((st.installed_epoch, st.annulled), (4, resent));
}

/// A node out of a PG never hears of the recoveries meanwhile, and a range
/// one annulled may be dropped without it. Added back, it drops every
/// record it holds above its floor (its page versions are committed
/// changes), durably, and takes the chain again; a member staying in the
/// old set of a change keeps what it holds.
#[tokio::test(start_paused = true)]
async fn a_node_added_back_to_its_pg_drops_the_records_it_held_from_before() {
    let disk = super::tests::formatted(16 << 20, 1 << 20, 7).await;
    let node = open(&disk).await;
    let recs = records(1, 40, 7);
    node.set_membership(SEG, 1, GEOMETRY, membership(1, 1)).await.unwrap();
    super::tests::append_all(&node, &recs).await;
    node.set_pgmrpl(SEG, 1, 20).await.unwrap();
    super::tests::coalesced_through(&node, 20).await;
    // Node 6 is being replaced by node 8: node 1 stays in the old set.
    let st = node
        .set_membership(SEG, 1, GEOMETRY, membership(1, 1).replacing(2, 6, 8))
        .await
        .unwrap();
    assert_eq!((st.scl, st.highest_lsn), (40, 40), "a member staying keeps its records");
    // Node 1 then left (epoch 3: nodes 2..=7, never told to it), and is
    // added back in place of node 7 at epoch 4.
    let back = membership(3, 2).replacing(4, 7, 1);
    let st = node.set_membership(SEG, 1, GEOMETRY, back.clone()).await.unwrap();
    assert_eq!((st.scl, st.records, st.coalesced_lsn), (20, 0, 20));
    assert_eq!(st.membership.as_ref(), Some(&back));
    super::tests::check_pages(&node, &recs, [20].into_iter()).await;
    // The chain above its floor comes again (here from the writer).
    let scl = node
        .append(SEG, 1, GEOMETRY, wire(recs[20..25].to_vec()))
        .await
        .unwrap();
    assert_eq!(scl, 25);
    // Told again: nothing more goes.
    let st = node.set_membership(SEG, 1, GEOMETRY, back.clone()).await.unwrap();
    assert_eq!((st.scl, st.records), (25, 5));
    node.shutdown().await;

    // The log still holds 21..=40 from before: they stay dropped, the
    // records taken after stay.
    let node = open(&disk).await;
    let st = node.status(SEG, 0).unwrap();
    assert_eq!((st.scl, st.highest_lsn, st.records), (25, 25, 5));
    assert_eq!(st.membership, Some(back));
    super::tests::check_pages(&node, &recs[..25], [25].into_iter()).await;
    node.shutdown().await;
}
