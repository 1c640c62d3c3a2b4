//! Tests of the simulated disk: determinism, the durability guarantee, and
//! each fault. Devices are small and case counts bounded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::machine::SECTOR_BYTES;
use super::{Completion, IoId, SimDisk, SimFaults};
use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo, Durability, IoError};

mod durability;

pub(super) const DISK_BLOCKS: u64 = 16;
pub(super) const DISK_BYTES: u64 = DISK_BLOCKS * BLOCK_SIZE as u64;
pub(super) const SECTORS_PER_BLOCK: usize = BLOCK_SIZE / SECTOR_BYTES;

/// Sector `idx` of the write tagged `tag`: tag and index up front, then bytes
/// derived from both, so any sector says which write and which sector of it
/// it came from, and a partly written sector does not match.
fn fill_sector(tag: u64, idx: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&tag.to_le_bytes());
    out[8..16].copy_from_slice(&idx.to_le_bytes());
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ idx;
    for b in &mut out[16..] {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *b = (x >> 56) as u8;
    }
}

pub(super) fn pattern(tag: u64, blocks: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed_blocks(blocks);
    for (idx, sector) in buf.chunks_exact_mut(SECTOR_BYTES).enumerate() {
        fill_sector(tag, idx as u64, sector);
    }
    buf
}

pub(super) fn sector_of(tag: u64, idx: u64) -> Vec<u8> {
    let mut v = vec![0; SECTOR_BYTES];
    fill_sector(tag, idx, &mut v);
    v
}

pub(super) fn block_offset(block: u64) -> u64 {
    block * BLOCK_SIZE as u64
}

/// Completes every outstanding step I/O, in the disk's order.
pub(super) fn drain(disk: &SimDisk) -> Vec<(IoId, Completion)> {
    let mut out = Vec::new();
    while let Some(c) = disk.next_completion() {
        out.push(c);
    }
    out
}

fn is_eio(error: Option<&IoError>) -> bool {
    matches!(error, Some(IoError::Os { source, .. }) if source.raw_os_error() == Some(libc::EIO))
}

/// A fixed workload over the step API with every fault on; returns the
/// completion order (with success) and both images after a final crash.
fn scripted_run(seed: u64) -> (Vec<(IoId, bool)>, Vec<u8>, Vec<u8>) {
    let faults = SimFaults {
        write_eio: 0.1,
        read_eio: 0.1,
        misdirect: 0.1,
        bit_flip_read: 0.1,
        ..SimFaults::crashy()
    };
    let disk = SimDisk::new(DISK_BYTES, seed, faults);
    let mut order = Vec::new();
    let mut visible = Vec::new();
    for round in 0..4u64 {
        for i in 0..6u64 {
            let tag = round * 100 + i + 1;
            let durability = if i % 3 == 0 {
                Durability::Durable
            } else {
                Durability::Volatile
            };
            disk.submit_write(block_offset((tag * 7) % 14), pattern(tag, 2), durability);
            if i == 3 {
                disk.submit_flush();
                disk.submit_read(0, AlignedBuf::zeroed_blocks(4));
            }
            if i % 2 == 1
                && let Some((id, c)) = disk.next_completion()
            {
                order.push((id, c.error().is_none()));
            }
        }
        if round == 2 {
            visible = disk.read_visible(0, DISK_BYTES as usize);
        }
        disk.crash();
        for (id, c) in drain(&disk) {
            order.push((id, c.error().is_none()));
        }
    }
    (order, visible, disk.read_raw(0, DISK_BYTES as usize))
}

#[test]
fn same_seed_same_run_different_seed_different_run() {
    let a = scripted_run(7);
    let b = scripted_run(7);
    assert!(a == b, "same seed, same calls: identical results");
    let issue_order: Vec<IoId> = {
        let mut ids: Vec<IoId> = a.0.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids
    };
    assert_ne!(
        a.0.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        issue_order,
        "completions arrive out of issue order"
    );
    let differing = (8..16).filter(|&seed| scripted_run(seed) != a).count();
    assert_eq!(differing, 8, "every other seed gives another run");
}

