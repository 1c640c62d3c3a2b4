//! One damaged block in the segment table or the page store, on the
//! simulated disk: the node never takes it for "never written" or for a
//! crash's torn write where no crash could have torn it, never serves a
//! wrong page or an older state, and says what it found.

use std::time::Duration;

use super::tests::*;
use super::*;
use crate::io::sim::SimDisk;
use crate::record::RecordBody;
use crate::segtable::{SLOT_BLOCKS, write_order};

/// Flip one bit in slot `slot` of the segment table.
fn flip_table_slot(disk: &SimDisk, slot: usize) {
    disk.flip_bit(block_offset(SLOT_BLOCKS[slot]) + 1000, 5);
}

/// Inspect the device offline: is the table slot `slot` reported as damage?
async fn inspect_reports_table_slot(disk: &Arc<SimDisk>, slot: usize) -> bool {
    let report = crate::inspect::inspect(disk).await.unwrap();
    let offset = block_offset(SLOT_BLOCKS[slot]);
    report.status == "corrupt" && report.check.problems.iter().any(|p| p.offset == offset)
}

/// A `Seal` answered at epoch 2, then a bit flipped in either table slot:
/// after a restart the segment is still at epoch 2 and the fenced writer
/// (epoch 1) is still refused.
#[tokio::test(start_paused = true)]
async fn a_damaged_table_slot_never_lets_a_fenced_writer_back_in() {
    for slot in 0..2 {
        let disk = formatted(16 << 20, 1 << 20, 11).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        append_all(&node, &records(1, 10, 11)).await;
        assert_eq!(node.seal(SEG, 2, GEOMETRY).await.unwrap().epoch, 2);
        let version = node.table.lock().await.version;
        node.shutdown().await;
        flip_table_slot(&disk, slot);
        // Only the next version's first slot can hold a crash's torn write.
        let damage = slot != write_order(version + 1)[0];
        assert_eq!(inspect_reports_table_slot(&disk, slot).await, damage, "slot {slot}");

        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let st = node.status(SEG, 0).unwrap();
        assert_eq!((st.epoch, st.scl), (2, 10), "slot {slot}");
        let err = node
            .append(SEG, 1, GEOMETRY, wire(records(11, 11, 11)))
            .await
            .unwrap_err();
        assert_eq!(err.wire_code(), (ErrorCode::StaleEpoch, 2), "slot {slot}");
        node.shutdown().await;
        // The node wrote both slots again at start-up.
        let report = crate::inspect::inspect(&disk).await.unwrap();
        assert_eq!(report.status, "clean", "{}", report.render());
    }
}

/// 300 records, coalesced to 290 and the log released behind them, then a
/// bit flipped in either table slot: after a restart the segment is at SCL
/// 300, coalesced to 290, and serves every page right.
#[tokio::test(start_paused = true)]
async fn a_damaged_table_slot_never_rolls_back_the_checkpoint() {
    for slot in 0..2 {
        let disk = formatted(16 << 20, 1 << 20, 12).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let recs = records(1, 300, 12);
        append_all(&node, &recs).await;
        node.set_pgmrpl(SEG, 1, 290).await.unwrap();
        coalesced_through(&node, 290).await;
        node.shutdown().await;
        flip_table_slot(&disk, slot);

        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let st = node.status(SEG, 0).unwrap();
        assert_eq!((st.scl, st.coalesced_lsn, st.pgmrpl), (300, 290, 290), "slot {slot}");
        check_pages(&node, &recs, [290, 300].into_iter()).await;
        node.shutdown().await;
    }
}

/// A table written once (the segment's first append), then a bit flipped
/// in either slot: the node starts with the segment and all its records.
#[tokio::test(start_paused = true)]
async fn a_damaged_table_written_once_keeps_its_segment() {
    for slot in 0..2 {
        let disk = formatted(16 << 20, 1 << 20, 13).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let recs = records(1, 20, 13);
        append_all(&node, &recs).await;
        assert_eq!(node.table.lock().await.version, 1);
        node.shutdown().await;
        flip_table_slot(&disk, slot);

        let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
        assert_eq!(recovered.segments, 1, "slot {slot}");
        assert_eq!(node.scl(SEG), 20, "slot {slot}");
        check_pages(&node, &recs, [20].into_iter()).await;
        node.shutdown().await;
    }
}

