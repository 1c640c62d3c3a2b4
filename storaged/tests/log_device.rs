//! The log engine on a real file device (io_uring + O_DIRECT), and what it and
//! `inspect` do with damaged, foreign, truncated and full devices.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use storaged::inspect::inspect;
use storaged::io::device::create_zero_filled;
use storaged::io::sim::{SimDisk, SimFaults};
use storaged::io::uring::{UringConfig, UringDevice};
use storaged::io::{AlignedBuf, BLOCK_SIZE, BlockIo, Durability};
use storaged::log::layout::{METADATA_BLOCKS, SUPERBLOCK_BLOCKS, block_offset};
use storaged::log::mkfs::{FormatOptions, format};
use storaged::log::{LogConfig, LogEngine, OpenError};
use storaged::record::{RecordBody, RedoRecord, SegmentId};
use support::run;

mod support;

fn tempdir() -> tempfile::TempDir {
    support::tempdir("log-device-")
}

/// A current-thread runtime with paused time: simulated-disk tests run
/// deterministically and their sleeps cost nothing.
fn run_paused<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(f);
}

/// A 4 MiB simulated disk, formatted with the smallest log (64 blocks).
async fn small_sim_log(seed: u64) -> (SimDisk, storaged::log::format::Superblock) {
    let disk = SimDisk::new(4 << 20, seed, SimFaults::none());
    let sb = format(
        &disk,
        FormatOptions {
            node_id: 1,
            log_bytes: Some(64 * 4096),
            force: false,
        },
    )
    .await
    .unwrap();
    (disk, sb)
}

fn open_dev(path: &Path) -> Arc<UringDevice> {
    Arc::new(UringDevice::open(path, &UringConfig::default()).unwrap())
}

async fn formatted(dir: &Path, name: &str, bytes: u64, log_bytes: u64) -> PathBuf {
    let path = dir.join(name);
    create_zero_filled(&path, bytes).unwrap();
    let dev = open_dev(&path);
    format(
        dev.as_ref(),
        FormatOptions {
            node_id: 7,
            log_bytes: Some(log_bytes),
            force: false,
        },
    )
    .await
    .unwrap();
    path
}

fn record(lsn: u64, payload_len: usize) -> Vec<u8> {
    RedoRecord {
        segment: SegmentId {
            volume: 1,
            pg: (lsn % 3) as u32,
        },
        lsn,
        prev_lsn_pg: lsn - 1,
        prev_lsn_page: 0,
        page: lsn % 17,
        cpl: lsn % 4 == 0,
        body: RecordBody::PageDelta {
            offset: (lsn % 100) as u32,
            bytes: vec![(lsn % 251) as u8; payload_len],
        },
    }
    .encode()
}

async fn reopen(path: &Path, config: LogConfig) -> (storaged::log::Opened, Vec<Vec<u8>>) {
    let mut entries = Vec::new();
    let opened = LogEngine::open(open_dev(path), config, |_, e| entries.push(e))
        .await
        .unwrap();
    (opened, entries)
}

async fn close(opened: storaged::log::Opened) {
    drop(opened.engine);
    opened.driver.await.unwrap();
}

