//! One damaged block of the segment table or of the page store, over many
//! seeds: a node on a simulated disk takes appends, PGMRPL advances (and
//! so coalescing and log releases), seals and truncations, restarts now and
//! then, and at a random moment one bit flips in one written block (a table
//! slot or a page version slot). After it, checked against a model at every
//! step: every page read is right or `PageDamaged` naming the damaged slot;
//! every acknowledged record is there (SCL); the epoch never goes back; the
//! node always starts (one damaged copy never stops it); and
//! `storctl inspect` reports the damage the node refused a page for, and
//! nothing anywhere else.
//!
//! `METADATA_DAMAGE_SEEDS=N` runs N seeds (default 16); `METADATA_DAMAGE_SEED=S`
//! replays one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use storaged::hot::apply;
use storaged::io::BLOCK_SIZE;
use storaged::io::sim::{SimDisk, SimFaults};
use storaged::log::layout::block_offset;
use storaged::log::mkfs::{FormatOptions, format};
use storaged::log::recovery::read_superblock;
use storaged::node::{Node, NodeConfig, NodeError, PageGeometry};
use storaged::record::{RecordBody, RedoRecord, SegmentId, WireRecord};
use storaged::segtable;

const SEG: SegmentId = SegmentId { volume: 3, pg: 0 };
const PAGE: usize = 4096;
const PAGES: u64 = 12;
const GEOMETRY: PageGeometry = PageGeometry {
    page_bytes: PAGE as u32,
    pg_pages: PAGES,
};
const STEPS: usize = 40;

fn config() -> NodeConfig {
    NodeConfig {
        coalesce_round_pages_max: 4,
        ..NodeConfig::default()
    }
}

/// Where the bit flipped: the byte ranges a report of it may name.
#[derive(Debug, Clone)]
enum Flip {
    Table { slot: usize },
    Page { page: u64, slots: [u64; 2] },
}

impl Flip {
    /// Byte offsets of the slot(s) damage may be reported at.
    fn covers(&self, offset: u64) -> bool {
        match self {
            Flip::Table { slot } => {
                let start = block_offset(segtable::SLOT_BLOCKS[*slot]);
                (start..start + segtable::SLOT_LEN_BLOCKS * BLOCK_SIZE as u64).contains(&offset)
            }
            Flip::Page { slots, .. } => slots.contains(&offset),
        }
    }
}

struct Model {
    /// Acknowledged records not annulled, in LSN order.
    records: Vec<RedoRecord>,
    epoch: u64,
    pgmrpl: u64,
}

impl Model {
    fn last(&self) -> u64 {
        self.records.last().map_or(0, |r| r.lsn)
    }

    fn page(&self, page: u64, read_point: u64) -> (Vec<u8>, u64) {
        let mut bytes = vec![0u8; PAGE];
        let mut at = 0;
        for r in self.records.iter().filter(|r| r.page == page && r.lsn <= read_point) {
            apply(&mut bytes, &r.body).unwrap();
            at = r.lsn;
        }
        (bytes, at)
    }
}

fn record(rng: &mut fastrand::Rng, lsn: u64, prev: u64) -> RedoRecord {
    let body = if rng.u8(0..6) == 0 {
        RecordBody::PageImage(vec![lsn as u8; PAGE])
    } else {
        let len = rng.usize(1..200);
        RecordBody::PageDelta {
            offset: rng.u32(0..(PAGE - len) as u32),
            bytes: vec![(lsn * 7 + 1) as u8; len],
        }
    };
    RedoRecord {
        segment: SEG,
        lsn,
        prev_lsn_pg: prev,
        prev_lsn_page: 0,
        page: rng.u64(0..PAGES),
        cpl: true,
        body,
    }
}

/// Flip one bit in one written block of a table slot or of a page's
/// version slot, chosen by `rng`.
async fn flip_one(disk: &Arc<SimDisk>, rng: &mut fastrand::Rng) -> Flip {
    let sb = read_superblock(disk.as_ref()).await.unwrap().superblock;
    if rng.bool() {
        let table = segtable::read(disk.as_ref(), &sb.device_id).await.unwrap().table;
        if let Some(e) = table.get(SEG) {
            let extent = e.extent();
            let slot_blocks = extent.slot_blocks();
            let mut written = Vec::new();
            for local in 0..PAGES {
                for slot in 0..2 {
                    let first = extent.slot_block(local, slot);
                    for b in first..first + slot_blocks {
                        if disk.read_raw(block_offset(b), BLOCK_SIZE).iter().any(|&x| x != 0) {
                            written.push((local, b));
                        }
                    }
                }
            }
            if !written.is_empty() {
                let (local, block) = written[rng.usize(0..written.len())];
                disk.flip_bit(block_offset(block) + rng.u64(0..BLOCK_SIZE as u64), rng.u8(0..8));
                let slots = [0, 1].map(|s| block_offset(extent.slot_block(local, s)));
                return Flip::Page { page: local, slots };
            }
        }
    }
    let slot = rng.usize(0..2);
    let start = segtable::SLOT_BLOCKS[slot];
    disk.flip_bit(block_offset(start) + rng.u64(0..BLOCK_SIZE as u64), rng.u8(0..8));
    Flip::Table { slot }
}

