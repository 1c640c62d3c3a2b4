//! Scrub on one node, on the simulated disk: damage in the log, in a page
//! version slot, and in the page-version index is found by reading the
//! device again, repaired where the node holds a good copy, asked of a peer
//! (`NeedCopy`) where it does not, and a peer's copy is used only if it
//! verifies.

use std::time::Duration;

use super::tests::*;
use super::*;
use crate::io::sim::SimDisk;
use crate::scrub::{Area, Checked, Damaged};

/// Scrub every area of the node once, as a pass does: reading into
/// buffers kept from range to range (what a range before left in them is
/// never taken for what this one holds).
async fn scrub_all(node: &Node) -> Checked {
    let bufs = crate::scrub::bufs::BufPool::new(2, 256);
    let layout = node.scrub_layout();
    let mut all = Checked::default();
    let mut areas = vec![(Area::Log, layout.log.clone())];
    areas.extend(layout.segments.iter().map(|(id, r)| (Area::Segment(*id), r.clone())));
    for (area, range) in areas {
        let mut at = range.start;
        while at < range.end {
            let end = (at + 256).min(range.end);
            let c = node.scrub_range_in(area, at..end, &bufs).await.unwrap();
            all.blocks += c.blocks;
            all.pages += c.pages;
            all.found.extend(c.found);
            all.need_copy.extend(c.need_copy);
            at = end;
        }
    }
    all
}

fn slot_offset(node: &Node, page: u64, slot: usize) -> u64 {
    let extent = node.state().seg(SEG).unwrap().extent.unwrap();
    block_offset(extent.slot_block(extent.local(SEG.pg, page).unwrap(), slot))
}

async fn clean(disk: &Arc<SimDisk>) -> bool {
    let report = crate::inspect::inspect(disk).await.unwrap();
    if report.status != "clean" {
        eprintln!("{}", report.render());
    }
    report.status == "clean"
}

/// 60 records over a few pages, coalesced to 50, twice over (so each page
/// has two versions); a clean device scrubs clean, with every block of the
/// log and the extent checked.
async fn populated(seed: u64) -> (Arc<SimDisk>, Arc<Node>, Vec<RedoRecord>) {
    let disk = formatted(16 << 20, 1 << 20, seed).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 60, seed);
    append_all(&node, &recs[..30]).await;
    node.set_pgmrpl(SEG, 1, 25).await.unwrap();
    coalesced_through(&node, 25).await;
    append_all(&node, &recs[30..]).await;
    node.set_pgmrpl(SEG, 1, 50).await.unwrap();
    coalesced_through(&node, 50).await;
    (disk, node, recs)
}

#[tokio::test(start_paused = true)]
async fn a_clean_node_scrubs_clean_and_checks_everything() {
    let (disk, node, _) = populated(30).await;
    let c = scrub_all(&node).await;
    assert!(c.found.is_empty(), "{:?}", c.found);
    let layout = node.scrub_layout();
    let extent_blocks: u64 = layout.segments.iter().map(|(_, r)| r.end - r.start).sum();
    assert_eq!(c.blocks, layout.log.end - layout.log.start + extent_blocks);
    assert!(c.pages > 0);
    node.shutdown().await;
    assert!(clean(&disk).await);
}

/// A bit flipped in the slot that holds a page's older version: scrub
/// finds it and writes the current version over it; inspect is clean.
#[tokio::test(start_paused = true)]
async fn a_damaged_older_slot_is_rewritten() {
    let (disk, node, recs) = populated(31).await;
    let page = recs[0].page;
    let current = match node.read_current_for_test(page).await {
        Current::Version { slot, .. } => slot,
        Current::Never => panic!("page {page} has a version"),
    };
    let offset = slot_offset(&node, page, 1 - current);
    disk.flip_bit(offset + 1500, 2);
    let c = scrub_all(&node).await;
    assert_eq!(c.found.len(), 1, "{:?}", c.found);
    assert_eq!(
        (c.found[0].what, c.found[0].offset, c.found[0].repaired),
        (Damaged::OlderSlot { page }, offset, true)
    );
    assert!(c.need_copy.is_empty());
    assert!(scrub_all(&node).await.found.is_empty(), "a second pass is clean");
    check_pages(&node, &recs, [50, 60].into_iter()).await;
    node.shutdown().await;
    assert!(clean(&disk).await);
}