#[test]
fn entries_survive_restarts_in_order() {
    run(async {
        let dir = tempdir();
        let path = formatted(dir.path(), "dev", 32 << 20, 4 << 20).await;
        let mut expected: Vec<Vec<u8>> = Vec::new();
        let mut lsn = 1u64;
        for session in 0..3 {
            let (opened, found) = reopen(&path, LogConfig::default()).await;
            assert_eq!(found, expected, "session {session}: recovered entries differ");
            // Concurrent appenders, each waiting for its ack: the log order is
            // the ack order, which we record as it happens.
            let acked = Arc::new(std::sync::Mutex::new(Vec::<(u64, Vec<u8>)>::new()));
            let mut tasks = tokio::task::JoinSet::new();
            for a in 0..8u64 {
                let engine = opened.engine.clone();
                let acked = acked.clone();
                let first = lsn + a * 1000;
                tasks.spawn(async move {
                    for i in 0..50u64 {
                        let e = record(first + i, ((first + i) * 37 % 3000) as usize);
                        let seq = engine.append(e.clone()).await.unwrap();
                        acked.lock().unwrap().push((seq, e));
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
            lsn += 8000;
            close(opened).await;
            let mut acked = std::mem::take(&mut *acked.lock().unwrap());
            // Entries of one block share its seq; sorting by seq is stable.
            acked.sort_by_key(|(seq, _)| *seq);
            let (opened, found) = reopen(&path, LogConfig::default()).await;
            let new: Vec<Vec<u8>> = found[expected.len()..].to_vec();
            assert_eq!(new.len(), 400);

            // Same multiset, and the same block order.
            let mut a: Vec<&Vec<u8>> = acked.iter().map(|(_, e)| e).collect();
            let mut b: Vec<&Vec<u8>> = new.iter().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b);

            expected = found;
            close(opened).await;
        }
    });
}

#[test]
fn a_full_log_makes_appends_wait_until_released() {
    run_paused(async {
        let (disk, _) = small_sim_log(1).await;
        let config = LogConfig {
            write_blocks_max: 4,
            writes_inflight_max: 2,
            ..LogConfig::default()
        };
        let opened = LogEngine::open(Arc::new(disk), config, |_, _| {}).await.unwrap();
        let engine = opened.engine;
        // One block each: 4037 bytes + 3 of framing fill a 4040-byte payload.
        let mut seqs = Vec::new();
        for i in 0..64u8 {
            seqs.push(engine.append(vec![i; 4037]).await.unwrap());
        }
        assert_eq!(engine.stats().free_blocks, 0);
        let waiting = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.append(vec![99; 10]).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !waiting.is_finished(),
            "an append into a full log must wait, not fail or overwrite"
        );
        engine.release(seqs[8]);
        let seq = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("append resumes")
            .unwrap();
        assert_eq!(seq.unwrap(), 65);
    });
}

/// Read block `seq` of the log, let `f` change it, write it back.
async fn damage_log_block(path: &Path, seq: u64, f: impl FnOnce(&mut [u8])) {
    let dev = open_dev(path);
    let offset = block_offset(METADATA_BLOCKS + seq - 1);
    let (mut buf, r) = dev.read(offset, AlignedBuf::zeroed_blocks(1)).await;
    r.unwrap();
    f(&mut buf);
    let (_, r) = dev.write(offset, buf, Durability::Durable).await;
    r.unwrap();
}

async fn fill(path: &Path, config: LogConfig, entries: u64) {
    let (opened, _) = reopen(path, config).await;
    for lsn in 1..=entries {
        opened.engine.append(record(lsn, 1800)).await.unwrap();
    }
    close(opened).await;
}

#[test]
fn a_bad_block_in_the_middle_is_corruption_a_torn_tail_is_not() {
    run(async {
        let dir = tempdir();
        let small_window = LogConfig {
            write_blocks_max: 2,
            writes_inflight_max: 2,
            ..LogConfig::default()
        };
        let path = formatted(dir.path(), "dev", 16 << 20, 4 << 20).await;
        fill(&path, small_window, 200).await; // 200 × 1859 bytes ≈ 93 blocks
        let report = inspect(&open_dev(&path)).await.unwrap();
        assert_eq!(report.status, "clean", "{}", report.render());
        assert_eq!(report.log.records, 200);
        let head = report.log.head_seq;

        // Just past the end, what a torn write leaves: a new header and the
        // first sectors of a block, old bytes after them (CRC mismatch).
        let dev = open_dev(&path);
        let (last, r) = dev
            .read(block_offset(METADATA_BLOCKS + head - 2), AlignedBuf::zeroed_blocks(1))
            .await;
        r.unwrap();
        drop(dev);
        damage_log_block(&path, head, |b| {
            b[..1024].copy_from_slice(&last[..1024]);
            b[2000] ^= 0xFF;
        })
        .await;
        let report = inspect(&open_dev(&path)).await.unwrap();
        assert_eq!(report.status, "clean", "{}", report.render());
        assert_eq!(report.check.blocks_torn_tail, 1);

        // One flipped bit in block 20, well inside the log: damage, not a
        // torn write. The log goes on past it; inspect says so.
        damage_log_block(&path, 20, |b| b[700] ^= 0x10).await;
        let report = inspect(&open_dev(&path)).await.unwrap();
        assert_eq!(report.status, "corrupt", "{}", report.render());
        assert!(
            report
                .check
                .problems
                .iter()
                .any(|p| p.what.contains("damaged log blocks") && p.offset == block_offset(METADATA_BLOCKS + 19)),
            "{}",
            report.render()
        );
        assert_eq!(report.log.head_seq, head, "the log's end is where it was");
        assert_eq!(report.log.damaged_blocks, 1);
        assert_eq!(report.check.blocks_torn_tail, 1, "{}", report.render());
        let (opened, entries) = reopen(&path, small_window).await;
        assert_eq!(opened.scan.next_seq, head);
        assert_eq!(opened.scan.damaged.len(), 1);
        assert_eq!(opened.scan.damaged[0].first_seq, 20);
        // Only the entries touching block 20 are gone (1859-byte entries:
        // at most three).
        assert!(entries.len() >= 197 && entries.len() < 200, "{}", entries.len());
        close(opened).await;
    });
}

#[test]
fn foreign_truncated_and_unformatted_devices_are_refused() {
    run(async {
        let dir = tempdir();
        // Never formatted.
        let blank = dir.path().join("blank");
        create_zero_filled(&blank, 8 << 20).unwrap();
        let err = LogEngine::open(open_dev(&blank), LogConfig::default(), |_, _| {})
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::NotFormatted), "{err}");

        // Someone else's data.
        let foreign = dir.path().join("foreign");
        create_zero_filled(&foreign, 8 << 20).unwrap();
        let junk: Vec<u8> = (0..(1 << 20))
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&foreign, [junk.as_slice(), &vec![0u8; 7 << 20]].concat()).unwrap();
        let err = LogEngine::open(open_dev(&foreign), LogConfig::default(), |_, _| {})
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::NoValidSuperblock(..)), "{err}");
        let err = format(
            open_dev(&foreign).as_ref(),
            FormatOptions {
                node_id: 1,
                log_bytes: None,
                force: false,
            },
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains("holds data"), "{err}");
        assert_eq!(
            std::fs::read(&foreign).unwrap()[..1 << 20],
            junk[..],
            "a refused format must not write"
        );

        // Truncated: formatted for 16 MiB, now 8.
        let path = formatted(dir.path(), "trunc", 16 << 20, 1 << 20).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let err = LogEngine::open(open_dev(&path), LogConfig::default(), |_, _| {})
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::SizeMismatch { .. }), "{err}");
        assert!(err.to_string().contains("formatted for"), "{err}");
    });
}