/// Every page right or refused for the flipped slot; SCL and epoch as the
/// model says. Returns the pages refused.
async fn check(node: &Node, model: &Model, flip: Option<&Flip>, at: &str) -> BTreeSet<u64> {
    let st = node.status(SEG, 0).unwrap();
    assert_eq!(st.epoch, model.epoch, "{at}: the epoch never goes back");
    assert_eq!(st.scl, model.last(), "{at}: every acknowledged record is held");
    let mut refused = BTreeSet::new();
    let read_point = model.last().max(model.pgmrpl);
    if read_point == 0 {
        return refused;
    }
    for page in 0..PAGES {
        match node.get_page(SEG, model.epoch, page, read_point).await {
            Ok(got) => assert!(got == model.page(page, read_point), "{at}: page {page} served wrong"),
            Err(NodeError::PageDamaged { offset, .. }) => {
                assert!(
                    flip.is_some_and(|f| f.covers(offset)),
                    "{at}: page {page} refused for offset {offset}, not the flipped block ({flip:?})"
                );
                if let Some(Flip::Page { page: flipped, .. }) = flip {
                    assert_eq!(page, *flipped, "{at}: only the flipped page is refused");
                }
                refused.insert(page);
            }
            Err(e) => panic!("{at}: page {page}: {e}"),
        }
    }
    refused
}

/// Returns whether a page was refused (the flip hit a current version).
async fn run(seed: u64) -> bool {
    let mut rng = fastrand::Rng::with_seed(seed);
    let disk = Arc::new(SimDisk::new(16 << 20, seed, SimFaults::none()));
    format(
        disk.as_ref(),
        FormatOptions {
            node_id: 1,
            log_bytes: Some(1 << 20),
            force: false,
        },
    )
    .await
    .unwrap();
    let (mut node, _) = Node::open(disk.clone(), config()).await.unwrap();
    let mut model = Model {
        records: Vec::new(),
        epoch: 1,
        pgmrpl: 0,
    };
    let mut next_lsn = 1;
    let flip_at = rng.usize(4..STEPS - 4);
    let mut flip = None;
    let mut refused = BTreeSet::new();
    for step in 0..STEPS {
        let at = format!("seed {seed} step {step}");
        if step == flip_at {
            flip = Some(flip_one(&disk, &mut rng).await);
        }
        // The segment exists from the first step on.
        let op = if step == 0 { 0 } else { rng.u8(0..10) };
        match op {
            0..=4 => {
                let mut batch = Vec::new();
                for _ in 0..rng.usize(1..7) {
                    let prev = batch.last().map_or(model.last(), |r: &RedoRecord| r.lsn);
                    batch.push(record(&mut rng, next_lsn, prev));
                    next_lsn += 1;
                }
                let wire = batch.iter().cloned().map(WireRecord::new).collect();
                let scl = node.append(SEG, model.epoch, GEOMETRY, wire).await.unwrap();
                model.records.extend(batch);
                assert_eq!(scl, model.last(), "{at}");
            }
            5 | 6 => {
                let to = rng.u64(model.pgmrpl..=model.last());
                model.pgmrpl = node.set_pgmrpl(SEG, model.epoch, to).await.unwrap();
            }
            7 => tokio::time::sleep(Duration::from_secs(1)).await,
            8 if model.last() > 0 => {
                // A recovering writer: seal, then annul what lies above a
                // point it may (above PGMRPL and what is coalesced).
                model.epoch += 1;
                node.seal(SEG, model.epoch, GEOMETRY).await.unwrap();
                let floor = model.pgmrpl.max(node.status(SEG, 0).unwrap().coalesced_lsn);
                // Keep at least one record above the floor: a writer's
                // truncation never goes below its VDL, which is at or above
                // the PGMRPL it sent.
                let mut cuts: Vec<u64> = model
                    .records
                    .iter()
                    .map(|r| r.lsn)
                    .filter(|&l| l > floor)
                    .skip(1)
                    .collect();
                cuts.push(model.last() + 1);
                let cut = cuts[rng.usize(0..cuts.len())];
                let ranges = if cut <= model.last() {
                    vec![(cut, next_lsn - 1)]
                } else {
                    vec![]
                };
                let st = node.truncate(SEG, model.epoch, ranges).await.unwrap();
                model.records.retain(|r| r.lsn < cut);
                assert_eq!(st.scl, model.last(), "{at}");
            }
            _ => {
                node.shutdown().await;
                node = Node::open(disk.clone(), config())
                    .await
                    .unwrap_or_else(|e| panic!("{at}: one damaged block must not stop the node: {e}"))
                    .0;
            }
        }
        refused.extend(check(&node, &model, flip.as_ref(), &at).await);
    }
    node.shutdown().await;
    let at = format!("seed {seed} at the end");
    let (node, _) = Node::open(disk.clone(), config()).await.unwrap();
    refused.extend(check(&node, &model, flip.as_ref(), &at).await);
    node.shutdown().await;
    let report = storaged::inspect::inspect(&disk).await.unwrap();
    if !refused.is_empty() {
        assert_eq!(
            report.status,
            "corrupt",
            "{at}: pages {refused:?} refused\n{}",
            report.render()
        );
    }
    for p in &report.check.problems {
        assert!(
            flip.as_ref().is_some_and(|f| f.covers(p.offset)),
            "{at}: inspect reports damage where no bit flipped ({flip:?})\n{}",
            report.render()
        );
    }
    !refused.is_empty()
}

#[test]
fn one_damaged_metadata_block_never_loses_or_changes_acknowledged_state() {
    let seeds: Vec<u64> = match std::env::var("METADATA_DAMAGE_SEED") {
        Ok(s) => vec![s.parse().expect("METADATA_DAMAGE_SEED is a number")],
        Err(_) => {
            let n = std::env::var("METADATA_DAMAGE_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(16);
            (0..n).collect()
        }
    };
    let mut refused = 0;
    for &seed in &seeds {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        refused += usize::from(rt.block_on(run(seed)));
    }
    // The default seeds hit a current version at least once.
    assert!(
        seeds.len() < 16 || refused > 0,
        "no seed damaged a page the node then refused"
    );
    eprintln!("{} seeds, {refused} with a page refused", seeds.len());
}