#[test]
fn durable_writes_survive_crash() {
    for seed in 0..64 {
        let disk = SimDisk::new(DISK_BYTES, seed, SimFaults::crashy());
        disk.submit_write(block_offset(2), pattern(1, 3), Durability::Durable);
        let (_, c) = disk.next_completion().expect("one write outstanding");
        assert!(c.error().is_none());
        // Pending writes elsewhere, volatile and in flight, must not matter.
        disk.submit_write(block_offset(8), pattern(2, 2), Durability::Volatile);
        disk.next_completion();
        disk.submit_write(block_offset(10), pattern(3, 2), Durability::Durable);
        disk.crash();
        assert_eq!(disk.read_raw(block_offset(2), 3 * BLOCK_SIZE), &pattern(1, 3)[..]);
        assert_eq!(disk.read_visible(block_offset(2), 3 * BLOCK_SIZE), &pattern(1, 3)[..]);
    }
}

#[test]
fn volatile_writes_survive_only_after_flush() {
    let lose_all = SimFaults {
        crash_lose: 1.0,
        ..SimFaults::none()
    };
    let disk = SimDisk::new(DISK_BYTES, 1, lose_all);
    let zeros = vec![0u8; BLOCK_SIZE];

    // Completed but never flushed: in the cache only.
    disk.submit_write(0, pattern(1, 1), Durability::Volatile);
    drain(&disk);
    assert_eq!(disk.read_visible(0, BLOCK_SIZE), &pattern(1, 1)[..]);
    assert_eq!(disk.pending_writes(), 1);
    disk.crash();
    assert_eq!(disk.read_raw(0, BLOCK_SIZE), zeros);
    assert_eq!(disk.read_visible(0, BLOCK_SIZE), zeros);

    // Completed, then a flush issued and completed: durable.
    disk.submit_write(0, pattern(2, 1), Durability::Volatile);
    drain(&disk);
    disk.submit_flush();
    // Completes after the flush was issued: not covered by it.
    disk.submit_write(block_offset(1), pattern(3, 1), Durability::Volatile);
    let flushed = disk.complete(disk.submit_flush());
    assert!(matches!(flushed, Some(Completion::Flush(Ok(())))));
    drain(&disk);
    assert_eq!(disk.pending_writes(), 1, "the write issued after the flush");
    disk.crash();
    assert_eq!(disk.read_raw(0, BLOCK_SIZE), &pattern(2, 1)[..]);
    assert_eq!(disk.read_raw(block_offset(1), BLOCK_SIZE), zeros);
    assert_eq!(disk.pending_writes(), 0);
}

#[test]
fn crash_tears_blocks_at_sector_prefixes() {
    let old_tag = 0xA1D;
    let (mut lost, mut whole, mut torn) = (0, 0, 0);
    let mut prefix_lengths = [0u32; SECTORS_PER_BLOCK + 1];
    for seed in 0..200 {
        let disk = SimDisk::new(DISK_BYTES, seed, SimFaults::crashy());
        disk.write_raw(0, &pattern(old_tag, 4));
        disk.submit_write(0, pattern(9, 4), Durability::Volatile);
        drain(&disk);
        disk.crash();
        let medium = disk.read_raw(0, 4 * BLOCK_SIZE);
        for block in 0..4 {
            let sector = |i: usize| {
                let at = block * BLOCK_SIZE + i * SECTOR_BYTES;
                &medium[at..at + SECTOR_BYTES]
            };
            let idx = |i: usize| (block * SECTORS_PER_BLOCK + i) as u64;
            let landed = (0..SECTORS_PER_BLOCK)
                .take_while(|&i| sector(i) == sector_of(9, idx(i)))
                .count();
            for i in landed..SECTORS_PER_BLOCK {
                assert_eq!(
                    sector(i),
                    sector_of(old_tag, idx(i)),
                    "seed {seed} block {block}: after the landed prefix only old sectors"
                );
            }
            prefix_lengths[landed] += 1;
            match landed {
                0 => lost += 1,
                SECTORS_PER_BLOCK => whole += 1,
                _ => torn += 1,
            }
        }
        let stats = disk.stats();
        assert_eq!(
            stats.crash_blocks_lost + stats.crash_blocks_torn + stats.crash_blocks_whole,
            4
        );
    }
    assert!(lost > 0 && whole > 0 && torn > 0, "{lost} {whole} {torn}");
    assert!(
        prefix_lengths[1..SECTORS_PER_BLOCK].iter().all(|&n| n > 0),
        "every strict prefix length occurs: {prefix_lengths:?}"
    );
}