#[test]
fn one_bad_superblock_copy_is_survived_and_reported_two_are_refused() {
    run(async {
        let dir = tempdir();
        let path = formatted(dir.path(), "dev", 8 << 20, 1 << 20).await;
        fill(&path, LogConfig::default(), 10).await;
        let flip = |block: u64| {
            let path = path.clone();
            async move {
                let dev = open_dev(&path);
                let (mut buf, r) = dev.read(block_offset(block), AlignedBuf::zeroed_blocks(1)).await;
                r.unwrap();
                buf[60] ^= 1;
                let (_, r) = dev.write(block_offset(block), buf, Durability::Durable).await;
                r.unwrap();
            }
        };
        flip(SUPERBLOCK_BLOCKS[0]).await;
        let (opened, entries) = reopen(&path, LogConfig::default()).await;
        assert_eq!(entries.len(), 10);
        close(opened).await;
        let report = inspect(&open_dev(&path)).await.unwrap();
        assert_eq!(report.status, "corrupt");
        assert!(
            report.superblock.copies[0].contains("CRC"),
            "{:?}",
            report.superblock.copies
        );

        flip(SUPERBLOCK_BLOCKS[1]).await;
        let err = LogEngine::open(open_dev(&path), LogConfig::default(), |_, _| {})
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::NoValidSuperblock(..)), "{err}");
        assert!(inspect(&open_dev(&path)).await.is_err());
    });
}

