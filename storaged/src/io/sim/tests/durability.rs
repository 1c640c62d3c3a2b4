//! The durability guarantee as a property: random writes, flushes,
//! completions and crashes, checked against a model built only from the
//! completions the disk reported.

use proptest::prelude::*;

use super::super::machine::SECTOR_BYTES;
use super::super::{Completion, IoId, SimDisk, SimFaults};
use super::{DISK_BLOCKS, DISK_BYTES, SECTORS_PER_BLOCK, block_offset, drain, pattern, sector_of};
use crate::io::{Durability, IoError};

#[derive(Debug, Clone)]
enum Action {
    Write {
        block: u64,
        blocks: usize,
        durable: bool,
    },
    Flush,
    /// Complete the next `n` step I/Os.
    Complete(usize),
    Crash,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..DISK_BLOCKS - 3, 1..=3usize, any::<bool>())
            .prop_map(|(block, blocks, durable)| Action::Write { block, blocks, durable }),
        1 => Just(Action::Flush),
        3 => (1..4usize).prop_map(Action::Complete),
        1 => Just(Action::Crash),
    ]
}

#[derive(Clone, Copy)]
struct Known {
    /// The write whose bytes the sector must hold (0: the initial zeros).
    tag: u64,
    /// Sector index within that write.
    idx: u64,
    /// When it became known durable: completions with a higher order are newer.
    order: u64,
}

#[derive(Clone, Copy)]
enum Issued {
    Write {
        tag: u64,
        durable: bool,
    },
    /// Covers the writes with completion order up to `covers`.
    Flush {
        covers: u64,
    },
}

struct WriteInfo {
    first_sector: u64,
    sectors: u64,
    /// Completion order, once completed `Ok`.
    completed: Option<u64>,
}

/// The test's own account of what must survive, built only from what the
/// disk reported (completions), never from its insides.
struct Model {
    writes: Vec<WriteInfo>,
    outstanding: Vec<(IoId, Issued)>,
    volatile: Vec<(u64, u64)>, // (tag, completion order)
    known: Vec<Known>,
    order: u64,
}

impl Model {
    fn new() -> Model {
        let sectors = DISK_BYTES as usize / SECTOR_BYTES;
        Model {
            writes: vec![WriteInfo {
                first_sector: 0,
                sectors: 0,
                completed: None,
            }],
            outstanding: Vec::new(),
            volatile: Vec::new(),
            known: vec![
                Known {
                    tag: 0,
                    idx: 0,
                    order: 0
                };
                sectors
            ],
            order: 0,
        }
    }

    fn make_durable(&mut self, tag: u64, order: u64) {
        let w = &self.writes[tag as usize];
        for i in 0..w.sectors {
            let k = &mut self.known[(w.first_sector + i) as usize];
            if k.order < order {
                *k = Known { tag, idx: i, order };
            }
        }
    }

    fn completed(&mut self, id: IoId, c: &Completion) {
        let at = self.outstanding.iter().position(|o| o.0 == id);
        let at = at.expect("the disk completes only what was issued");
        let (_, issued) = self.outstanding.remove(at);
        if c.error().is_some() {
            return;
        }
        match (issued, c) {
            (Issued::Write { tag, durable }, Completion::Write(_)) => {
                self.order += 1;
                self.writes[tag as usize].completed = Some(self.order);
                if durable {
                    self.make_durable(tag, self.order);
                } else {
                    self.volatile.push((tag, self.order));
                }
            }
            (Issued::Flush { covers }, Completion::Flush(_)) => {
                let covered: Vec<(u64, u64)> = self.volatile.iter().copied().filter(|v| v.1 <= covers).collect();
                self.volatile.retain(|v| v.1 > covers);
                for (tag, order) in covered {
                    self.make_durable(tag, order);
                }
            }
            _ => panic!("completion of the wrong kind: {c:?}"),
        }
    }
}

fn check_crash(disk: &SimDisk, model: &mut Model) -> Result<(), TestCaseError> {
    let mut in_flight = Vec::new();
    for (_, issued) in &model.outstanding {
        if let Issued::Write { tag, .. } = issued {
            in_flight.push(*tag);
        }
    }
    let issued_before = model.outstanding.len();
    disk.crash();
    let medium = disk.read_raw(0, DISK_BYTES as usize);
    for (s, bytes) in medium.chunks_exact(SECTOR_BYTES).enumerate() {
        let k = model.known[s];
        if bytes == sector_of(k.tag, k.idx) || (k.tag == 0 && bytes.iter().all(|&b| b == 0)) {
            continue;
        }
        // Something else is there: only a newer write of the caller's own may be.
        let tag = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let w = model.writes.get(tag as usize);
        let newer = w.is_some_and(|w| {
            let covers = (w.first_sector..w.first_sector + w.sectors).contains(&(s as u64));
            let after = match w.completed {
                Some(order) => order > k.order,
                None => in_flight.contains(&tag),
            };
            covers && after && bytes == sector_of(tag, s as u64 - w.first_sector)
        });
        prop_assert!(
            newer,
            "sector {s}: durable write {} (sector {}) lost; found tag {tag}",
            k.tag,
            k.idx
        );
    }
    prop_assert!(disk.read_visible(0, DISK_BYTES as usize) == medium, "visible = durable");
    let closed = drain(disk);
    prop_assert_eq!(closed.len(), issued_before);
    for (_, c) in &closed {
        prop_assert!(matches!(c.error(), Some(IoError::Closed)));
    }
    // The medium as it is now is the next generation's durable baseline.
    model.outstanding.clear();
    model.volatile.clear();
    model.order += 1;
    for (s, bytes) in medium.chunks_exact(SECTOR_BYTES).enumerate() {
        let tag = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let idx = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        model.known[s] = Known {
            tag,
            idx,
            order: model.order,
        };
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn completed_durable_or_flushed_writes_survive_crashes(
        seed in any::<u64>(),
        actions in proptest::collection::vec(action(), 1..48),
    ) {
        let faults = SimFaults { write_eio: 0.05, ..SimFaults::crashy() };
        let disk = SimDisk::new(DISK_BYTES, seed, faults);
        let mut model = Model::new();
        for action in actions.into_iter().chain([Action::Crash]) {
            match action {
                Action::Write { block, blocks, durable } => {
                    let tag = model.writes.len() as u64;
                    model.writes.push(WriteInfo {
                        first_sector: block_offset(block) / SECTOR_BYTES as u64,
                        sectors: (blocks * SECTORS_PER_BLOCK) as u64,
                        completed: None,
                    });
                    let durability = if durable { Durability::Durable } else { Durability::Volatile };
                    let id = disk.submit_write(block_offset(block), pattern(tag, blocks), durability);
                    model.outstanding.push((id, Issued::Write { tag, durable }));
                }
                Action::Flush => {
                    let id = disk.submit_flush();
                    model.outstanding.push((id, Issued::Flush { covers: model.order }));
                }
                Action::Complete(n) => {
                    for _ in 0..n {
                        let Some((id, c)) = disk.next_completion() else { break };
                        model.completed(id, &c);
                    }
                }
                Action::Crash => check_crash(&disk, &mut model)?,
            }
        }
    }
}
