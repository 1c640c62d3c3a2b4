//! The node in-process on a simulated disk: coalescing into page versions,
//! reads that combine versions and hot records, restart from the segment
//! table's checkpoint, freeing the log, and power loss in the middle of
//! coalescing. Paused tokio time: deterministic, and no wall-clock waits.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::hot::apply;
use crate::io::sim::{SimDisk, SimFaults};
use crate::log::mkfs::{FormatOptions, format};
use crate::record::RecordBody;

/// The records as `Node::append` takes them, each with its encoding.
pub(super) fn wire(records: Vec<RedoRecord>) -> Vec<WireRecord> {
    records.into_iter().map(WireRecord::new).collect()
}

pub(super) const SEG: SegmentId = SegmentId { volume: 5, pg: 1 };
pub(super) const GEOMETRY: PageGeometry = PageGeometry {
    page_bytes: 4096,
    pg_pages: 32,
};
pub(super) const FIRST_PAGE: u64 = 32;
pub(super) const PAGE: usize = 4096;

pub(super) async fn formatted(disk_bytes: u64, log_bytes: u64, seed: u64) -> Arc<SimDisk> {
    let disk = Arc::new(SimDisk::new(disk_bytes, seed, SimFaults::none()));
    format(
        disk.as_ref(),
        FormatOptions {
            node_id: 1,
            log_bytes: Some(log_bytes),
            force: false,
        },
    )
    .await
    .unwrap();
    disk
}

pub(super) fn config() -> NodeConfig {
    NodeConfig {
        coalesce_round_pages_max: 7,
        ..NodeConfig::default()
    }
}

/// Records 1..=n, chained, over 12 pages: whole images now and then, deltas
/// otherwise, from `seed`.
pub(super) fn records(from: u64, to: u64, seed: u64) -> Vec<RedoRecord> {
    let mut rng = fastrand::Rng::with_seed(seed ^ from);
    (from..=to)
        .map(|lsn| {
            let page = FIRST_PAGE + rng.u64(0..12);
            let body = if rng.u8(0..10) == 0 {
                RecordBody::PageImage(vec![lsn as u8; PAGE])
            } else {
                let len = rng.usize(1..300);
                RecordBody::PageDelta {
                    offset: rng.u32(0..(PAGE - len) as u32),
                    bytes: vec![(lsn * 7) as u8; len],
                }
            };
            RedoRecord {
                segment: SEG,
                lsn,
                prev_lsn_pg: lsn - 1,
                prev_lsn_page: 0,
                page,
                cpl: true,
                body,
            }
        })
        .collect()
}

pub(super) fn model(records: &[RedoRecord], page: u64, read_point: u64) -> (Vec<u8>, u64) {
    let mut bytes = vec![0u8; PAGE];
    let mut at = 0;
    for r in records.iter().filter(|r| r.page == page && r.lsn <= read_point) {
        apply(&mut bytes, &r.body).unwrap();
        at = r.lsn;
    }
    (bytes, at)
}

pub(super) async fn append_all(node: &Node, records: &[RedoRecord]) {
    for chunk in records.chunks(9) {
        let scl = node.append(SEG, 1, GEOMETRY, wire(chunk.to_vec())).await.unwrap();
        assert_eq!(scl, chunk.last().unwrap().lsn);
    }
}

pub(super) async fn check_pages(node: &Node, records: &[RedoRecord], read_points: impl Iterator<Item = u64>) {
    for read_point in read_points {
        for page in FIRST_PAGE..FIRST_PAGE + 13 {
            let got = node.get_page(SEG, 1, page, read_point).await.unwrap();
            let want = model(records, page, read_point);
            if got != want {
                let diff: Vec<usize> = (0..PAGE).filter(|&i| got.0[i] != want.0[i]).collect();
                let recs: Vec<(u64, String)> = records
                    .iter()
                    .filter(|r| r.page == page && r.lsn + 30 > read_point && r.lsn <= read_point)
                    .map(|r| {
                        (
                            r.lsn,
                            match &r.body {
                                RecordBody::PageImage(_) => "image".to_string(),
                                RecordBody::PageDelta { offset, bytes } => format!("{offset}+{}", bytes.len()),
                            },
                        )
                    })
                    .collect();
                let st = node.status(SEG, 1).unwrap();
                panic!(
                    "page {page} at {read_point}: lsn {} want {}; diff {}..{} ({}), got byte {} want {}; recs {recs:?}; {st:?}",
                    got.1,
                    want.1,
                    diff[0],
                    diff[diff.len() - 1],
                    diff.len(),
                    got.0[diff[0]],
                    want.0[diff[0]]
                );
            }
        }
    }
}