#[test]
fn a_block_from_another_device_is_damage_and_the_log_goes_on_past_it() {
    run(async {
        let dir = tempdir();
        let a = formatted(dir.path(), "a", 8 << 20, 1 << 20).await;
        let b = formatted(dir.path(), "b", 8 << 20, 1 << 20).await;
        fill(&a, LogConfig::default(), 50).await;
        fill(&b, LogConfig::default(), 50).await;
        let head = inspect(&open_dev(&b)).await.unwrap().log.head_seq;
        // Block 5 of a's log lands in b's log (a misdirected or copied write).
        let dev_a = open_dev(&a);
        let offset = block_offset(METADATA_BLOCKS + 4);
        let (buf, r) = dev_a.read(offset, AlignedBuf::zeroed_blocks(1)).await;
        r.unwrap();
        drop(dev_a);
        let dev_b = open_dev(&b);
        let (_, r) = dev_b.write(offset, buf, Durability::Durable).await;
        r.unwrap();
        let report = inspect(&dev_b).await.unwrap();
        assert_eq!(report.log.head_seq, head);
        assert_eq!(report.log.damaged_blocks, 1);
        assert!(
            report
                .check
                .problems
                .iter()
                .any(|p| p.offset == offset && p.what.contains("another device")),
            "{}",
            report.render()
        );
        assert_eq!(report.status, "corrupt", "{}", report.render());
    });
}

const _: () = assert!(BLOCK_SIZE == 4096);

/// LSNs of the records among `entries` (all made by [`record`]).
fn lsns(entries: &[Vec<u8>]) -> Vec<u64> {
    entries
        .iter()
        .map(|e| match storaged::record::LogEntry::decode(e).unwrap() {
            storaged::record::LogEntry::Record(r) => r.lsn,
            other => panic!("not a record: {other:?}"),
        })
        .collect()
}

#[test]
fn rot_in_the_middle_is_reported_and_every_entry_after_it_is_kept_and_never_overwritten() {
    run(async {
        let dir = tempdir();
        let path = formatted(dir.path(), "dev", 8 << 20, 1 << 20).await;
        fill(&path, LogConfig::default(), 40).await;
        let (opened, entries) = reopen(&path, LogConfig::default()).await;
        assert_eq!(entries.len(), 40);
        let end = opened.scan.next_seq;
        close(opened).await;
        damage_log_block(&path, 3, |b| b[900] ^= 0x01).await;

        let (opened, entries) = reopen(&path, LogConfig::default()).await;
        let scan = &opened.scan;
        assert_eq!(scan.next_seq, end, "the log goes on past the damage");
        assert_eq!(scan.damaged.len(), 1, "{:?}", scan.damaged);
        assert_eq!(scan.damaged[0].first_seq, 3);
        assert_eq!(scan.damaged[0].offset, block_offset(METADATA_BLOCKS + 2));
        let found = lsns(&entries);
        // Two or three 1859-byte records touch block 3; all others are kept.
        let lost: Vec<u64> = (1..=40).filter(|l| !found.contains(l)).collect();
        assert!(!lost.is_empty() && lost.len() <= 3, "lost {lost:?}");
        assert!(lost.windows(2).all(|w| w[1] == w[0] + 1), "one run: {lost:?}");
        assert_eq!(found.len() + lost.len(), 40);
        // New entries go after the old end, not over what follows the damage.
        for lsn in 41..=45 {
            opened.engine.append(record(lsn, 1800)).await.unwrap();
        }
        close(opened).await;
        let (opened, entries) = reopen(&path, LogConfig::default()).await;
        let mut want = found.clone();
        want.extend(41..=45);
        assert_eq!(lsns(&entries), want);
        assert_eq!(opened.scan.damaged.len(), 1, "still known for damage");
        close(opened).await;

        let report = inspect(&open_dev(&path)).await.unwrap();
        assert_eq!(report.status, "corrupt", "{}", report.render());
        assert_eq!(
            report.check.blocks_torn_tail,
            0,
            "the damaged block is not crash debris: {}",
            report.render()
        );
    });
}

#[test]
fn rot_of_the_last_durable_block_refuses_to_open_and_is_reported() {
    run(async {
        let dir = tempdir();
        let path = formatted(dir.path(), "dev", 8 << 20, 1 << 20).await;
        fill(&path, LogConfig::default(), 40).await;
        let (opened, _) = reopen(&path, LogConfig::default()).await;
        let end = opened.scan.next_seq;
        close(opened).await;
        // Nothing follows the last block to show the log went on: only the
        // anchor's floor tells that it was durable.
        damage_log_block(&path, end - 1, |b| b[900] ^= 0x01).await;
        let err = LogEngine::open(open_dev(&path), LogConfig::default(), |_, _| {})
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::LogCut { .. }), "{err}");
        assert!(err.to_string().contains("refusing to open"), "{err}");
        let report = inspect(&open_dev(&path)).await.unwrap();
        assert_eq!(report.status, "corrupt", "{}", report.render());
    });
}