/// Both slots damaged: the node refuses to start, and says what it found
/// and what to do.
#[tokio::test(start_paused = true)]
async fn both_table_slots_damaged_refuse_to_start() {
    let disk = formatted(16 << 20, 1 << 20, 14).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    append_all(&node, &records(1, 20, 14)).await;
    node.shutdown().await;
    flip_table_slot(&disk, 0);
    flip_table_slot(&disk, 1);
    let err = Node::open(disk.clone(), config()).await.err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, OpenError::Table(_)), "{msg}");
    assert!(msg.contains("offset 32768") && msg.contains("offset 262144"), "{msg}");
    assert!(msg.contains("rebuild its segments from their peers"), "{msg}");
    let report = crate::inspect::inspect(&disk).await.unwrap();
    assert_eq!(report.status, "corrupt", "{}", report.render());
    let _ = Duration::ZERO;
}

/// A truncation whose range reaches records already coalesced (in page
/// versions, gone from memory) is refused, as one reaching records still
/// held at or below the PGMRPL is: it could not be applied.
#[tokio::test(start_paused = true)]
async fn a_truncation_over_coalesced_records_is_refused() {
    let disk = formatted(16 << 20, 1 << 20, 15).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 60, 15);
    append_all(&node, &recs).await;
    node.set_pgmrpl(SEG, 1, 40).await.unwrap();
    coalesced_through(&node, 40).await;
    assert_eq!(node.status(SEG, 0).unwrap().lowest_lsn, 41);
    node.seal(SEG, 2, GEOMETRY).await.unwrap();
    for range in [(30, 1000), (40, 40), (1, 5)] {
        let err = node.truncate(SEG, 2, vec![range]).await.unwrap_err();
        assert_eq!(err.wire_code().0, ErrorCode::BadRequest, "{range:?}: {err}");
        let st = node.status(SEG, 0).unwrap();
        assert_eq!((st.scl, st.installed_epoch, st.annulled.len()), (60, 1, 0), "{range:?}");
    }
    // Above the coalesced LSN (and the PGMRPL) a truncation is taken.
    let st = node.truncate(SEG, 2, vec![(51, 1000)]).await.unwrap();
    assert_eq!((st.scl, st.installed_epoch), (50, 2));
    for page in FIRST_PAGE..FIRST_PAGE + 12 {
        assert_eq!(node.get_page(SEG, 2, page, 50).await.unwrap(), model(&recs, page, 50));
    }

    // The writer goes on above the range and coalescing passes it; a later
    // recovery sends its whole set again, the applied range among them
    // (below the coalesced LSN now): taken, as nothing in it was coalesced.
    let mut more = records(1001, 1010, 15);
    more[0].prev_lsn_pg = 50;
    node.append(SEG, 2, GEOMETRY, wire(more)).await.unwrap();
    node.set_pgmrpl(SEG, 2, 1005).await.unwrap();
    coalesced_through(&node, 1005).await;
    node.seal(SEG, 3, GEOMETRY).await.unwrap();
    let st = node.truncate(SEG, 3, vec![(51, 1000), (1008, 2000)]).await.unwrap();
    assert_eq!((st.scl, st.installed_epoch), (1007, 3));
    // A new range below the coalesced LSN is still refused.
    node.seal(SEG, 4, GEOMETRY).await.unwrap();
    let err = node.truncate(SEG, 4, vec![(51, 1000), (1003, 2000)]).await.unwrap_err();
    assert_eq!(err.wire_code().0, ErrorCode::BadRequest, "{err}");
    node.shutdown().await;
}

