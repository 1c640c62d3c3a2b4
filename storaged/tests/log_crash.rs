//! The log's durability contract under power loss, over many seeds: no
//! acknowledged entry is ever lost or changed, entries come back in the order
//! they were acknowledged, and nothing comes back that was never appended.
//!
//! Each seed formats a small simulated disk (so the log wraps many times),
//! runs concurrent appenders and a releaser against the real engine, cuts the
//! power at a random instant (pending writes lost, torn or landed by the
//! seed), recovers, checks, and goes on appending for several cycles.
//!
//! After some crashes one bit is flipped at rest, in one live log block or in
//! one anchor slot. Then an acknowledged entry may be missing only if it
//! touches a block recovery reports as damaged, or if the flipped block lies
//! at or above the durable floor recovery reports (there a rotten block and a
//! torn write of a crash look the same); or recovery refuses to open.
//!
//! `LOG_CRASH_SEEDS=N` runs N seeds (default 200); `LOG_CRASH_SEED=S` replays one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use storaged::io::sim::{SimDisk, SimFaults};
use storaged::log::OpenError;
use storaged::log::core::DurabilityMode;
use storaged::log::format::PAYLOAD_MAX_BYTES;
use storaged::log::layout::{ANCHOR_BLOCKS, METADATA_BLOCKS, block_offset};
use storaged::log::mkfs::{FormatOptions, format};
use storaged::log::recovery::ScanReport;
use storaged::log::{LogConfig, LogEngine};

const DEVICE_BYTES: u64 = 4 << 20;
const LOG_BYTES: u64 = 64 * 4096;
const CYCLES: usize = 6;
const APPENDERS: u64 = 6;

/// An entry names its appender and its number, and is padded to a seeded
/// length with bytes derived from both, so any damage is visible.
fn entry(appender: u64, n: u64, len: usize) -> Vec<u8> {
    let mut e = Vec::with_capacity(len.max(16));
    e.extend_from_slice(&appender.to_le_bytes());
    e.extend_from_slice(&n.to_le_bytes());
    let fill = (appender * 31 + n * 7) as u8;
    e.resize(len.max(16), fill);
    e
}

fn parse(e: &[u8]) -> (u64, u64) {
    let appender = u64::from_le_bytes(e[0..8].try_into().unwrap());
    let n = u64::from_le_bytes(e[8..16].try_into().unwrap());
    (appender, n)
}

/// One bit flipped at rest after a crash.
#[derive(Debug, Clone, Copy)]
enum Rot {
    /// In the log block with this seq (one an acknowledged entry starts in).
    Log(u64),
    /// In this anchor slot.
    Anchor(usize),
}

/// The seqs an entry of `len` bytes starting in block `start` may touch.
fn span(start: u64, len: usize) -> std::ops::RangeInclusive<u64> {
    start..=start + (len / (PAYLOAD_MAX_BYTES - 3)) as u64 + 1
}

#[derive(Default)]
struct Model {
    /// Acknowledged entries: (appender, n) → (start seq, bytes).
    acked: BTreeMap<(u64, u64), (u64, Vec<u8>)>,
    /// Every entry released below this seq may be gone.
    released_upto: u64,
}