/// Ten entries in the log, then one bit flipped in either anchor slot: the
/// other slot holds the same, newest anchor; nothing is lost and the next
/// generation is above every earlier one.
#[test]
fn a_damaged_anchor_slot_loses_nothing_and_no_generation_is_reused() {
    use storaged::log::layout::ANCHOR_BLOCKS;
    run_paused(async {
        for (slot, &anchor_block) in ANCHOR_BLOCKS.iter().enumerate() {
            let (disk, _) = small_sim_log(11).await;
            let dev = Arc::new(disk.clone());
            let opened = LogEngine::open(dev.clone(), LogConfig::default(), |_, _| {})
                .await
                .unwrap();
            let generation = opened.engine.stats().generation;
            for lsn in 1..=10 {
                opened.engine.append(record(lsn, 100)).await.unwrap();
            }
            // A crash, not a clean close: no release or anchor since open.
            opened.driver.abort();
            drop(opened.engine);
            disk.flip_bit(block_offset(anchor_block) + 60, 2);
            let mut entries = Vec::new();
            let opened = LogEngine::open(dev.clone(), LogConfig::default(), |_, e| entries.push(e))
                .await
                .unwrap();
            assert_eq!(lsns(&entries), (1..=10).collect::<Vec<_>>(), "slot {slot}");
            assert!(opened.scan.anchor.slots[slot].is_err());
            assert!(opened.engine.stats().generation > generation, "slot {slot}");
            close(opened).await;
            let report = inspect(&dev).await.unwrap();
            assert_eq!(report.log.records, 10);
            assert_eq!(
                report.anchor.slots,
                ["ok".to_string(), "ok".to_string()],
                "rewritten at open"
            );
        }
    });
}

/// An anchor older than the log's blocks (both slots rolled back) would
/// drop everything after them and reuse their generation: refused.
#[test]
fn an_anchor_older_than_the_log_is_refused() {
    use storaged::log::format::Anchor;
    use storaged::log::layout::ANCHOR_BLOCKS;
    run_paused(async {
        let (disk, sb) = small_sim_log(12).await;
        let dev = Arc::new(disk.clone());
        let opened = LogEngine::open(dev.clone(), LogConfig::default(), |_, _| {})
            .await
            .unwrap();
        for lsn in 1..=10 {
            opened.engine.append(record(lsn, 100)).await.unwrap();
        }
        close(opened).await;
        // What format wrote, with a higher counter: valid, but generation 0.
        let stale = Anchor {
            counter: 1000,
            generation: 0,
            tail_seq: 1,
            inflight_blocks: 0,
            floor_seq: 1,
        };
        for block in ANCHOR_BLOCKS {
            let mut b = vec![0u8; BLOCK_SIZE];
            stale.encode(&mut b, sb.device_id, block_offset(block));
            disk.write_raw(block_offset(block), &b);
        }
        let err = LogEngine::open(dev.clone(), LogConfig::default(), |_, _| {})
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::AnchorBehindLog { .. }), "{err}");
        let report = inspect(&dev).await.unwrap();
        assert_eq!(report.status, "corrupt", "{}", report.render());
    });
}