/// Wait (in paused time) until the segment is coalesced through `lsn`.
pub(super) async fn coalesced_through(node: &Node, lsn: u64) {
    // Epoch 0 is an operator's read: it is never fenced, whatever the
    // segment's epoch.
    for _ in 0..10_000 {
        if node.status(SEG, 0).unwrap().coalesced_lsn >= lsn {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not coalesced through {lsn}: {:?}", node.status(SEG, 0).unwrap());
}

/// Make the device's segment table say a coalescing round to `round_lsn`
/// was open, as a crash in it would leave the table.
pub(super) async fn mark_round_open(disk: &SimDisk, round_lsn: u64) {
    let sb = read_superblock(disk).await.unwrap().superblock;
    let mut table = segtable::read(disk, &sb.device_id).await.unwrap().table;
    let mut e = table.get(SEG).unwrap().clone();
    e.round_lsn = round_lsn;
    table.upsert(e);
    segtable::write(disk, sb.device_id, &mut table).await.unwrap();
}

/// Stop a node as power loss would: its tasks end where they are.
pub(super) fn pull_the_plug(node: Arc<Node>) {
    if let Some(t) = node.coalescer.lock().unwrap().take() {
        t.abort();
    }
    if let Some(t) = node.driver.lock().unwrap().take() {
        t.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn coalescing_follows_pgmrpl_and_reads_combine_versions_with_hot_records() {
    let disk = formatted(16 << 20, 1 << 20, 1).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 300, 1);
    append_all(&node, &recs).await;
    // Nothing is coalesced while no reader has let go of anything.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(node.status(SEG, 1).unwrap().coalesced_lsn, 0);
    assert_eq!(node.set_pgmrpl(SEG, 1, 150).await.unwrap(), 150);
    coalesced_through(&node, 150).await;
    let status = node.status(SEG, 1).unwrap();
    assert_eq!(status.coalesced_lsn, 150, "never past PGMRPL");
    assert_eq!(status.lowest_lsn, 151, "coalesced records are no longer held");
    assert!(status.page_store_bytes > 0);
    check_pages(&node, &recs, [150, 151, 200, 299, 300].into_iter()).await;
    assert!(matches!(
        node.get_page(SEG, 1, FIRST_PAGE, 149).await,
        Err(NodeError::ReadPointBelowPgmrpl { .. })
    ));
    assert!(matches!(
        node.get_page(SEG, 1, FIRST_PAGE + 40, 200).await,
        Err(NodeError::PageOutOfRange { .. })
    ));
    // A re-send of a coalesced record is recognised, not stored again.
    assert_eq!(
        node.append(SEG, 1, GEOMETRY, wire(recs[10..12].to_vec()))
            .await
            .unwrap(),
        300
    );

    // Restart: the table says where each chain continues; the log after it
    // is replayed, and pages read the same.
    node.shutdown().await;
    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(recovered.segments, 1);
    assert!(recovered.records >= 150, "{recovered:?}");
    assert_eq!(node.scl(SEG), 300);
    check_pages(&node, &recs, [150, 222, 300].into_iter()).await;
    // Coalescing resumes from the checkpoint.
    node.set_pgmrpl(SEG, 1, 300).await.unwrap();
    coalesced_through(&node, 300).await;
    assert_eq!(node.status(SEG, 1).unwrap().records, 0);
    check_pages(&node, &recs, [300].into_iter()).await;
    // The segment goes on after its coalesced chain, and after a restart.
    let more = records(301, 340, 2);
    append_all(&node, &more).await;
    node.shutdown().await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(node.scl(SEG), 340);
    let all: Vec<RedoRecord> = recs.iter().chain(&more).cloned().collect();
    check_pages(&node, &all, [300, 320, 340].into_iter()).await;
    node.shutdown().await;
    // Offline, inspect checks every version slot and counts the pages.
    let report = crate::inspect::inspect(&disk).await.unwrap();
    assert_eq!(report.status, "clean", "{}", report.render());
    assert_eq!(report.pages.page_count, 12);
    assert_eq!(report.segments[0].coalesced_lsn, 300);
}

#[tokio::test(start_paused = true)]
async fn coalescing_frees_the_log_so_appends_never_run_out_of_it() {
    // A 256 KiB log: 64 blocks. 2000 records of ~300 bytes are many times that.
    let disk = formatted(16 << 20, 256 << 10, 3).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 2000, 3);
    let mut refusals = 0;
    for chunk in recs.chunks(4) {
        let last = chunk.last().unwrap().lsn;
        loop {
            match node.append(SEG, 1, GEOMETRY, wire(chunk.to_vec())).await {
                Ok(scl) => {
                    assert_eq!(scl, last);
                    break;
                }
                // Backpressure while coalescing catches up, never a hang.
                Err(NodeError::LogFull { .. } | NodeError::Overloaded { .. }) => {
                    refusals += 1;
                    assert!(refusals < 100_000, "the log never freed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        // A reader that keeps up: PGMRPL trails the writes.
        node.set_pgmrpl(SEG, 1, last.saturating_sub(20)).await.unwrap();
    }
    let stats = node.log.stats();
    assert!(
        stats.next_seq > 3 * stats.log_blocks,
        "the log wrapped around several times: {stats:?}"
    );
    check_pages(&node, &recs, [1980, 2000].into_iter()).await;
    node.shutdown().await;
    let (node, _) = Node::open(disk, config()).await.unwrap();
    check_pages(&node, &recs, [1990, 2000].into_iter()).await;
    node.shutdown().await;
}

/// Appends that arrive together with more records than the log has room
/// for never leave it full for good: those that would not fit are refused
/// (`LogFull`) and sent again once coalescing has freed the log, and every
/// record lands. (Each checked against the log as written, all of them
/// passed; the ones queued last then waited for a release that their own
/// place in the queue held back. And with records past the gaps the
/// refusals leave taking all the room, what fills a gap would never fit.)
#[tokio::test(start_paused = true)]
async fn appends_arriving_together_beyond_the_logs_room_are_refused_not_left_waiting() {
    // A 256 KiB log: 64 blocks; 600 records (a tenth of them whole pages)
    // take more than that.
    let disk = formatted(16 << 20, 256 << 10, 9).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 600, 9);
    append_all(&node, &recs[..1]).await;
    // Coalescing may take every record as soon as it is durable.
    node.set_pgmrpl(SEG, 1, 600).await.unwrap();
    let refusals = std::cell::Cell::new(0);
    let all = futures_util::future::join_all(recs[1..].chunks(6).map(|chunk| {
        let (node, refusals) = (&node, &refusals);
        async move {
            loop {
                match node.append(SEG, 1, GEOMETRY, wire(chunk.to_vec())).await {
                    Ok(_) => return,
                    Err(NodeError::LogFull { .. } | NodeError::Overloaded { .. }) => {
                        refusals.set(refusals.get() + 1);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }));
    let landed = tokio::time::timeout(Duration::from_secs(60), all).await;
    assert!(
        landed.is_ok(),
        "appends still waiting after 60 s: {:?}, {:?}",
        node.log.stats(),
        node.status(SEG, 0)
    );
    assert!(refusals.get() > 0, "the appends fitted in the log: nothing tested");
    assert_eq!(node.scl(SEG), 600);
    check_pages(&node, &recs, [600].into_iter()).await;
    node.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn power_loss_in_the_middle_of_coalescing_loses_nothing() {
    let mut cut_mid_round = 0;
    for seed in 0..24u64 {
        let disk = formatted(16 << 20, 1 << 20, seed).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let recs = records(1, 400, seed);
        append_all(&node, &recs).await;
        node.set_pgmrpl(SEG, 1, 390).await.unwrap();
        // Let coalescing run for a while, then cut the power: pending
        // writes land, tear or vanish as the seed says.
        let mut rng = fastrand::Rng::with_seed(seed);
        tokio::time::sleep(Duration::from_micros(rng.u64(0..40_000))).await;
        disk.set_faults(SimFaults::crashy());
        pull_the_plug(node);
        disk.crash();
        disk.set_faults(SimFaults::none());
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        cut_mid_round += usize::from(node.state().seg(SEG).unwrap().torn_after.is_some());
        assert_eq!(node.scl(SEG), 400, "seed {seed}: every acknowledged record is there");
        check_pages(&node, &recs, [390, 395, 400].into_iter()).await;
        // And coalescing finishes the interrupted round.
        coalesced_through(&node, 390).await;
        check_pages(&node, &recs, [390, 400].into_iter()).await;
        node.shutdown().await;
    }
    assert!(cut_mid_round > 0, "no seed cut the power in the middle of a round");
}

#[tokio::test(start_paused = true)]
async fn a_damaged_version_is_reported_not_served() {
    let disk = formatted(16 << 20, 1 << 20, 4).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 100, 4);
    append_all(&node, &recs).await;
    node.set_pgmrpl(SEG, 1, 100).await.unwrap();
    coalesced_through(&node, 100).await;
    let page = recs.last().unwrap().page;
    check_pages(&node, &recs, [100].into_iter()).await;
    // Rot in both slots' first blocks of that page.
    let extent = node.state().seg(SEG).unwrap().extent.unwrap();
    let local = extent.local(SEG.pg, page).unwrap();
    for slot in 0..2 {
        disk.flip_bit(block_offset(extent.slot_block(local, slot)) + 300, 1);
    }
    assert!(matches!(
        node.get_page(SEG, 1, page, 100).await,
        Err(NodeError::PageDamaged { .. })
    ));
    // Other pages are still served.
    let other = (FIRST_PAGE..FIRST_PAGE + 12).find(|&p| p != page).unwrap();
    assert_eq!(
        node.get_page(SEG, 1, other, 100).await.unwrap(),
        model(&recs, other, 100)
    );
    node.shutdown().await;
    let report = crate::inspect::inspect(&disk).await.unwrap();
    assert_eq!(report.status, "corrupt", "{}", report.render());
    assert!(
        report
            .check
            .problems
            .iter()
            .any(|p| p.what.contains(&format!("page {page} ")))
    );
}

#[tokio::test(start_paused = true)]
async fn geometry_is_checked_and_the_page_store_has_limits() {
    let disk = formatted(8 << 20, 1 << 20, 5).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 3, 5);
    let other = PageGeometry {
        page_bytes: 8192,
        ..GEOMETRY
    };
    node.append(SEG, 1, GEOMETRY, wire(recs[..1].to_vec())).await.unwrap();
    assert!(matches!(
        node.append(SEG, 1, other, wire(recs[1..2].to_vec())).await,
        Err(NodeError::BadGeometry(_))
    ));
    let odd = PageGeometry {
        page_bytes: 3000,
        ..GEOMETRY
    };
    assert!(matches!(
        node.append(SegmentId { volume: 5, pg: 2 }, 1, odd, wire(recs[..1].to_vec()))
            .await,
        Err(NodeError::BadGeometry(_))
    ));
    // A PG far larger than the device: refused, and no segment is left behind.
    let huge = PageGeometry {
        pg_pages: 1 << 20,
        ..GEOMETRY
    };
    let seg = SegmentId { volume: 6, pg: 0 };
    let mut r = recs[0].clone();
    r.segment = seg;
    r.page = 0;
    assert!(matches!(
        node.append(seg, 1, huge, wire(vec![r])).await,
        Err(NodeError::PageStoreFull { .. })
    ));
    assert!(matches!(node.status(seg, 0), Err(NodeError::UnknownSegment(..))));
    node.shutdown().await;
}

/// A batch out of LSN order, with a record twice, or with another
/// segment's record is refused whole, by an in-process caller as by the
/// wire decoder: nothing of it is admitted or written.
#[tokio::test]
async fn a_batch_out_of_order_or_of_two_segments_is_refused_whole() {
    let disk = formatted(8 << 20, 1 << 20, 6).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 4, 6);
    node.append(SEG, 1, GEOMETRY, wire(recs[..1].to_vec())).await.unwrap();
    let mut foreign = recs[2].clone();
    foreign.segment = SegmentId { volume: 9, pg: 0 };
    for bad in [
        vec![recs[2].clone(), recs[1].clone()],
        vec![recs[1].clone(), recs[1].clone()],
        vec![recs[1].clone(), foreign],
    ] {
        let refused = node.append(SEG, 1, GEOMETRY, wire(bad)).await;
        assert!(matches!(refused, Err(NodeError::BadBatch(_))), "{refused:?}");
    }
    let status = node.status(SEG, 1).unwrap();
    assert_eq!((status.scl, status.highest_lsn, status.records), (1, 1, 1));
    node.shutdown().await;
}

/// A recovering writer seals the segment (the old writer is refused from
/// then on), truncates it (the range is annulled, durably) and writes at
/// the new epoch; after a restart the annulled records stay gone even
/// though the log still holds their bytes.
#[tokio::test(start_paused = true)]
async fn seal_and_truncate_fence_the_old_writer_and_annul_its_range_across_restarts() {
    let disk = formatted(16 << 20, 1 << 20, 3).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let old = records(1, 60, 3);
    append_all(&node, &old).await;
    assert_eq!(node.set_pgmrpl(SEG, 1, 20).await.unwrap(), 20);

    // An append at an epoch the segment has not installed is refused.
    let err = node
        .append(SEG, 2, GEOMETRY, wire(records(61, 61, 3)))
        .await
        .unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::EpochNotInstalled);
    // Sealed at 2: the old writer (epoch 1) is refused, and so is epoch 2
    // until the truncation comes.
    let st = node.seal(SEG, 2, GEOMETRY).await.unwrap();
    assert_eq!((st.epoch, st.installed_epoch, st.scl), (2, 1, 60));
    let err = node
        .append(SEG, 1, GEOMETRY, wire(records(61, 61, 3)))
        .await
        .unwrap_err();
    assert_eq!(err.wire_code(), (ErrorCode::StaleEpoch, 2));
    let err = node
        .append(SEG, 2, GEOMETRY, wire(records(61, 61, 3)))
        .await
        .unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::EpochNotInstalled);
    // What recovery reads: the chain above a point, up to the SCL.
    let (scl, chain) = node.read_records(SEG, 2, 40, 1 << 20).unwrap();
    assert_eq!(scl, 60);
    assert_eq!(chain, old[40..].to_vec());
    let (_, some) = node.read_records(SEG, 2, 40, 100).unwrap();
    assert_eq!(some.len(), 1, "at least one record, however small the budget");
    // A truncation that reaches below the PGMRPL is refused; nothing changes.
    let err = node.truncate(SEG, 2, vec![(15, 1000)]).await.unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::BadRequest);
    // Truncate above 45: records 46..=60 are annulled.
    let st = node.truncate(SEG, 2, vec![(46, 1000)]).await.unwrap();
    assert_eq!((st.epoch, st.installed_epoch, st.scl, st.highest_lsn), (2, 2, 45, 45));
    assert_eq!(st.annulled, vec![(46, 1000)]);
    let kept = &old[..45];
    for page in FIRST_PAGE..FIRST_PAGE + 13 {
        assert_eq!(node.get_page(SEG, 2, page, 45).await.unwrap(), model(kept, page, 45));
    }
    // The new writer's chain goes on from 45, above the range.
    let mut new = records(1001, 1010, 4);
    new[0].prev_lsn_pg = 45;
    assert_eq!(node.append(SEG, 2, GEOMETRY, wire(new.clone())).await.unwrap(), 1010);
    node.shutdown().await;

    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(recovered.annulled, 15, "the log still had them; start-up skipped them");
    let st = node.status(SEG, 0).unwrap();
    assert_eq!((st.epoch, st.installed_epoch, st.scl), (2, 2, 1010));
    let all: Vec<RedoRecord> = kept.iter().chain(&new).cloned().collect();
    for page in FIRST_PAGE..FIRST_PAGE + 13 {
        assert_eq!(
            node.get_page(SEG, 2, page, 1010).await.unwrap(),
            model(&all, page, 1010)
        );
    }
    node.shutdown().await;
}

/// Recovery A annuls 46 and up and dies; recovery B keeps 46..=60 and its
/// writer re-sends them. The log then holds both copies with A's
/// annulment between them: start-up drops the first and keeps the re-send.
#[tokio::test(start_paused = true)]
async fn records_resent_after_a_truncation_survive_a_restart() {
    let disk = formatted(16 << 20, 1 << 20, 3).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let old = records(1, 60, 3);
    append_all(&node, &old).await;
    node.seal(SEG, 2, GEOMETRY).await.unwrap();
    let st = node.truncate(SEG, 2, vec![(46, 1000)]).await.unwrap();
    assert_eq!(st.scl, 45);
    node.seal(SEG, 3, GEOMETRY).await.unwrap();
    let st = node.truncate(SEG, 3, vec![(61, 2000)]).await.unwrap();
    assert_eq!(st.annulled, vec![(61, 2000)], "B's set replaces A's");
    assert_eq!(
        node.append(SEG, 3, GEOMETRY, wire(old[45..].to_vec())).await.unwrap(),
        60
    );
    let mut new = records(2001, 2005, 4);
    new[0].prev_lsn_pg = 60;
    assert_eq!(node.append(SEG, 3, GEOMETRY, wire(new.clone())).await.unwrap(), 2005);
    node.shutdown().await;

    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(
        recovered.annulled, 15,
        "the first copies of 46..=60, before A's annulment"
    );
    let st = node.status(SEG, 0).unwrap();
    assert_eq!(
        (st.installed_epoch, st.scl, st.annulled.clone()),
        (3, 2005, vec![(61, 2000)])
    );
    let all: Vec<RedoRecord> = old.iter().chain(&new).cloned().collect();
    for page in FIRST_PAGE..FIRST_PAGE + 13 {
        assert_eq!(
            node.get_page(SEG, 3, page, 2005).await.unwrap(),
            model(&all, page, 2005)
        );
    }
    node.shutdown().await;
}

/// A seal at a newer epoch may arrive while a truncation is under way (a
/// recovering writer killed and restarted at once). Whatever the
/// interleaving, the seal's answer (which the next recovery decides by)
/// stays true, and what the node holds in memory is what it holds after a
/// restart.
#[tokio::test(start_paused = true)]
async fn a_seal_racing_a_truncation_leaves_memory_and_disk_agreeing() {
    for yields in 0..40usize {
        let disk = formatted(16 << 20, 1 << 20, 3).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        append_all(&node, &records(1, 60, 3)).await;
        node.seal(SEG, 2, GEOMETRY).await.unwrap();
        let racing = node.clone();
        let truncation = tokio::spawn(async move { racing.truncate(SEG, 2, vec![(46, 1000)]).await });
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        let sealed = node.seal(SEG, 3, GEOMETRY).await.unwrap();
        let _ = truncation.await.unwrap();
        let before = node.status(SEG, 0).unwrap();
        // The next recovery reads the seal's answer: what it says is held
        // must stay held.
        assert_eq!(sealed.scl, before.scl, "after {yields} yields");
        node.shutdown().await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let after = node.status(SEG, 0).unwrap();
        assert_eq!(
            (before.scl, before.installed_epoch, before.annulled),
            (after.scl, after.installed_epoch, after.annulled),
            "after {yields} yields"
        );
        node.shutdown().await;
    }
}

/// What a frame carried is what the log holds: each new record's bytes,
/// exactly as `encode` makes them, once, in LSN order; a re-send adds nothing.
#[tokio::test(start_paused = true)]
async fn the_log_holds_each_records_bytes_as_the_frame_carried_them() {
    use crate::proto::{FRAME_BYTES_MAX, Message, decode_frame, encode_frame};
    let disk = formatted(16 << 20, 1 << 20, 5).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 40, 5);
    for chunk in recs.chunks(7) {
        let sent = Message::Append {
            volume: SEG.volume,
            epoch: 1,
            pg: SEG.pg,
            page_bytes: GEOMETRY.page_bytes,
            pg_pages: GEOMETRY.pg_pages,
            membership_epoch: 0,
            records: wire(chunk.to_vec()),
        };
        let mut frame = Vec::new();
        encode_frame(9, &sent, &mut frame).unwrap();
        let (received, _) = decode_frame(&frame, FRAME_BYTES_MAX).unwrap().unwrap();
        let Message::Append { records, .. } = received.message else {
            panic!("not an Append: {:?}", received.message);
        };
        for (r, original) in records.iter().zip(chunk) {
            assert_eq!(r.record(), original);
            assert_eq!(r.encoded(), original.encode(), "kept bytes are the encoding");
        }
        node.append(SEG, 1, GEOMETRY, records).await.unwrap();
    }
    assert_eq!(
        node.append(SEG, 1, GEOMETRY, wire(recs[3..5].to_vec())).await.unwrap(),
        40
    );
    node.shutdown().await;
    let mut entries = Vec::new();
    let opened = LogEngine::open(disk.clone(), config().log, |_, entry| entries.push(entry))
        .await
        .unwrap();
    drop(opened.engine);
    opened.driver.await.unwrap();
    let want: Vec<Vec<u8>> = recs.iter().map(RedoRecord::encode).collect();
    assert_eq!(entries, want);
}

/// One bit flipped in one live log block at rest, then a restart: the node
/// starts, keeps every record after the damaged block, says exactly what it
/// lacks (holes, with its SCL below the first), never writes over the
/// records after the damage, and takes the missing records back.
#[tokio::test(start_paused = true)]
async fn a_damaged_log_block_leaves_known_holes_not_silent_loss() {
    use crate::log::layout::{METADATA_BLOCKS, block_offset};
    let disk = formatted(16 << 20, 1 << 20, 7).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 300, 7);
    append_all(&node, &recs).await;
    assert!(node.status(SEG, 1).unwrap().holes.is_empty());
    node.shutdown().await;
    // Block seq 5 of the log: records of the chain's first tens of LSNs.
    disk.flip_bit(block_offset(METADATA_BLOCKS + 4) + 2000, 5);

    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(recovered.damaged_log_blocks, 1);
    let st = node.status(SEG, 1).unwrap();
    assert!(st.scl < 300, "{st:?}");
    assert_eq!(st.highest_lsn, 300, "the records after the damage are kept: {st:?}");
    assert_eq!(st.holes.first().map(|h| h.0), Some(st.scl + 1), "{st:?}");
    let in_hole = |lsn: u64| st.holes.iter().any(|&(lo, hi)| lo <= lsn && lsn <= hi);
    let missing: Vec<RedoRecord> = {
        let s = node.state();
        let seg = &s.seg(SEG).unwrap().seg;
        recs.iter()
            .filter(|r| r.lsn > st.scl && seg.record(r.lsn).is_none())
            .cloned()
            .collect()
    };
    assert!(!missing.is_empty());
    for r in &missing {
        assert!(in_hole(r.lsn), "LSN {} is missing and not in a hole: {st:?}", r.lsn);
    }
    // Above everything held, the segment cannot tell what it lost: it says
    // so with an open hole until a newer record links down to it.
    assert_eq!(st.holes.last(), Some(&(301, u64::MAX)), "{st:?}");

    // New records go after the old end of the log; the ones after the
    // damage are still there after another restart.
    let more = records(301, 310, 7);
    for chunk in more.chunks(5) {
        node.append(SEG, 1, GEOMETRY, wire(chunk.to_vec())).await.unwrap();
    }
    let st2 = node.status(SEG, 1).unwrap();
    assert_eq!(st2.scl, st.scl, "the SCL stays below the first hole");
    assert!(
        st2.holes.iter().all(|h| h.1 != u64::MAX),
        "a newer record closed the open hole: {st2:?}"
    );
    node.shutdown().await;
    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(
        recovered.damaged_log_blocks, 1,
        "the damaged block is still in the live log"
    );
    let st3 = node.status(SEG, 1).unwrap();
    assert_eq!((st3.scl, st3.highest_lsn), (st.scl, 310), "{st3:?}");

    // The writer (or a peer) sends what is missing: the chain links up.
    let scl = node.append(SEG, 1, GEOMETRY, wire(missing)).await.unwrap();
    assert_eq!(scl, 310);
    let mut all = recs.clone();
    all.extend(more);
    check_pages(&node, &all, [150, 310].into_iter()).await;
    let st4 = node.status(SEG, 1).unwrap();
    assert!(
        st4.holes.iter().all(|h| h.1 == u64::MAX),
        "only the open hole of the restart remains: {st4:?}"
    );
    node.shutdown().await;
}

/// Ten records acknowledged, no release since open, power lost, and one bit
/// flipped in the anchor slot written last: the other slot holds the same
/// anchor (every anchor goes to both), so nothing is lost and the new
/// incarnation does not reuse a generation.
#[tokio::test(start_paused = true)]
async fn a_damaged_anchor_slot_loses_no_record() {
    use crate::log::layout::{ANCHOR_BLOCKS, block_offset};
    for (slot, &block) in ANCHOR_BLOCKS.iter().enumerate() {
        let disk = formatted(16 << 20, 1 << 20, 9).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let generation = node.log.stats().generation;
        append_all(&node, &records(1, 10, 9)).await;
        pull_the_plug(node);
        disk.crash();
        disk.flip_bit(block_offset(block) + 100, 1);
        let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
        assert_eq!((recovered.segments, recovered.records), (1, 10), "slot {slot}");
        assert_eq!(node.scl(SEG), 10, "slot {slot}");
        assert!(node.log.stats().generation > generation, "slot {slot}");
        node.shutdown().await;
    }
}

/// Each open of the device is a new incarnation (computed takes a
/// segment's SCL as reported when it changes), and a restart after power
/// loss is one too.
#[tokio::test(start_paused = true)]
async fn every_open_is_a_new_incarnation() {
    let disk = formatted(16 << 20, 1 << 20, 1).await;
    let mut seen = Vec::new();
    for clean in [true, false, true] {
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        assert!(
            !seen.contains(&node.incarnation),
            "incarnation {} again",
            node.incarnation
        );
        seen.push(node.incarnation);
        if clean {
            node.shutdown().await;
        } else {
            pull_the_plug(node);
        }
    }
}

/// A truncation's annulment in a block that rots: the records it annulled
/// do not come back at the next start (the table holds the ranges).
#[tokio::test(start_paused = true)]
async fn an_annulment_lost_to_damage_does_not_bring_its_records_back() {
    use crate::log::layout::{METADATA_BLOCKS, block_offset};
    let disk = formatted(16 << 20, 1 << 20, 8).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    append_all(&node, &records(1, 60, 8)).await;
    node.seal(SEG, 2, GEOMETRY).await.unwrap();
    let seq = node.log.stats().next_seq;
    node.truncate(SEG, 2, vec![(41, 1000)]).await.unwrap();
    assert_eq!(node.log.stats().next_seq, seq + 1, "the annulment took one block");
    let mut more = records(1001, 1020, 8);
    more[0].prev_lsn_pg = 40;
    node.append(SEG, 2, GEOMETRY, wire(more)).await.unwrap();
    node.shutdown().await;
    disk.flip_bit(block_offset(METADATA_BLOCKS + seq - 1) + 40, 3);

    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(recovered.damaged_log_blocks, 1);
    {
        let s = node.state();
        let seg = &s.seg(SEG).unwrap().seg;
        for lsn in 41..=60 {
            assert!(seg.record(lsn).is_none(), "annulled record {lsn} is back");
        }
        assert!(seg.record(1001).is_some());
    }
    node.shutdown().await;
}

/// The same, once a later recovery's set no longer names the range (a
/// writer drops a range at or below a PGMRPL): the records it annulled
/// would come back into the chain, with the writer's records after them
/// waiting for ever on a link below the SCL. The chain says which branch
/// is in force: the SCL comes back to the last record, and pages are right.
#[tokio::test(start_paused = true)]
async fn an_annulment_lost_to_damage_does_not_bring_back_a_range_no_longer_sent() {
    use crate::log::layout::{METADATA_BLOCKS, block_offset};
    let disk = formatted(16 << 20, 1 << 20, 9).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let mut recs = records(1, 60, 9);
    append_all(&node, &recs).await;
    node.seal(SEG, 2, GEOMETRY).await.unwrap();
    let seq = node.log.stats().next_seq;
    node.truncate(SEG, 2, vec![(41, 1000)]).await.unwrap();
    recs.truncate(40);
    let mut more = records(1001, 1020, 9);
    more[0].prev_lsn_pg = 40;
    node.append(SEG, 2, GEOMETRY, wire(more.clone())).await.unwrap();
    recs.extend(more);
    node.seal(SEG, 3, GEOMETRY).await.unwrap();
    node.truncate(SEG, 3, vec![]).await.unwrap();
    node.shutdown().await;
    disk.flip_bit(block_offset(METADATA_BLOCKS + seq - 1) + 40, 3);

    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(recovered.damaged_log_blocks, 1);
    let st = node.status(SEG, 0).unwrap();
    assert_eq!(st.scl, 1020, "{st:?}");
    assert_eq!(st.holes, vec![(1021, u64::MAX)], "{st:?}");
    for lsn in 41..=60 {
        assert!(
            node.state().seg(SEG).unwrap().seg.record(lsn).is_none(),
            "annulled record {lsn} is back"
        );
    }
    for page in FIRST_PAGE..FIRST_PAGE + 13 {
        let got = node.get_page(SEG, 3, page, 1020).await.unwrap();
        assert!(got == model(&recs, page, 1020), "page {page}");
    }
    node.shutdown().await;
}