/// The current version's write made lost (the slot as it was before):
/// scrub reports the page and asks for a copy at the indexed LSN and CRC;
/// a copy with other bytes is refused and changes nothing; the right one
/// is installed, and the page is served right, coalescing goes on over it,
/// and inspect is clean.
#[tokio::test(start_paused = true)]
async fn a_lost_current_version_is_repaired_only_from_a_copy_that_verifies() {
    let disk = formatted(16 << 20, 1 << 20, 32).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 60, 32);
    append_all(&node, &recs[..30]).await;
    node.set_pgmrpl(SEG, 1, 25).await.unwrap();
    coalesced_through(&node, 25).await;
    // The slots the next round writes, as they are now.
    let pages: std::collections::BTreeSet<u64> = recs[25..50].iter().map(|r| r.page).collect();
    // (page, [(slot offset, bytes) of each slot]).
    type Slots = Vec<(u64, Vec<u8>)>;
    let before: Vec<(u64, Slots)> = pages
        .iter()
        .map(|&p| {
            let extent = node.state().seg(SEG).unwrap().extent.unwrap();
            let slot_len = extent.slot_blocks() as usize * BLOCK_SIZE;
            let slots = [0, 1].map(|slot| slot_offset(&node, p, slot));
            (p, slots.iter().map(|&at| (at, disk.read_raw(at, slot_len))).collect())
        })
        .collect();
    append_all(&node, &recs[30..]).await;
    node.set_pgmrpl(SEG, 1, 50).await.unwrap();
    coalesced_through(&node, 50).await;
    let (page, slots) = before[0].clone();
    for (at, bytes) in slots {
        disk.write_raw(at, &bytes);
    }
    let c = scrub_all(&node).await;
    assert_eq!(c.need_copy.len(), 1, "{:?}", c.found);
    let need = c.need_copy[0];
    assert_eq!((need.segment, need.page), (SEG, page));
    let (want, lsn) = model(&recs, page, 50);
    assert_eq!(need.lsn, lsn);
    assert!(matches!(
        node.get_page(SEG, 1, page, 60).await,
        Err(NodeError::PageDamaged { .. })
    ));

    let mut wrong = want.clone();
    wrong[7] ^= 1;
    assert!(node.install_copy(need, wrong).await.is_err());
    assert!(matches!(
        node.get_page(SEG, 1, page, 60).await,
        Err(NodeError::PageDamaged { .. })
    ));
    node.install_copy(need, want).await.unwrap();
    check_pages(&node, &recs, [50, 60].into_iter()).await;
    assert!(scrub_all(&node).await.found.is_empty(), "a second pass is clean");
    node.set_pgmrpl(SEG, 1, 60).await.unwrap();
    coalesced_through(&node, 60).await;
    check_pages(&node, &recs, [60].into_iter()).await;
    node.shutdown().await;
    assert!(clean(&disk).await);
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    check_pages(&node, &recs, [60].into_iter()).await;
    node.shutdown().await;
}

/// A bit flipped in a live log block (records not yet coalesced): scrub
/// writes its records again and the log lets it go; after a restart every
/// record is there, with no hole.
#[tokio::test(start_paused = true)]
async fn a_damaged_live_log_block_is_written_again() {
    let disk = formatted(16 << 20, 1 << 20, 33).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let recs = records(1, 60, 33);
    append_all(&node, &recs).await;
    let layout = node.scrub_layout();
    // The log's first block holds the first records.
    disk.flip_bit(block_offset(layout.log.start) + 3000, 4);
    let c = scrub_all(&node).await;
    let log: Vec<_> = c.found.iter().filter(|f| f.what == Damaged::LogBlock).collect();
    assert_eq!(log.len(), 1, "{:?}", c.found);
    assert!(log[0].repaired);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(scrub_all(&node).await.found.is_empty(), "a second pass is clean");
    node.shutdown().await;
    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(recovered.damaged_log_blocks, 0);
    let st = node.status(SEG, 0).unwrap();
    assert_eq!((st.scl, st.holes.len()), (60, 0), "{st:?}");
    check_pages(&node, &recs, [60].into_iter()).await;
    node.shutdown().await;
}

/// A bit flipped in the current copy of an index block: scrub writes the
/// block again (both copies end whole); inspect is clean.
#[tokio::test(start_paused = true)]
async fn a_damaged_index_copy_is_rewritten() {
    let (disk, node, recs) = populated(34).await;
    let extent = node.state().seg(SEG).unwrap().extent.unwrap();
    let (copy, _) = node.state().seg(SEG).unwrap().index.blocks[0].unwrap();
    let offset = block_offset(crate::pagemap::copy_block(extent.map_start_block(), 0, copy));
    disk.flip_bit(offset + 900, 6);
    let c = scrub_all(&node).await;
    assert_eq!(c.found.len(), 1, "{:?}", c.found);
    assert!(matches!(c.found[0].what, Damaged::PageMap { .. }) && c.found[0].repaired);
    assert!(scrub_all(&node).await.found.is_empty(), "a second pass is clean");
    check_pages(&node, &recs, [50, 60].into_iter()).await;
    node.shutdown().await;
    assert!(clean(&disk).await);
}

/// A record whose entry spans two log blocks (a whole page image), both
/// blocks damaged: writing the record again for the first frees the
/// second too, and the pass still reports both, repaired.
#[tokio::test(start_paused = true)]
async fn both_damaged_blocks_of_one_record_are_reported() {
    let disk = formatted(16 << 20, 1 << 20, 35).await;
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let mut recs = records(1, 2, 35);
    recs[0].body = crate::record::RecordBody::PageImage(vec![9; PAGE]);
    append_all(&node, &recs).await;
    let layout = node.scrub_layout();
    let blocks = [layout.log.start, layout.log.start + 1];
    for b in blocks {
        disk.flip_bit(block_offset(b) + 100, 1);
    }
    let c = scrub_all(&node).await;
    let mut log: Vec<(u64, bool)> = c
        .found
        .iter()
        .filter(|f| f.what == Damaged::LogBlock)
        .map(|f| (f.offset, f.repaired))
        .collect();
    log.sort_unstable();
    assert_eq!(log, blocks.map(|b| (block_offset(b), true)).to_vec(), "{:?}", c.found);
    assert!(scrub_all(&node).await.found.is_empty(), "a second pass is clean");
    node.shutdown().await;
    let (node, recovered) = Node::open(disk.clone(), config()).await.unwrap();
    assert_eq!(recovered.damaged_log_blocks, 0);
    let st = node.status(SEG, 0).unwrap();
    assert_eq!((st.scl, st.holes.len()), (2, 0), "{st:?}");
    check_pages(&node, &recs, [2].into_iter()).await;
    node.shutdown().await;
}