#[test]
fn a_full_log_with_a_full_queue_still_takes_the_release() {
    run_paused(async {
        let (disk, _) = small_sim_log(2).await;
        let config = LogConfig {
            write_blocks_max: 4,
            writes_inflight_max: 2,
            queue_bytes_max: 4096,
            ..LogConfig::default()
        };
        let opened = LogEngine::open(Arc::new(disk), config, |_, _| {}).await.unwrap();
        let engine = opened.engine;
        let mut seqs = Vec::new();
        for i in 0..64u8 {
            seqs.push(engine.append(vec![i; 4037]).await.unwrap());
        }
        // More than the queue holds, behind a full log.
        let mut waiting = tokio::task::JoinSet::new();
        for i in 0..8u8 {
            let engine = engine.clone();
            waiting.spawn(async move { engine.append_many(vec![vec![i; 3000], vec![i; 3000]]).await });
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(waiting.len(), 8);
        assert!(waiting.try_join_next().is_none(), "appends into a full log wait");
        engine.release(seqs[63]);
        while let Some(r) = tokio::time::timeout(Duration::from_secs(5), waiting.join_next())
            .await
            .expect("resumes")
        {
            r.unwrap().expect("append succeeds after the release");
        }
        // Appends still waiting when every handle goes away fail; nothing hangs.
        for i in 0..70u8 {
            let _ = tokio::time::timeout(Duration::from_millis(1), engine.append(vec![i; 4037])).await;
        }
        drop(engine);
        tokio::time::timeout(Duration::from_secs(5), opened.driver)
            .await
            .expect("driver ends")
            .expect("no panic");
    });
}

#[test]
fn crafted_anchors_with_valid_crcs_are_refused_not_trusted() {
    use storaged::log::format::Anchor;
    use storaged::log::layout::ANCHOR_BLOCKS;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let crafted = [
            Anchor {
                counter: 9,
                generation: u32::MAX,
                tail_seq: 1,
                inflight_blocks: 0,
                floor_seq: 1,
            },
            Anchor {
                counter: u64::MAX,
                generation: 1,
                tail_seq: 1,
                inflight_blocks: 0,
                floor_seq: 1,
            },
            Anchor {
                counter: 9,
                generation: 1,
                tail_seq: u64::MAX - 3,
                inflight_blocks: 0,
                floor_seq: u64::MAX,
            },
            Anchor {
                counter: 9,
                generation: 1,
                tail_seq: 10,
                inflight_blocks: 0,
                floor_seq: 5,
            },
            Anchor {
                counter: 9,
                generation: 1,
                tail_seq: 1,
                inflight_blocks: 0,
                floor_seq: 1_000_000,
            },
        ];
        for anchor in crafted {
            let (disk, sb) = small_sim_log(3).await;
            let mut block = vec![0u8; BLOCK_SIZE];
            let offset = block_offset(ANCHOR_BLOCKS[1]);
            anchor.encode(&mut block, sb.device_id, offset);
            disk.write_raw(offset, &block);
            let dev = Arc::new(disk);
            let err = LogEngine::open(dev.clone(), LogConfig::default(), |_, _| {})
                .await
                .err()
                .unwrap();
            assert!(matches!(err, OpenError::BadAnchor(_)), "{anchor:?}: {err}");
            assert!(inspect(&dev).await.is_err(), "{anchor:?}");
        }
    });
}

#[test]
fn inspect_lists_segments_and_accepts_a_torn_older_table_slot() {
    use storaged::record::SegmentId;
    use storaged::segtable::{self, SegmentEntry, SegmentTable};
    run(async {
        let dir = tempdir();
        let path = formatted(dir.path(), "dev", 8 << 20, 1 << 20).await;
        let dev = open_dev(&path);
        let sb = storaged::log::recovery::read_superblock(dev.as_ref())
            .await
            .unwrap()
            .superblock;
        let mut table = SegmentTable::default();
        for pg in 0..3 {
            table.upsert(SegmentEntry {
                id: SegmentId { volume: 9, pg },
                epoch: 4,
                pgmrpl: 0,
                page_bytes: 8192,
                pg_pages: 16,
                extent_start_block: sb.pages_start_block + u64::from(pg) * 96,
                coalesced_lsn: 0,
                round_lsn: 0,
                installed_epoch: 4,
                annulled: Default::default(),
                annulled_count: 0,
                membership: None,
            });
        }
        segtable::write(dev.as_ref(), sb.device_id, &mut table).await.unwrap();
        segtable::write(dev.as_ref(), sb.device_id, &mut table).await.unwrap();
        let report = inspect(&dev).await.unwrap();
        assert_eq!(report.status, "clean", "{}", report.render());
        assert_eq!(report.segments.len(), 3);
        // A torn write into the older slot (the next version's) is debris.
        let older = segtable::SLOT_BLOCKS[((table.version + 1) % 2) as usize];
        let (mut buf, r) = dev.read(block_offset(older), AlignedBuf::zeroed_blocks(1)).await;
        r.unwrap();
        buf[3000] ^= 1;
        let (_, r) = dev.write(block_offset(older), buf, Durability::Durable).await;
        r.unwrap();
        let report = inspect(&dev).await.unwrap();
        assert_eq!(report.status, "clean", "{}", report.render());
        assert_eq!(report.check.blocks_torn_tail, 1);
    });
}