/// Record `lsn` of page `page`: an image of `fill` bytes, or a delta writing
/// `fill` over 100 bytes at `lsn * 10`.
fn rec(lsn: u64, page: u64, image: bool, fill: u8) -> RedoRecord {
    let body = if image {
        RecordBody::PageImage(vec![fill; PAGE])
    } else {
        RecordBody::PageDelta {
            offset: (lsn * 10) as u32,
            bytes: vec![fill; 100],
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
}

/// Flip one bit in slot `slot` of `page`'s versions.
fn flip_page_slot(node: &Node, disk: &SimDisk, page: u64, slot: usize) -> u64 {
    let extent = node.state().seg(SEG).unwrap().extent.unwrap();
    let at = block_offset(extent.slot_block(extent.local(SEG.pg, page).unwrap(), slot));
    disk.flip_bit(at + 2000, 3);
    at
}

fn is_damaged(got: Result<(Vec<u8>, u64), NodeError>, offset: u64) -> bool {
    matches!(got, Err(NodeError::PageDamaged { offset: o, .. }) if o == offset)
}

/// Page P: an image at 1, a delta at 2, coalesced to 2; a bit flipped in
/// P's current version; a delta at 3 and PGMRPL 3. P is refused
/// (`PageDamaged`), never served wrong; the coalescer builds nothing on the
/// damaged version and keeps P's records; after a restart the same, and
/// `storctl inspect` reports the slot.
#[tokio::test(start_paused = true)]
async fn a_damaged_current_version_is_never_built_on() {
    let disk = formatted(16 << 20, 1 << 20, 16).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let p = FIRST_PAGE + 3;
    let q = FIRST_PAGE + 4;
    let mut recs = vec![rec(1, p, true, 1), rec(2, p, false, 2), rec(3, q, true, 3)];
    append_all(&node, &recs).await;
    node.set_pgmrpl(SEG, 1, 3).await.unwrap();
    coalesced_through(&node, 3).await;
    let offset = flip_page_slot(&node, &disk, p, 0);
    recs.extend([rec(4, p, false, 4), rec(5, q, false, 5)]);
    append_all(&node, &recs[3..]).await;
    node.set_pgmrpl(SEG, 1, 5).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The coalescer found it, and the status says so.
    let st = node.status(SEG, 0).unwrap();
    assert_eq!((st.damage.pages_total, &st.damage.pages[..]), (1, &[p][..]), "{st:?}");

    assert!(is_damaged(node.get_page(SEG, 1, p, 5).await, offset));
    // Nothing was coalesced over P's records: they are all still held.
    let st = node.status(SEG, 0).unwrap();
    assert_eq!(st.damage.pages_total, 1, "found again, counted once: {st:?}");
    assert_eq!((st.coalesced_lsn, st.scl, st.lowest_lsn), (3, 5, 4), "{st:?}");
    // Other pages are served right.
    assert_eq!(node.get_page(SEG, 1, q, 5).await.unwrap(), model(&recs, q, 5));
    node.shutdown().await;

    let report = crate::inspect::inspect(&disk).await.unwrap();
    assert_eq!(report.status, "corrupt", "{}", report.render());
    assert!(
        report.check.problems.iter().any(|x| x.offset == offset),
        "{}",
        report.render()
    );
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    assert!(is_damaged(node.get_page(SEG, 1, p, 5).await, offset));
    assert_eq!(node.get_page(SEG, 1, q, 5).await.unwrap(), model(&recs, q, 5));
    node.shutdown().await;
}

/// A bit flipped in the current version of a page nothing is pending for:
/// the status says nothing until a read finds it, then lists the page
/// (counted once however often it is read), and after a restart again
/// from the first read that finds it.
#[tokio::test(start_paused = true)]
async fn a_page_found_damaged_by_a_read_is_in_the_status() {
    let disk = formatted(16 << 20, 1 << 20, 18).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let p = FIRST_PAGE + 6;
    let q = FIRST_PAGE + 7;
    let recs = vec![rec(1, p, true, 1), rec(2, q, true, 2)];
    append_all(&node, &recs).await;
    node.set_pgmrpl(SEG, 1, 2).await.unwrap();
    coalesced_through(&node, 2).await;
    // P's one version is in its first slot.
    let offset = flip_page_slot(&node, &disk, p, pagestore::FIRST_SLOT);
    assert_eq!(node.status(SEG, 0).unwrap().damage, proto::Damage::default());

    for _ in 0..2 {
        assert!(is_damaged(node.get_page(SEG, 1, p, 2).await, offset));
        let damage = node.status(SEG, 0).unwrap().damage;
        assert_eq!(
            (damage.pages_total, damage.pages, damage.table_slot),
            (1, vec![p], false)
        );
    }
    assert_eq!(node.get_page(SEG, 1, q, 2).await.unwrap(), model(&recs, q, 2));
    assert_eq!(node.status(SEG, 0).unwrap().damage.pages, vec![p]);
    node.shutdown().await;

    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(node.status(SEG, 0).unwrap().damage.pages_total, 0);
    assert!(is_damaged(node.get_page(SEG, 1, p, 2).await, offset));
    assert_eq!(node.status(SEG, 0).unwrap().damage.pages, vec![p]);
    node.shutdown().await;
}

/// A damaged table slot found at open is in every segment's status until
/// the next open (which finds both slots written again).
#[tokio::test(start_paused = true)]
async fn a_table_slot_damaged_at_open_is_in_the_status() {
    let disk = formatted(16 << 20, 1 << 20, 19).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    append_all(&node, &records(1, 10, 19)).await;
    assert!(!node.status(SEG, 0).unwrap().damage.table_slot);
    let version = node.table.lock().await.version;
    node.shutdown().await;
    // Not the slot a crash could have torn: that is damage.
    let slot = 1 - write_order(version + 1)[0];
    flip_table_slot(&disk, slot);

    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let damage = node.status(SEG, 0).unwrap().damage;
    assert!(damage.table_slot && damage.pages_total == 0, "{damage:?}");
    node.shutdown().await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    assert!(!node.status(SEG, 0).unwrap().damage.table_slot);
    node.shutdown().await;
}

/// The table says a round was open at the last crash (round_lsn above
/// coalesced_lsn), and the current version of a page that round did not
/// write has rotted: the page is refused, never served from its older
/// version.
#[tokio::test(start_paused = true)]
async fn after_a_crash_a_rotted_current_version_is_not_taken_for_a_torn_write() {
    let disk = formatted(16 << 20, 1 << 20, 17).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let p = FIRST_PAGE + 5;
    let recs = [
        rec(1, p, true, 1),
        rec(2, p, false, 2),
        rec(3, p, false, 3),
        rec(4, p, false, 4),
    ];
    append_all(&node, &recs[..2]).await;
    node.set_pgmrpl(SEG, 1, 2).await.unwrap();
    coalesced_through(&node, 2).await;
    append_all(&node, &recs[2..3]).await;
    node.set_pgmrpl(SEG, 1, 3).await.unwrap();
    coalesced_through(&node, 3).await;
    append_all(&node, &recs[3..]).await;
    // Version 2 in slot 0, version 3 (current) in slot 1.
    let offset = flip_page_slot(&node, &disk, p, 1);
    node.shutdown().await;
    mark_round_open(&disk, 4).await;

    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    assert!(node.state().seg(SEG).unwrap().torn_after.is_some());
    assert!(is_damaged(node.get_page(SEG, 1, p, 4).await, offset));
    node.shutdown().await;
    let report = crate::inspect::inspect(&disk).await.unwrap();
    assert!(
        report.check.problems.iter().any(|x| x.offset == offset),
        "{}",
        report.render()
    );
}

/// A round open at a crash tore a write of page P, never written, in slot
/// 1, the slot that is not its first (`FIRST_SLOT`). The round's redo
/// writes P's first version with slot 1 back to never written, so once the
/// round is over nothing torn is left beside it to be taken for damage: P
/// reads right after the next start too.
#[tokio::test(start_paused = true)]
async fn a_first_write_torn_in_the_other_slot_is_cleared_by_the_rounds_redo() {
    let disk = formatted(16 << 20, 1 << 20, 19).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let p = FIRST_PAGE + 8;
    assert_eq!(pagestore::FIRST_SLOT, 0);
    let q = FIRST_PAGE + 9;
    let recs = vec![rec(1, p, true, 1), rec(2, q, true, 2)];
    append_all(&node, &recs).await;
    let extent = node.state().seg(SEG).unwrap().extent.unwrap();
    node.shutdown().await;
    // As a crash in a round to 2 would leave the device: P's version at 1
    // half written into slot 0, the table saying the round was open.
    let sb = read_superblock(disk.as_ref()).await.unwrap().superblock;
    let at = extent.slot_block(8, 1);
    let mut slot = vec![0u8; extent.slot_blocks() as usize * BLOCK_SIZE];
    let version = pagestore::PageVersion {
        lsn: 1,
        bytes: model(&recs, p, 1).0,
    };
    pagestore::encode_version(&mut slot, sb.device_id, &extent, SEG, p, at, &version);
    disk.write_raw(block_offset(at), &slot[..BLOCK_SIZE]);
    mark_round_open(&disk, 2).await;

    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    assert!(node.state().seg(SEG).unwrap().torn_after.is_some());
    node.set_pgmrpl(SEG, 1, 2).await.unwrap();
    coalesced_through(&node, 2).await;
    assert_eq!(node.get_page(SEG, 1, p, 2).await.unwrap(), model(&recs, p, 2));
    node.shutdown().await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    assert!(node.state().seg(SEG).unwrap().torn_after.is_none());
    assert_eq!(node.get_page(SEG, 1, p, 2).await.unwrap(), model(&recs, p, 2));
    assert_eq!(node.status(SEG, 0).unwrap().damage, proto::Damage::default());
    node.shutdown().await;
    let report = crate::inspect::inspect(&disk).await.unwrap();
    assert!(report.check.problems.is_empty(), "{}", report.render());
}

/// The bookkeeping behind the status: a page is counted once however often
/// it is found damaged, the 16 lowest are listed, and a page read or
/// written valid again leaves the count and the list (the next lowest
/// taking its place).
#[test]
fn damaged_pages_are_counted_once_and_the_lowest_listed() {
    let mut s = SegState::new(SEG, 1, GEOMETRY, 16);
    s.slots = vec![SlotState::Unknown as u8; 40];
    for local in (0..20).rev().chain([3, 7]) {
        s.set_slot_state(local, SlotState::Damaged);
    }
    assert_eq!(s.damaged_pages, 20);
    assert_eq!(
        s.damaged_listed.iter().copied().collect::<Vec<_>>(),
        (0..16).collect::<Vec<_>>()
    );
    s.set_slot_state(3, SlotState::Slot0);
    s.set_slot_state(30, SlotState::Slot1);
    assert_eq!(s.damaged_pages, 19);
    let want: Vec<u64> = (0..17).filter(|&l| l != 3).collect();
    assert_eq!(s.damaged_listed.iter().copied().collect::<Vec<_>>(), want);
}

/// What the device holds at slot `slot` of `page`'s versions.
fn slot_bytes(node: &Node, disk: &SimDisk, page: u64, slot: usize) -> (u64, Vec<u8>) {
    let extent = node.state().seg(SEG).unwrap().extent.unwrap();
    let at = block_offset(extent.slot_block(extent.local(SEG.pg, page).unwrap(), slot));
    (at, disk.read_raw(at, extent.slot_blocks() as usize * BLOCK_SIZE))
}

/// Page P gets a version at 2 (slot 0) then one at 4 (slot 1); then the
/// second version's write is made lost (slot 1 as it was before it: never
/// written) or overwritten by junk (bytes that are not a block of ours).
/// Either way the slots alone would show the version at 2 as current, an
/// older state: the page-version index says 4, so the page is refused
/// (`PageDamaged` at slot 1), before and after a restart, and `storctl
/// inspect` reports slot 1. Page Q, untouched, is served right throughout.
#[tokio::test(start_paused = true)]
async fn a_lost_or_junk_write_of_a_current_version_is_damage_not_an_older_page() {
    for junk in [false, true] {
        let disk = formatted(16 << 20, 1 << 20, 17).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let (p, q) = (FIRST_PAGE + 3, FIRST_PAGE + 4);
        let mut recs = vec![rec(1, p, true, 1), rec(2, p, false, 2), rec(3, q, true, 3)];
        append_all(&node, &recs).await;
        node.set_pgmrpl(SEG, 1, 3).await.unwrap();
        coalesced_through(&node, 3).await;
        let (at, before) = slot_bytes(&node, &disk, p, 1);
        recs.extend([rec(4, p, false, 4), rec(5, q, false, 5)]);
        append_all(&node, &recs[3..]).await;
        node.set_pgmrpl(SEG, 1, 5).await.unwrap();
        coalesced_through(&node, 5).await;
        assert_eq!(node.get_page(SEG, 1, p, 5).await.unwrap(), model(&recs, p, 5));
        if junk {
            let noise: Vec<u8> = (0..before.len()).map(|i| (i * 31 % 251) as u8).collect();
            disk.write_raw(at, &noise);
        } else {
            disk.write_raw(at, &before);
        }
        // The node has not read slot 1 since: the next read finds it.
        {
            let mut st = node.state();
            let s = st.seg_mut(SEG).unwrap();
            let local = s.extent.unwrap().local(SEG.pg, p).unwrap();
            s.set_slot_state(local, SlotState::Unknown);
        }
        assert!(is_damaged(node.get_page(SEG, 1, p, 5).await, at), "junk {junk}");
        assert_eq!(node.get_page(SEG, 1, q, 5).await.unwrap(), model(&recs, q, 5));
        node.shutdown().await;

        let report = crate::inspect::inspect(&disk).await.unwrap();
        assert_eq!(report.status, "corrupt", "{}", report.render());
        assert!(
            report.check.problems.iter().any(|x| x.offset == at),
            "{}",
            report.render()
        );
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        assert!(
            is_damaged(node.get_page(SEG, 1, p, 5).await, at),
            "junk {junk}, after a restart"
        );
        assert_eq!(node.get_page(SEG, 1, q, 5).await.unwrap(), model(&recs, q, 5));
        node.shutdown().await;
    }
}

/// A damaged copy of a page-version index block is written again from the
/// other at open; both copies damaged: the block is rebuilt from the page
/// slots. Either way every page is served right and `storctl inspect` is
/// clean afterwards.
#[tokio::test(start_paused = true)]
async fn a_damaged_index_block_is_rewritten_at_open() {
    for both in [false, true] {
        let disk = formatted(16 << 20, 1 << 20, 18).await;
        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        let (p, q) = (FIRST_PAGE + 3, FIRST_PAGE + 4);
        let recs = vec![rec(1, p, true, 1), rec(2, p, false, 2), rec(3, q, true, 3)];
        append_all(&node, &recs).await;
        node.set_pgmrpl(SEG, 1, 3).await.unwrap();
        coalesced_through(&node, 3).await;
        let extent = node.state().seg(SEG).unwrap().extent.unwrap();
        node.shutdown().await;
        let copies = if both { vec![0, 1] } else { vec![0] };
        for c in copies {
            disk.flip_bit(
                block_offset(crate::pagemap::copy_block(extent.map_start_block(), 0, c)) + 700,
                1,
            );
        }
        let report = crate::inspect::inspect(&disk).await.unwrap();
        assert_eq!(report.status, "corrupt", "{}", report.render());

        let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
        for page in [p, q] {
            assert_eq!(node.get_page(SEG, 1, page, 3).await.unwrap(), model(&recs, page, 3));
        }
        node.shutdown().await;
        let report = crate::inspect::inspect(&disk).await.unwrap();
        assert_eq!(report.status, "clean", "both {both}: {}", report.render());
    }
}