#[test]
fn misdirected_writes_land_elsewhere() {
    let faults = SimFaults {
        misdirect: 1.0,
        ..SimFaults::none()
    };
    for seed in 0..16 {
        let disk = SimDisk::new(DISK_BYTES, seed, faults.clone());
        let id = disk.submit_write(block_offset(3), pattern(5, 2), Durability::Durable);
        let Some(Completion::Write((_, Ok(())))) = disk.complete(id) else {
            panic!("a misdirected write reports success");
        };
        assert_eq!(disk.read_raw(block_offset(3), 2 * BLOCK_SIZE), vec![0; 2 * BLOCK_SIZE]);
        let medium = disk.read_raw(0, DISK_BYTES as usize);
        let found: Vec<u64> = (0..DISK_BLOCKS - 1)
            .filter(|&b| {
                let at = block_offset(b) as usize;
                medium[at..at + 2 * BLOCK_SIZE] == pattern(5, 2)[..]
            })
            .collect();
        assert_eq!(found.len(), 1, "seed {seed}: landed exactly once");
        assert_ne!(found[0], 3);
        assert_eq!(disk.stats().misdirected, 1);
    }
}

#[test]
fn bit_flips_on_read_and_at_rest() {
    let faults = SimFaults {
        bit_flip_read: 1.0,
        ..SimFaults::none()
    };
    let disk = SimDisk::new(DISK_BYTES, 3, faults);
    disk.write_raw(0, &pattern(4, 1));
    let Some(Completion::Read((buf, Ok(())))) = disk.complete(disk.submit_read(0, pattern(0, 1))) else {
        panic!("a flipped read still succeeds");
    };
    let differing_bits: u32 = buf
        .iter()
        .zip(pattern(4, 1).iter())
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    assert_eq!(differing_bits, 1, "exactly one bit flipped in the buffer");
    assert_eq!(disk.read_raw(0, BLOCK_SIZE), &pattern(4, 1)[..], "medium intact");
    assert_eq!(disk.stats().read_bit_flips, 1);

    disk.set_faults(SimFaults::none());
    disk.flip_bit(100, 3);
    let mut expected = pattern(4, 1).to_vec();
    expected[100] ^= 1 << 3;
    assert_eq!(disk.read_raw(0, BLOCK_SIZE), expected);
    let Some(Completion::Read((buf, Ok(())))) = disk.complete(disk.submit_read(0, pattern(0, 1))) else {
        panic!("read");
    };
    assert_eq!(&buf[..], &expected[..], "the flip persists at rest");
    disk.crash();
    assert_eq!(disk.read_raw(0, BLOCK_SIZE), expected);
    assert_eq!(disk.stats().bits_flipped_at_rest, 1);
}

