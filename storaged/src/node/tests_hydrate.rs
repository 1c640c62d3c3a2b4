//! Hydration in-process on simulated disks: a segment that lacks records
//! its peer already coalesced and released takes the peer's page versions
//! as its base, then the chain above them; across restarts and power loss
//! in the middle of it, no page is ever served wrong.

use std::sync::Arc;
use std::time::Duration;

use super::tests::{
    FIRST_PAGE, GEOMETRY, PAGE, SEG, append_all, check_pages, coalesced_through, config, formatted, mark_round_open,
    model, pull_the_plug, records, wire,
};
use super::*;
use crate::io::sim::{SimDisk, SimFaults};
use crate::proto::WirePageVersion;

const END_PAGE: u64 = FIRST_PAGE + GEOMETRY.pg_pages;
/// Two pages of page bytes a batch: several batches for twelve pages.
const BATCH_BYTES: usize = 2 * PAGE;

async fn open(disk: &Arc<SimDisk>) -> Arc<Node> {
    Node::open(disk.clone(), config()).await.unwrap().0
}

/// Node A: records 1..=200, coalesced through 150 (records up to it
/// released), the rest held.
async fn donor(seed: u64) -> (Arc<Node>, Vec<RedoRecord>) {
    let (a, recs, _) = donor_on_disk(seed).await;
    (a, recs)
}

/// [`donor`], and its disk.
async fn donor_on_disk(seed: u64) -> (Arc<Node>, Vec<RedoRecord>, Arc<SimDisk>) {
    let disk = formatted(16 << 20, 1 << 20, seed).await;
    let a = open(&disk).await;
    let recs = records(1, 200, seed);
    append_all(&a, &recs[..150]).await;
    // Nodes 1..=6, the hydrating node 2 among them.
    a.set_membership(SEG, 1, GEOMETRY, super::tests_gossip::membership(1, 1))
        .await
        .unwrap();
    a.set_pgmrpl(SEG, 1, 150).await.unwrap();
    coalesced_through(&a, 150).await;
    append_all(&a, &recs[150..]).await;
    assert!(matches!(
        a.read_records(SEG, 1, 0, 1 << 20),
        Err(NodeError::ReadPointBelowPgmrpl { .. })
    ));
    (a, recs, disk)
}

/// Every batch of `donor`'s versions into `node`; returns the lowest floor
/// and the number of batches.
async fn hydrate_from(node: &Node, donor: &Node) -> (u64, usize) {
    let (mut next, mut floor, mut batches) = (FIRST_PAGE, u64::MAX, 0);
    while next < END_PAGE {
        let (f, n, versions) = donor.page_versions(SEG, 2, 1, 1, next, BATCH_BYTES).await.unwrap();
        assert!(n > next, "a batch moves on");
        assert!(versions.len() <= BATCH_BYTES / PAGE);
        floor = floor.min(f);
        // As the gossip shell takes a batch: counted in the status too.
        crate::gossip::shell::Store::hydrate_pages(node, SEG, versions, n.min(END_PAGE) - next)
            .await
            .unwrap();
        next = n;
        batches += 1;
    }
    (floor, batches)
}

/// The donor's chain above `after`, appended to `node`; returns its SCL.
async fn pull(node: &Node, donor: &Node, after: u64) -> u64 {
    let (_, chain) = donor.read_records(SEG, 1, after, 1 << 20).unwrap();
    node.append(SEG, 1, GEOMETRY, wire(chain)).await.unwrap()
}