fn run_seed(seed: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        let disk = SimDisk::new(DEVICE_BYTES, seed, SimFaults::none());
        format(
            &disk,
            FormatOptions {
                node_id: 1,
                log_bytes: Some(LOG_BYTES),
                force: false,
            },
        )
        .await
        .unwrap();
        let mut faults = SimFaults::crashy();
        faults.latency_min = Duration::from_micros(10);
        faults.latency_max = Duration::from_micros(rng.u64(20..2000));
        disk.set_faults(faults);
        let dev = Arc::new(disk.clone());
        let model = Arc::new(Mutex::new(Model {
            released_upto: 1,
            ..Model::default()
        }));
        let mut next_n: HashMap<u64, u64> = HashMap::new();
        let mut rot: Option<Rot> = None;

        for cycle in 0..CYCLES {
            let config = LogConfig {
                write_blocks_max: rng.usize(1..=16),
                writes_inflight_max: rng.usize(1..=8),
                // Small queues put appends under backpressure behind a full log.
                queue_bytes_max: if rng.bool() {
                    rng.usize(1..=8192)
                } else {
                    rng.usize(8192..=256 * 1024)
                },
                durability: if rng.bool() {
                    DurabilityMode::Dsync
                } else {
                    DurabilityMode::Flush
                },
            };
            let mut recovered = Vec::new();
            let opened = match LogEngine::open(dev.clone(), config, |start, e| recovered.push((start, e))).await {
                Ok(opened) => opened,
                // Refusing to start is a right answer to a rotten block, never to a crash alone.
                Err(e @ OpenError::LogCut { .. }) if matches!(rot, Some(Rot::Log(_))) => {
                    if std::env::var_os("LOG_CRASH_VERBOSE").is_some() {
                        eprintln!("seed {seed} cycle {cycle}: {rot:?}: refused: {e}");
                    }
                    return;
                }
                Err(e) => panic!("seed {seed} cycle {cycle}: open failed ({rot:?}): {e}"),
            };
            check(seed, cycle, &model.lock().unwrap(), &recovered, rot, &opened.scan);
            if let Some(Rot::Anchor(slot)) = rot {
                // Every anchor is in both slots: the other one carried it.
                assert!(
                    opened.scan.anchor.slots[1 - slot].is_ok(),
                    "seed {seed} cycle {cycle}: the other anchor slot is bad too"
                );
            }
            if std::env::var_os("LOG_CRASH_VERBOSE").is_some() {
                let m = model.lock().unwrap();
                eprintln!(
                    "seed {seed} cycle {cycle}: acked {} released below {} recovered {} scan {:?} end {} rot {rot:?} damaged {:?}",
                    m.acked.len(),
                    m.released_upto,
                    recovered.len(),
                    (opened.scan.anchor.anchor, opened.scan.next_seq),
                    opened.scan.end,
                    opened.scan.damaged
                );
            }
            {
                // What recovery returned is the owner's data now: keep
                // positions current so releases stay meaningful.
                let mut m = model.lock().unwrap();
                for (start, e) in &recovered {
                    let key = parse(e);
                    if let Some(v) = m.acked.get_mut(&key) {
                        v.0 = *start;
                    }
                }
                let kept = m.released_upto;
                m.acked.retain(|_, (start, _)| *start >= kept);
                // What a rotten block took (and `check` allowed) is gone for good.
                let found: std::collections::HashSet<(u64, u64)> = recovered.iter().map(|(_, e)| parse(e)).collect();
                m.acked.retain(|key, _| found.contains(key));
            }
            let engine = opened.engine;

            let mut tasks = tokio::task::JoinSet::new();
            for a in 0..APPENDERS {
                let engine = engine.clone();
                let model = model.clone();
                let first = *next_n.entry(a).or_insert(0);
                // Reserve numbers so entries of different cycles never collide.
                next_n.insert(a, first + 100_000);
                let mut arng = fastrand::Rng::with_seed(seed ^ (a << 32) ^ cycle as u64);
                tasks.spawn(async move {
                    for n in first.. {
                        let len = match arng.u8(0..10) {
                            0 => arng.usize(4000..20_000),
                            1..=3 => arng.usize(1000..4000),
                            _ => arng.usize(16..300),
                        };
                        let e = entry(a, n, len);
                        match engine.append(e.clone()).await {
                            Ok(start) => {
                                model.lock().unwrap().acked.insert((a, n), (start, e));
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
            // A releaser, like coalescing: free all but the newest entries.
            {
                let engine = engine.clone();
                let model = model.clone();
                let keep = rng.usize(1..40);
                let every = Duration::from_micros(rng.u64(100..3000));
                // Sometimes the owner stalls and the log fills up: appends
                // must wait, and the release must still get through.
                let stall = if rng.u8(0..3) == 0 {
                    Duration::from_micros(rng.u64(1000..30_000))
                } else {
                    Duration::ZERO
                };
                tasks.spawn(async move {
                    tokio::time::sleep(stall).await;
                    loop {
                        tokio::time::sleep(every).await;
                        let mut m = model.lock().unwrap();
                        let mut starts: Vec<u64> = m.acked.values().map(|(s, _)| *s).collect();
                        starts.sort_unstable();
                        if starts.len() > keep {
                            let upto = starts[starts.len() - keep];
                            if upto > m.released_upto {
                                m.released_upto = upto;
                                engine.release(upto);
                            }
                        }
                    }
                });
            }
            tokio::time::sleep(Duration::from_micros(rng.u64(100..60_000))).await;
            // Power loss: everything not durable may be lost or torn.
            disk.crash();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            drop(engine);
            // The driver must end by itself, cleanly, whatever state the
            // crash left it in (a panic here is a bug, not a crash effect).
            if let Err(e) = opened.driver.await {
                panic!("seed {seed} cycle {cycle}: log driver died: {e}");
            }
            // Acknowledgements are only those that reached the model before the crash.
            // Now and then one bit rots at rest.
            rot = None;
            if rng.u8(0..3) == 0 {
                let m = model.lock().unwrap();
                let starts: Vec<u64> = m
                    .acked
                    .values()
                    .map(|(s, _)| *s)
                    .filter(|&s| s >= m.released_upto)
                    .collect();
                if rng.bool() && !starts.is_empty() {
                    let seq = starts[rng.usize(0..starts.len())];
                    let block = METADATA_BLOCKS + (seq - 1) % (LOG_BYTES / 4096);
                    disk.flip_bit(block_offset(block) + rng.u64(0..4096), rng.u8(0..8));
                    rot = Some(Rot::Log(seq));
                } else {
                    let slot = rng.usize(0..2);
                    disk.flip_bit(block_offset(ANCHOR_BLOCKS[slot]) + rng.u64(0..4096), rng.u8(0..8));
                    rot = Some(Rot::Anchor(slot));
                }
            }
        }
    });
}

fn check(seed: u64, cycle: usize, model: &Model, recovered: &[(u64, Vec<u8>)], rot: Option<Rot>, scan: &ScanReport) {
    let mut seen: HashMap<(u64, u64), u64> = HashMap::new();
    let mut last_n: HashMap<u64, u64> = HashMap::new();
    for (start, e) in recovered {
        assert!(
            e.len() >= 16,
            "seed {seed} cycle {cycle}: short entry of {} bytes",
            e.len()
        );
        let key = parse(e);
        assert_eq!(
            e,
            &entry(key.0, key.1, e.len()),
            "seed {seed} cycle {cycle}: entry {key:?} damaged"
        );
        assert!(
            seen.insert(key, *start).is_none(),
            "seed {seed} cycle {cycle}: entry {key:?} twice"
        );
        // Each appender waits for its ack before the next append: its
        // entries are in the log in the order it made them.
        if let Some(prev) = last_n.insert(key.0, key.1) {
            assert!(
                prev < key.1,
                "seed {seed} cycle {cycle}: appender {} out of order: {prev} then {}",
                key.0,
                key.1
            );
        }
    }
    for (key, (start, bytes)) in &model.acked {
        if *start < model.released_upto {
            continue;
        }
        if let Some(Rot::Log(seq)) = rot {
            let touches = span(*start, bytes.len());
            let known = scan
                .damaged
                .iter()
                .any(|d| touches.start() < &(d.first_seq + d.blocks) && &d.first_seq <= touches.end());
            let looks_torn = seq >= scan.durable_floor && *touches.end() >= seq;
            if known || looks_torn {
                continue;
            }
        }
        assert!(
            seen.contains_key(key),
            "seed {seed} cycle {cycle}: acknowledged entry {key:?} ({} bytes, start seq {start}) lost; released below {}",
            bytes.len(),
            model.released_upto
        );
    }
}

#[test]
fn no_acknowledged_entry_is_lost_across_crashes() {
    if let Ok(seed) = std::env::var("LOG_CRASH_SEED") {
        run_seed(seed.parse().expect("LOG_CRASH_SEED is a number"));
        return;
    }
    let seeds: u64 = std::env::var("LOG_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    for seed in 0..seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed));
        if let Err(e) = result {
            eprintln!("failing seed: {seed} (replay with LOG_CRASH_SEED={seed})");
            std::panic::resume_unwind(e);
        }
    }
}