#[test]
fn eio_fails_the_io_and_changes_nothing() {
    let faults = SimFaults {
        write_eio: 1.0,
        read_eio: 1.0,
        ..SimFaults::none()
    };
    let disk = SimDisk::new(DISK_BYTES, 4, faults);
    disk.write_raw(0, &pattern(1, 1));
    let durable = disk.submit_write(0, pattern(2, 1), Durability::Durable);
    let c = disk.complete(durable).expect("outstanding");
    assert!(is_eio(c.error()), "{c:?}");
    // One still in flight at the crash: an EIO write never lands either.
    disk.submit_write(0, pattern(3, 1), Durability::Volatile);
    disk.crash();
    assert!(matches!(
        drain(&disk)[..],
        [(_, Completion::Write((_, Err(IoError::Closed))))]
    ));
    assert_eq!(disk.read_raw(0, BLOCK_SIZE), &pattern(1, 1)[..]);

    let read = disk.complete(disk.submit_read(0, pattern(7, 1)));
    let Some(Completion::Read((buf, result))) = read else {
        panic!("read");
    };
    assert!(is_eio(result.as_ref().err()));
    assert_eq!(&buf[..], &pattern(7, 1)[..], "a failed read leaves the buffer");
    let stats = disk.stats();
    assert_eq!((stats.write_eio, stats.read_eio), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn out_of_range_requests_are_refused() {
    let disk = SimDisk::new(DISK_BYTES, 5, SimFaults::none());
    let bad = [
        (1, 1),                                // unaligned offset
        (block_offset(DISK_BLOCKS), 1),        // starts at the end
        (block_offset(DISK_BLOCKS - 1), 2),    // runs past the end
        (u64::MAX - BLOCK_SIZE as u64 + 1, 1), // offset + len overflows
    ];
    for (offset, blocks) in bad {
        let (_, r) = disk.read(offset, pattern(0, blocks)).await;
        assert!(matches!(r, Err(IoError::OutOfRange { op: "read", .. })), "{r:?}");
        let (_, r) = disk.write(offset, pattern(1, blocks), Durability::Durable).await;
        assert!(matches!(r, Err(IoError::OutOfRange { op: "write", .. })), "{r:?}");
        let id = disk.submit_write(offset, pattern(1, blocks), Durability::Volatile);
        let c = disk.complete(id).expect("outstanding");
        assert!(matches!(c.error(), Some(IoError::OutOfRange { .. })), "{c:?}");
    }
    assert_eq!(disk.read_raw(0, DISK_BYTES as usize), vec![0; DISK_BYTES as usize]);
    assert_eq!(disk.stats().writes, 0);
}

#[tokio::test(start_paused = true)]
async fn pre_crash_ios_cannot_touch_post_crash_state() {
    let faults = SimFaults {
        crash_lose: 1.0,
        ..SimFaults::none()
    };
    let disk = SimDisk::new(DISK_BYTES, 6, faults);
    let write = disk.write(0, pattern(1, 1), Durability::Durable);
    let flush = disk.flush();
    let step = disk.submit_write(block_offset(1), pattern(2, 1), Durability::Durable);
    disk.crash();
    assert_eq!(disk.epoch(), 1);
    // After the reboot, new writes to the same places.
    disk.write(0, pattern(3, 1), Durability::Volatile).await.1.unwrap();
    disk.flush().await.unwrap();

    let (buf, result) = write.await;
    assert!(matches!(result, Err(IoError::Closed)));
    assert_eq!(&buf[..], &pattern(1, 1)[..], "the buffer comes back");
    assert!(matches!(flush.await, Err(IoError::Closed)));
    let (id, c) = disk.next_completion().expect("the step write");
    assert_eq!(id, step);
    assert!(matches!(c.error(), Some(IoError::Closed)));

    assert_eq!(disk.read_raw(0, BLOCK_SIZE), &pattern(3, 1)[..]);
    assert_eq!(disk.read_raw(block_offset(1), BLOCK_SIZE), vec![0; BLOCK_SIZE]);
    assert_eq!(disk.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn reads_see_completed_writes() {
    let disk = SimDisk::new(DISK_BYTES, 8, SimFaults::none());
    let (_, r) = disk.write(block_offset(4), pattern(1, 2), Durability::Volatile).await;
    r.unwrap();
    let (buf, r) = disk.read(block_offset(4), AlignedBuf::zeroed_blocks(2)).await;
    r.unwrap();
    assert_eq!(&buf[..], &pattern(1, 2)[..]);

    // Step API: a read completing after a write sees it.
    disk.submit_write(block_offset(5), pattern(2, 1), Durability::Volatile);
    drain(&disk);
    let Some(Completion::Read((buf, Ok(())))) =
        disk.complete(disk.submit_read(block_offset(4), AlignedBuf::zeroed_blocks(2)))
    else {
        panic!("read");
    };
    assert_eq!(buf.block(0), pattern(1, 1).block(0));
    assert_eq!(buf.block(1), pattern(2, 1).block(0));
}

/// Issues 16 writes at once on a paused current-thread runtime; returns the
/// order their futures completed in.
async fn concurrent_writes(seed: u64) -> Vec<u64> {
    let disk = SimDisk::new(DISK_BYTES, seed, SimFaults::none());
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for tag in 0..16u64 {
        let disk = disk.clone();
        let order = order.clone();
        tasks.spawn(async move {
            let write = disk.write(block_offset(tag), pattern(tag, 1), Durability::Durable);
            write.await.1.unwrap();
            order.lock().unwrap().push(tag);
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    order.lock().unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn async_completions_are_reordered_deterministically() {
    let first = concurrent_writes(11).await;
    assert_eq!(first, concurrent_writes(11).await);
    assert_ne!(first, (0..16).collect::<Vec<_>>(), "out of issue order");
    assert_ne!(first, concurrent_writes(12).await);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_future_still_completes_its_io() {
    let disk = SimDisk::new(DISK_BYTES, 9, SimFaults::none());
    drop(disk.write(0, pattern(1, 1), Durability::Durable));
    assert_eq!(disk.in_flight(), 0);
    assert_eq!(disk.read_raw(0, BLOCK_SIZE), &pattern(1, 1)[..]);
    let _ = tokio::time::timeout(Duration::from_micros(1), disk.flush()).await;
    assert_eq!(disk.in_flight(), 0);
}