/// B hydrates from A until the power goes, after a few ms drawn from
/// `seed` (the disk's writes crashy from then): whether the hydration was
/// still under way when it went.
async fn cut_power_while_hydrating(a: &Arc<Node>, b: Arc<Node>, disk: &SimDisk, seed: u64) -> bool {
    b.hydrate_begin(SEG).await.unwrap();
    let task = {
        let (a, b) = (a.clone(), b.clone());
        tokio::spawn(async move { hydrate_from(&b, &a).await })
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    tokio::time::sleep(Duration::from_micros(rng.u64(0..3_000))).await;
    let cut_mid_batch = !task.is_finished();
    disk.set_faults(SimFaults::crashy());
    task.abort();
    let _ = task.await;
    pull_the_plug(b);
    disk.crash();
    disk.set_faults(SimFaults::none());
    cut_mid_batch
}

/// Each page at `read_point` is the model's, or refused (a version above
/// the read point): never anything else.
async fn right_or_refused(node: &Node, recs: &[RedoRecord], read_point: u64) -> usize {
    let mut served = 0;
    for page in FIRST_PAGE..FIRST_PAGE + 13 {
        match node.get_page(SEG, 1, page, read_point).await {
            Ok(got) => {
                let want = model(recs, page, read_point);
                assert!(
                    got == want,
                    "page {page} at {read_point}: served as of LSN {}, the model's is as of {}",
                    got.1,
                    want.1
                );
                served += 1;
            }
            Err(
                NodeError::ReadPointBelowPgmrpl { .. }
                | NodeError::VersionAboveReadPoint { .. }
                | NodeError::PageDamaged { .. },
            ) => {}
            Err(e) => panic!("page {page} at {read_point}: {e}"),
        }
    }
    served
}

#[tokio::test(start_paused = true)]
async fn an_empty_segment_hydrates_from_a_peer_then_pulls_the_chain_above() {
    let (a, recs) = donor(11).await;
    let disk = formatted(16 << 20, 1 << 20, 12).await;
    let b = open(&disk).await;
    // The writer's newest records reach the empty segment: held past a gap.
    assert_eq!(b.append(SEG, 1, GEOMETRY, wire(recs[189..].to_vec())).await.unwrap(), 0);

    b.hydrate_begin(SEG).await.unwrap();
    assert!(matches!(b.hydrate_begin(SEG).await, Err(NodeError::Rebuilding)));
    assert!(matches!(
        b.get_page(SEG, 1, FIRST_PAGE, 0).await,
        Err(NodeError::Rebuilding)
    ));
    assert_eq!(NodeError::Rebuilding.wire_code().0, ErrorCode::Rebuilding);
    let (floor, batches) = hydrate_from(&b, &a).await;
    assert_eq!(floor, 150);
    assert!(batches >= 3, "{batches} batches");
    // The status shows how far it went, for an operator's progress bar:
    // every page gone through, every version's bytes written.
    let written: u64 = (FIRST_PAGE..END_PAGE)
        .filter(|&p| recs[..150].iter().any(|r| r.page == p))
        .count() as u64
        * PAGE as u64;
    let under_way = b.status(SEG, 1).unwrap().hydration.unwrap();
    assert!(under_way.under_way);
    assert_eq!((under_way.pages, under_way.bytes), (GEOMETRY.pg_pages, written));
    assert_eq!(b.hydrate_end(SEG, floor).await.unwrap(), 150);
    // A new segment's versions went to slot 0, the other slot left never
    // written. (Pages 32 to 43 all have versions at the floor.)
    for p in FIRST_PAGE..FIRST_PAGE + 12 {
        let lsns = slot_lsns(&b, p).await;
        assert!(lsns[0].is_some() && lsns[1].is_none(), "page {p}: {lsns:?}");
    }
    let status = b.status(SEG, 1).unwrap();
    assert_eq!((status.coalesced_lsn, status.scl), (150, 150));
    assert_eq!(
        status.hydration,
        Some(crate::proto::Hydration {
            under_way: false,
            ..under_way
        })
    );
    // Pages are served again, and read right at the floor.
    check_pages(&b, &recs, [150].into_iter()).await;
    // The chain above the floor from the peer: the SCL goes through the
    // records it held already.
    assert_eq!(pull(&b, &a, floor).await, 200);
    check_pages(&b, &recs, [150, 170, 189, 190, 200].into_iter()).await;
    for page in FIRST_PAGE..END_PAGE {
        assert_eq!(
            b.get_page(SEG, 1, page, 200).await.unwrap(),
            a.get_page(SEG, 1, page, 200).await.unwrap()
        );
    }
    // Restart: the table says where the chain goes on; the log above it is
    // replayed.
    b.shutdown().await;
    let b = open(&disk).await;
    assert_eq!(b.scl(SEG), 200);
    assert_eq!(b.status(SEG, 1).unwrap().coalesced_lsn, 150);
    check_pages(&b, &recs, [150, 190, 200].into_iter()).await;
    // And it coalesces on from there.
    b.set_pgmrpl(SEG, 1, 200).await.unwrap();
    coalesced_through(&b, 200).await;
    check_pages(&b, &recs, [200].into_iter()).await;
    b.shutdown().await;
    a.shutdown().await;
    let report = crate::inspect::inspect(&disk).await.unwrap();
    assert_eq!(report.status, "clean", "{}", report.render());
}

#[tokio::test(start_paused = true)]
async fn versions_above_the_floor_are_never_built_on_again_by_the_records_below_them() {
    let (a, recs) = donor(21).await;
    let disk = formatted(16 << 20, 1 << 20, 22).await;
    let b = open(&disk).await;
    assert_eq!(b.append(SEG, 1, GEOMETRY, wire(recs[189..].to_vec())).await.unwrap(), 0);
    b.hydrate_begin(SEG).await.unwrap();
    // The first batch at floor 150; then the donor coalesces on to 180, so
    // the later batches hold versions above the lowest floor.
    let (floor, next, first) = a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await.unwrap();
    assert_eq!(floor, 150);
    b.hydrate_pages(SEG, first).await.unwrap();
    a.set_pgmrpl(SEG, 1, 180).await.unwrap();
    coalesced_through(&a, 180).await;
    let mut above = 0;
    let mut page = next;
    while page < END_PAGE {
        let (f, n, versions) = a.page_versions(SEG, 2, 1, 1, page, BATCH_BYTES).await.unwrap();
        assert_eq!(f, 180);
        above += versions.iter().filter(|v| v.lsn > 150).count();
        b.hydrate_pages(SEG, versions).await.unwrap();
        page = n;
    }
    assert!(above > 0, "some versions are above the lowest floor");
    assert_eq!(b.hydrate_end(SEG, floor).await.unwrap(), 150);
    // The donor released 151..=180: the writer's records fill the chain
    // (as a pull from another peer would). Those at or below a page's
    // version LSN are held but never applied on top of it.
    let scl = b.append(SEG, 1, GEOMETRY, wire(recs[150..189].to_vec())).await.unwrap();
    assert_eq!(scl, 200);
    for read_point in [150, 160, 175] {
        right_or_refused(&b, &recs, read_point).await;
    }
    check_pages(&b, &recs, [180, 190, 200].into_iter()).await;
    // Each version above the floor is in both of its slots: no older one
    // beside it that lacks changes the segment no longer holds.
    for p in FIRST_PAGE..END_PAGE {
        let slots = slot_lsns(&b, p).await;
        if let Some(top) = slots.iter().flatten().max().filter(|&&l| l > 150) {
            assert_eq!(slots, [Some(*top); 2], "page {p}");
        }
    }
    // Across a restart, and after coalescing on.
    b.shutdown().await;
    let b = open(&disk).await;
    assert_eq!(b.scl(SEG), 200);
    right_or_refused(&b, &recs, 160).await;
    check_pages(&b, &recs, [180, 200].into_iter()).await;
    b.set_pgmrpl(SEG, 1, 200).await.unwrap();
    coalesced_through(&b, 200).await;
    check_pages(&b, &recs, [200].into_iter()).await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn bad_versions_are_refused_whole_and_write_nothing() {
    let disk = formatted(16 << 20, 1 << 20, 31).await;
    let b = open(&disk).await;
    let recs = records(1, 20, 31);
    append_all(&b, &recs).await;
    let good = WirePageVersion {
        page: FIRST_PAGE,
        lsn: 500,
        bytes: vec![9; PAGE],
    };
    // Not begun: refused.
    assert!(matches!(
        b.hydrate_pages(SEG, vec![good.clone()]).await,
        Err(NodeError::BadPageVersion(_))
    ));
    b.hydrate_begin(SEG).await.unwrap();
    for bad in [
        WirePageVersion {
            bytes: vec![9; PAGE - 1],
            ..good.clone()
        },
        WirePageVersion {
            page: END_PAGE,
            ..good.clone()
        },
        WirePageVersion { lsn: 0, ..good.clone() },
    ] {
        let e = b.hydrate_pages(SEG, vec![good.clone(), bad]).await.unwrap_err();
        assert!(
            matches!(e, NodeError::BadPageVersion(_) | NodeError::PageOutOfRange { .. }),
            "{e}"
        );
    }
    // Nothing written: after an abort the page reads as before.
    b.hydrate_abort(SEG);
    check_pages(&b, &recs, [20].into_iter()).await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn power_loss_in_the_middle_of_hydration_serves_no_wrong_page_and_a_second_one_completes() {
    let mut cut_mid_batch = 0;
    for seed in 0..12u64 {
        let (a, recs) = donor(40 + seed).await;
        let disk = formatted(16 << 20, 1 << 20, 60 + seed).await;
        let b = open(&disk).await;
        // B was down from 120 on: it coalesced to 100, holds up to 120, and
        // the writer's newest records.
        append_all(&b, &recs[..120]).await;
        b.set_pgmrpl(SEG, 1, 100).await.unwrap();
        coalesced_through(&b, 100).await;
        assert_eq!(
            b.append(SEG, 1, GEOMETRY, wire(recs[189..].to_vec())).await.unwrap(),
            120
        );
        cut_mid_batch += usize::from(cut_power_while_hydrating(&a, b, &disk, seed).await);

        let b = open(&disk).await;
        let status = b.status(SEG, 1).unwrap();
        assert_eq!((status.scl, status.coalesced_lsn), (120, 100), "seed {seed}");
        for read_point in [100, 110, 120] {
            right_or_refused(&b, &recs, read_point).await;
        }
        // Coalescing keeps off while the rebuild is unfinished.
        b.set_pgmrpl(SEG, 1, 120).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(b.status(SEG, 1).unwrap().coalesced_lsn, 100);

        b.hydrate_begin(SEG).await.unwrap();
        let (floor, _) = hydrate_from(&b, &a).await;
        assert_eq!(b.hydrate_end(SEG, floor).await.unwrap(), 150);
        assert_eq!(pull(&b, &a, floor).await, 200);
        check_pages(&b, &recs, [150, 190, 200].into_iter()).await;
        b.shutdown().await;
        let b = open(&disk).await;
        assert_eq!(b.scl(SEG), 200);
        check_pages(&b, &recs, [150, 200].into_iter()).await;
        b.shutdown().await;
        a.shutdown().await;
    }
    assert!(cut_mid_batch > 0, "no seed cut the power in the middle of hydration");
}

/// The same power cut on a new segment (a replaced disk's, a new member's),
/// whose runs are written without being read, two neighbouring pages a
/// write: after it no page is served at all (the segment holds no chain
/// yet; a version a write left is refused as above the read point), and a
/// second hydration completes with every page right, with nothing a torn
/// write left beside a version (read again after a restart).
#[tokio::test(start_paused = true)]
async fn power_loss_in_the_middle_of_a_new_segments_hydration_serves_no_page_and_a_second_one_completes() {
    let mut cut_mid_batch = 0;
    // Seed 13 cuts a paired write of two pages (slot 1 of one, slot 0 of
    // the next) half way.
    for seed in 0..200u64 {
        let (a, recs) = donor(80 + seed).await;
        let disk = formatted(16 << 20, 1 << 20, 100 + seed).await;
        let b = open(&disk).await;
        // The writer's newest records reach the new segment: held past a gap.
        assert_eq!(b.append(SEG, 1, GEOMETRY, wire(recs[189..].to_vec())).await.unwrap(), 0);
        cut_mid_batch += usize::from(cut_power_while_hydrating(&a, b, &disk, seed).await);

        let b = open(&disk).await;
        assert_eq!(b.scl(SEG), 0, "seed {seed}");
        for page in FIRST_PAGE..END_PAGE {
            for read_point in [0, 150, 200] {
                match b.get_page(SEG, 1, page, read_point).await {
                    Err(
                        NodeError::ReadPointAboveScl { .. }
                        | NodeError::PageDamaged { .. }
                        | NodeError::VersionAboveReadPoint { .. },
                    ) => {}
                    Ok(got) if read_point == 0 && got.1 == 0 => {}
                    other => panic!("seed {seed}: page {page} at {read_point}: {other:?}"),
                }
            }
        }

        b.hydrate_begin(SEG).await.unwrap();
        let (floor, _) = hydrate_from(&b, &a).await;
        assert_eq!(b.hydrate_end(SEG, floor).await.unwrap(), 150, "seed {seed}");
        assert_eq!(pull(&b, &a, floor).await, 200);
        check_pages(&b, &recs, [150, 190, 200].into_iter()).await;
        b.shutdown().await;
        let b = open(&disk).await;
        assert_eq!(b.scl(SEG), 200);
        check_pages(&b, &recs, [150, 200].into_iter()).await;
        b.shutdown().await;
        a.shutdown().await;
    }
    assert!(cut_mid_batch > 0, "no seed cut the power in the middle of hydration");
}

/// The LSN of the version each slot of `page` holds (None: none valid).
async fn slot_lsns(node: &Node, page: u64) -> [Option<u64>; 2] {
    let extent = node.state().seg(SEG).unwrap().extent.unwrap();
    let local = extent.local(SEG.pg, page).unwrap();
    let slots = node.read_page_slots(SEG, &extent, page, local).await.unwrap();
    slots.map(|slot| match slot {
        pagestore::Slot::Version(v) => Some(v.lsn),
        _ => None,
    })
}

/// A segment that had coalesced to 100 takes versions above the floor
/// (150) beside its own older ones. Later the version above the floor
/// rots, and a crash leaves a round open: start-up's torn-write rule takes
/// a damaged slot above the coalesced LSN beside a version at or below it
/// for a torn write, and would serve the older version, which lacks
/// changes between it and the floor that the segment no longer holds. The
/// version is in both slots, so the page is refused instead.
#[tokio::test(start_paused = true)]
async fn a_rotted_version_above_the_floor_is_refused_not_served_from_an_older_one() {
    let (a, recs) = donor(71).await;
    let disk = formatted(16 << 20, 1 << 20, 72).await;
    let b = open(&disk).await;
    append_all(&b, &recs[..120]).await;
    b.set_pgmrpl(SEG, 1, 100).await.unwrap();
    coalesced_through(&b, 100).await;
    b.hydrate_begin(SEG).await.unwrap();
    let (floor, next, first) = a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, PAGE).await.unwrap();
    b.hydrate_pages(SEG, first).await.unwrap();
    a.set_pgmrpl(SEG, 1, 180).await.unwrap();
    coalesced_through(&a, 180).await;
    let mut page = next;
    while page < END_PAGE {
        let (_, n, versions) = a.page_versions(SEG, 2, 1, 1, page, BATCH_BYTES).await.unwrap();
        b.hydrate_pages(SEG, versions).await.unwrap();
        page = n;
    }
    assert_eq!(b.hydrate_end(SEG, floor).await.unwrap(), 150);
    let scl = b.append(SEG, 1, GEOMETRY, wire(recs[150..].to_vec())).await.unwrap();
    assert_eq!(scl, 200);
    check_pages(&b, &recs, [180, 200].into_iter()).await;
    // Rot one slot holding each version above the floor.
    let extent = b.state().seg(SEG).unwrap().extent.unwrap();
    let mut rotted = 0;
    for p in FIRST_PAGE..END_PAGE {
        let lsns = slot_lsns(&b, p).await;
        if let Some(slot) = (0..2).find(|&s| lsns[s].is_some_and(|l| l > 150)) {
            let local = extent.local(SEG.pg, p).unwrap();
            disk.flip_bit(block_offset(extent.slot_block(local, slot)) + 300, 1);
            rotted += 1;
        }
    }
    assert!(rotted > 0);
    b.shutdown().await;
    mark_round_open(&disk, 200).await;
    let b = open(&disk).await;
    assert!(b.state().seg(SEG).unwrap().torn_after.is_some());
    for read_point in [180, 200] {
        right_or_refused(&b, &recs, read_point).await;
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// A page whose version here rotted is refused; a hydration brings the
/// peer's version of it, and the page is served right again.
#[tokio::test(start_paused = true)]
async fn hydration_replaces_a_rotted_version() {
    let (a, recs) = donor(81).await;
    let disk = formatted(16 << 20, 1 << 20, 82).await;
    let b = open(&disk).await;
    append_all(&b, &recs[..120]).await;
    b.set_pgmrpl(SEG, 1, 100).await.unwrap();
    coalesced_through(&b, 100).await;
    // A page changed below 100 and between 100 and 150: the peer's version
    // of it is above what this segment coalesced.
    let p = recs[140].page;
    assert!(recs[..100].iter().any(|r| r.page == p));
    let extent = b.state().seg(SEG).unwrap().extent.unwrap();
    let local = extent.local(SEG.pg, p).unwrap();
    let lsns = slot_lsns(&b, p).await;
    let current = if lsns[1] > lsns[0] { 1 } else { 0 };
    disk.flip_bit(block_offset(extent.slot_block(local, current)) + 300, 1);
    b.shutdown().await;
    let b = open(&disk).await;
    assert!(matches!(
        b.get_page(SEG, 1, p, 120).await,
        Err(NodeError::PageDamaged { .. })
    ));
    assert_eq!(b.status(SEG, 1).unwrap().damage.pages_total, 1);

    b.hydrate_begin(SEG).await.unwrap();
    let (floor, _) = hydrate_from(&b, &a).await;
    assert_eq!(b.hydrate_end(SEG, floor).await.unwrap(), 150);
    assert_eq!(pull(&b, &a, floor).await, 200);
    check_pages(&b, &recs, [150, 200].into_iter()).await;
    assert_eq!(b.status(SEG, 1).unwrap().damage.pages_total, 0);
    b.shutdown().await;
    let b = open(&disk).await;
    check_pages(&b, &recs, [150, 200].into_iter()).await;
    b.shutdown().await;
    a.shutdown().await;
}

/// What a donor refuses, and where its batches end.
#[tokio::test(start_paused = true)]
async fn page_versions_are_served_at_the_same_installed_epoch_from_a_segment_not_being_rebuilt() {
    let (a, _) = donor(91).await;
    assert!(matches!(
        a.page_versions(SEG, 2, 2, 1, FIRST_PAGE, BATCH_BYTES).await,
        Err(NodeError::Segment(SegmentError::StaleEpoch { current: 1, .. }))
    ));
    assert!(matches!(
        a.page_versions(SEG, 2, 1, 1, END_PAGE + 1, BATCH_BYTES).await,
        Err(NodeError::PageOutOfRange { .. })
    ));
    assert_eq!(
        a.page_versions(SEG, 2, 1, 1, END_PAGE, BATCH_BYTES).await.unwrap(),
        (150, END_PAGE, Vec::new())
    );
    // A max_bytes below a page still brings one version.
    let (_, next, versions) = a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, 1).await.unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(next, versions[0].page + 1);
    a.hydrate_begin(SEG).await.unwrap();
    assert!(matches!(
        a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await,
        Err(NodeError::Rebuilding)
    ));
    a.hydrate_abort(SEG);
    assert!(a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await.is_ok());
    a.shutdown().await;
}

/// A segment that holds every change up to an LSN is sent only the pages
/// whose version is above it.
#[tokio::test(start_paused = true)]
async fn only_versions_above_what_the_asker_holds_are_sent() {
    let (a, _) = donor(93).await;
    let (_, _, all) = a
        .page_versions_changed_after(SEG, 2, 1, 1, FIRST_PAGE, 1 << 20, 0)
        .await
        .unwrap();
    assert!(!all.is_empty());
    let cut = all.iter().map(|v| v.lsn).min().unwrap();
    let (_, next, above) = a
        .page_versions_changed_after(SEG, 2, 1, 1, FIRST_PAGE, 1 << 20, cut)
        .await
        .unwrap();
    assert_eq!(next, END_PAGE);
    let want: Vec<u64> = all.iter().filter(|v| v.lsn > cut).map(|v| v.page).collect();
    assert_eq!(above.iter().map(|v| v.page).collect::<Vec<_>>(), want);
    assert!(above.len() < all.len());
}

/// While a peer hydrates from a segment (asks it for versions, then pulls
/// the chain above them), the segment does not coalesce past the floor it
/// served: the chain above it is still there to pull. Once the peer stops
/// asking, coalescing goes on.
#[tokio::test(start_paused = true)]
async fn a_donor_keeps_its_floor_while_a_peer_hydrates_from_it() {
    let (a, _) = donor(95).await;
    let (floor, _, _) = a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await.unwrap();
    assert_eq!(floor, 150);
    // The writer lets coalescing go on past the floor.
    a.set_pgmrpl(SEG, 1, 200).await.unwrap();
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The peer goes on fetching versions.
        a.page_versions(SEG, 2, 1, 1, FIRST_PAGE + 4, BATCH_BYTES)
            .await
            .unwrap();
        assert_eq!(a.status(SEG, 0).unwrap().coalesced_lsn, 150);
    }
    // The chain above the floor is still there to pull.
    let (_, chain) = a.pull_records(SEG, 2, 1, 1, 150, 1 << 20).unwrap();
    assert_eq!(chain.first().map(|r| r.lsn), Some(151));
    // The peer has it all and stops asking: coalescing goes on.
    coalesced_through(&a, 200).await;
    a.shutdown().await;
}

/// The foreground comes first: once the donor's log fills past the point
/// where a hold lets go (the chain above the floor it keeps for the peer
/// cannot be released), the next ask of the peer ends the hold, and
/// coalescing goes on past the floor, which frees the log.
#[tokio::test(start_paused = true)]
async fn a_donor_lets_go_of_its_floor_under_log_pressure() {
    let (a, _) = donor(97).await;
    let (floor, _, _) = a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await.unwrap();
    assert_eq!(floor, 150);
    a.set_pgmrpl(SEG, 1, 200).await.unwrap();
    let target = |a: &Node| a.state().seg(SEG).unwrap().coalesce_target();
    assert_eq!(target(&a), 150, "held for the peer");
    // The foreground goes on appending; the hold keeps the log from being
    // freed past the floor, until it is under pressure: not at half full
    // (a backlog an outage's load may leave), only nearer to appends
    // having to wait.
    let mut next = 201;
    let mut held_over_half = false;
    while !a.hold_pressure() {
        assert!(next < 20_000, "the log never came under pressure");
        let recs = records(next, next + 8, 97);
        append_all(&a, &recs).await;
        next += 9;
        // The peer still asks: below the pressure, the hold stays.
        if !a.hold_pressure() {
            a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await.unwrap();
            assert_eq!(target(&a), 150);
            let log = a.log.stats();
            held_over_half |= log.free_blocks < log.log_blocks / 2;
        }
    }
    assert!(held_over_half, "the hold gave way at half full");
    a.set_pgmrpl(SEG, 1, next - 1).await.unwrap();
    // The peer's next ask finds the donor under pressure: the hold ends.
    a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await.unwrap();
    assert_eq!(target(&a), next - 1, "no hold left");
    coalesced_through(&a, next - 1).await;
    // The log is freed again.
    for _ in 0..1000 {
        if !a.hold_pressure() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!a.hold_pressure(), "the log stayed full");
    a.shutdown().await;
}

/// The same for the memory records above the coalesced LSN take (a node
/// with a small bound on it): past the point where a hold lets go, a pull
/// of the peer ends it too.
#[tokio::test(start_paused = true)]
async fn a_donor_lets_go_of_its_floor_under_memory_pressure() {
    let disk = formatted(16 << 20, 8 << 20, 99).await;
    let a = Node::open(
        disk.clone(),
        NodeConfig {
            hot_bytes_max: 256 << 10,
            ..config()
        },
    )
    .await
    .unwrap()
    .0;
    let recs = records(1, 150, 99);
    append_all(&a, &recs).await;
    a.set_membership(SEG, 1, GEOMETRY, super::tests_gossip::membership(1, 1))
        .await
        .unwrap();
    a.set_pgmrpl(SEG, 1, 150).await.unwrap();
    coalesced_through(&a, 150).await;
    let (floor, _, _) = a.page_versions(SEG, 2, 1, 1, FIRST_PAGE, BATCH_BYTES).await.unwrap();
    assert_eq!(floor, 150);
    let target = |a: &Node| a.state().seg(SEG).unwrap().coalesce_target();
    let hot_pressure = |a: &Node| {
        let hot = a.state().hot_bytes;
        a.hold_hot_pressure(hot)
    };
    let mut next = 151;
    let mut held_over_half = false;
    while !hot_pressure(&a) {
        assert!(next < 20_000, "memory never came under pressure");
        append_all(&a, &records(next, next + 8, 99)).await;
        next += 9;
        a.set_pgmrpl(SEG, 1, next - 1).await.unwrap();
        if !hot_pressure(&a) {
            a.pull_records(SEG, 2, 1, 1, 150, 4096).unwrap();
            assert_eq!(target(&a), 150, "held for the peer");
            held_over_half |= a.state().hot_bytes > a.config.hot_bytes_max / 2;
        }
    }
    assert!(held_over_half, "the hold gave way at half the bound");
    assert!(!a.hold_pressure(), "the log is not what is under pressure here");
    a.pull_records(SEG, 2, 1, 1, 150, 4096).unwrap();
    assert_eq!(target(&a), next - 1, "no hold left");
    coalesced_through(&a, next - 1).await;
    a.shutdown().await;
}

/// A donor whose pages it knows (read or written since it started) does
/// not read from its device the pages the page-version index says did
/// not change after what the asker holds: a peer that hydrates again, or
/// was only briefly behind, costs it only the pages that changed.
#[tokio::test(start_paused = true)]
async fn a_donor_reads_only_the_pages_the_index_says_changed() {
    let (a, _, disk) = donor_on_disk(101).await;
    // The first look reads the pages it does not know yet.
    let (_, _, all) = a
        .page_versions_changed_after(SEG, 2, 1, 1, FIRST_PAGE, 1 << 20, 0)
        .await
        .unwrap();
    let newest = all.iter().map(|v| v.lsn).max().unwrap();
    let reads = disk.stats().reads;
    let (_, next, none) = a
        .page_versions_changed_after(SEG, 2, 1, 1, FIRST_PAGE, 1 << 20, newest)
        .await
        .unwrap();
    assert_eq!((next, none.len()), (END_PAGE, 0));
    assert_eq!(disk.stats().reads, reads, "pages that did not change were read");
    // One page changed after: only it is sent.
    let second = all.iter().map(|v| v.lsn).filter(|&l| l < newest).max().unwrap();
    let (_, _, changed) = a
        .page_versions_changed_after(SEG, 2, 1, 1, FIRST_PAGE, 1 << 20, second)
        .await
        .unwrap();
    assert_eq!(changed.iter().map(|v| v.lsn).collect::<Vec<_>>(), vec![newest]);
    a.shutdown().await;
}
