//! A deterministic world of one PG's six segments gossiping: a writer that
//! reaches only some of them, nodes down for long stretches, coalescing that
//! releases records, lost and delayed messages and partitions. After the
//! faults stop, every segment must reach the newest LSN, by pulls or by
//! hydration, within a bounded time, and no bound of the core is ever passed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use super::*;

const NODES: u64 = 6;
const PG: Pg = 7;
const RECORD_BYTES: u64 = 200;

/// A segment as the model keeps it: records above its floor, page versions at
/// or below it. Which LSNs belong to the chain is the truth every node would
/// learn from backlinks.
#[derive(Debug, Clone, Default)]
struct Seg {
    floor: u64,
    held: BTreeSet<u64>,
    /// An SCL known to hold (records are never lost here), so the walk
    /// starts there instead of at the floor.
    scl_hint: u64,
}

impl Seg {
    fn scl(&self, chain: &[u64]) -> u64 {
        let mut scl = self.floor;
        let from = chain.partition_point(|&c| c <= self.floor.max(self.scl_hint));
        if self.scl_hint > self.floor && from > 0 {
            scl = chain[from - 1];
        }
        for &l in &chain[from..] {
            if !self.held.contains(&l) {
                break;
            }
            scl = l;
        }
        scl
    }

    /// `(after, upto]` ranges past the SCL where records are lacking.
    fn missing(&self, chain: &[u64]) -> Vec<LsnRange> {
        let scl = self.scl(chain);
        let mut out = Vec::new();
        let mut last_held = scl;
        let mut gap_from: Option<u64> = None;
        let from = chain.partition_point(|&c| c <= scl);
        for &l in &chain[from..] {
            let Some(&highest) = self.held.iter().next_back() else {
                break;
            };
            if l > highest {
                break;
            }
            if self.held.contains(&l) {
                if let Some(from) = gap_from.take() {
                    out.push((from, last_held_prev(chain, l)));
                }
                last_held = l;
            } else if gap_from.is_none() {
                gap_from = Some(last_held);
            }
        }
        out
    }

    fn digest(&self, chain: &[u64]) -> Digest {
        Digest {
            installed_epoch: 1,
            membership_epoch: 1,
            scl: self.scl(chain),
            highest_lsn: self
                .held
                .iter()
                .next_back()
                .copied()
                .unwrap_or(self.floor)
                .max(self.floor),
            floor: self.floor,
        }
    }
}

/// The chain LSN just before `l`.
fn last_held_prev(chain: &[u64], l: u64) -> u64 {
    let i = chain.partition_point(|&c| c < l);
    if i == 0 { 0 } else { chain[i - 1] }
}

#[derive(Debug, Clone)]
enum Msg {
    DigestAsk {
        from: NodeId,
        digest: Digest,
    },
    DigestReply {
        from: NodeId,
        digest: Digest,
    },
    Pull {
        from: NodeId,
        id: u64,
        after: u64,
        max_bytes: u32,
    },
    PullReply {
        id: u64,
        records: Option<Vec<u64>>,
    },
    Hydrate {
        from: NodeId,
        id: u64,
        at: u64,
    },
    HydrateReply {
        id: u64,
        base: Option<(u64, Vec<u64>)>,
    },
}

struct World {
    now: Millis,
    rng: u64,
    chain: Vec<u64>,
    segs: Vec<Seg>,
    cores: Vec<GossipCore>,
    up: Vec<bool>,
    /// `cut[a][b]`: messages from a to b are dropped.
    cut: Vec<Vec<bool>>,
    loss_percent: u64,
    queue: BinaryHeap<Reverse<(Millis, u64, usize)>>,
    msgs: Vec<Option<(NodeId, Msg)>>,
    seq: u64,
    config: GossipConfig,
}

impl World {
    fn new(seed: u64, config: GossipConfig) -> World {
        World {
            now: 0,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            chain: Vec::new(),
            segs: vec![Seg::default(); NODES as usize],
            cores: (1..=NODES)
                .map(|n| GossipCore::new(n, config.clone(), seed ^ n))
                .collect(),
            up: vec![true; NODES as usize],
            cut: vec![vec![false; NODES as usize]; NODES as usize],
            loss_percent: 0,
            queue: BinaryHeap::new(),
            msgs: Vec::new(),
            seq: 0,
            config,
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x % n.max(1)
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        let (f, t) = ((from - 1) as usize, (to - 1) as usize);
        if self.cut[f][t] || self.rand(100) < self.loss_percent {
            return;
        }
        let at = self.now + 1 + self.rand(20);
        self.msgs.push(Some((to, msg)));
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, self.msgs.len() - 1)));
    }

    /// A commit's record reaches the up nodes, each with some chance of
    /// missing it (a lost batch), but always at least four copies somewhere.
    fn write(&mut self) {
        let lsn = self.chain.last().copied().unwrap_or(0) + 1 + self.rand(3);
        self.chain.push(lsn);
        let mut targets: Vec<usize> = (0..NODES as usize).filter(|&i| self.up[i]).collect();
        let mut copies = 0;
        for &i in &targets {
            if self.rand(100) >= 10 {
                self.segs[i].held.insert(lsn);
                copies += 1;
            }
        }
        while copies < 4 && !targets.is_empty() {
            let i = targets.remove(0);
            if self.segs[i].held.insert(lsn) {
                copies += 1;
            }
        }
    }

    /// Coalescing: a node releases records up to its SCL, below a read point
    /// some way behind the newest LSN.
    fn coalesce(&mut self, i: usize, keep_behind: u64) {
        let newest = self.chain.last().copied().unwrap_or(0);
        let scl = self.segs[i].scl(&self.chain);
        let to = scl.min(newest.saturating_sub(keep_behind));
        if to > self.segs[i].floor {
            let seg = &mut self.segs[i];
            seg.floor = to;
            seg.held = seg.held.split_off(&(to + 1));
        }
    }

    fn refresh(&mut self, i: usize) {
        self.segs[i].scl_hint = self.segs[i].scl(&self.chain);
        let local = Local {
            digest: self.segs[i].digest(&self.chain),
            members: (1..=NODES).collect(),
            missing: self.segs[i].missing(&self.chain),
        };
        self.cores[i].set_local(PG, local);
    }

    fn poll(&mut self, i: usize) {
        self.refresh(i);
        let me = i as u64 + 1;
        let actions = self.cores[i].poll(self.now);
        self.check_bounds(i);
        for a in actions {
            match a {
                Action::SendDigest { to, .. } => {
                    let digest = self.segs[i].digest(&self.chain);
                    self.send(me, to, Msg::DigestAsk { from: me, digest });
                }
                Action::Pull {
                    id,
                    to,
                    after,
                    max_bytes,
                    ..
                } => self.send(
                    me,
                    to,
                    Msg::Pull {
                        from: me,
                        id,
                        after,
                        max_bytes,
                    },
                ),
                Action::Hydrate { id, from, at, .. } => self.send(me, from, Msg::Hydrate { from: me, id, at }),
                Action::Abandon { .. } => {}
            }
        }
    }

    fn check_bounds(&self, i: usize) {
        let core = &self.cores[i];
        assert!(core.requests.len() as u64 <= NODES * self.config.inflight_per_peer_max as u64);
        assert!(core.inflight_bytes() <= self.config.inflight_bytes_max + u64::from(self.config.pull_bytes_max));
        for p in core.peers.values() {
            assert!(p.inflight <= self.config.inflight_per_peer_max, "per-peer bound passed");
        }
    }

    fn deliver(&mut self, to: NodeId, msg: Msg) {
        let t = (to - 1) as usize;
        if !self.up[t] {
            return;
        }
        match msg {
            Msg::DigestAsk { from, digest } => {
                self.refresh(t);
                let _ = self.cores[t].on_digest(self.now, PG, from, digest);
                let mine = self.segs[t].digest(&self.chain);
                self.send(to, from, Msg::DigestReply { from: to, digest: mine });
            }
            Msg::DigestReply { from, digest } => {
                let _ = self.cores[t].on_digest(self.now, PG, from, digest);
            }
            Msg::Pull {
                from,
                id,
                after,
                max_bytes,
            } => {
                let seg = &self.segs[t];
                let scl = seg.scl(&self.chain);
                let records = if seg.floor > after {
                    None
                } else {
                    let n = (u64::from(max_bytes) / RECORD_BYTES).max(1) as usize;
                    Some(seg.held.range(after + 1..=scl).copied().take(n).collect())
                };
                self.send(to, from, Msg::PullReply { id, records });
            }
            Msg::PullReply { id, records } => match records {
                Some(records) => {
                    let bytes = records.len() as u64 * RECORD_BYTES;
                    let floor = self.segs[t].floor;
                    self.segs[t].held.extend(records.into_iter().filter(|&l| l > floor));
                    self.cores[t].on_pulled(self.now, id, bytes);
                }
                None => self.cores[t].on_failed(self.now, id),
            },
            Msg::Hydrate { from, id, at } => {
                let seg = &self.segs[t];
                let scl = seg.scl(&self.chain);
                let base = (seg.floor >= at).then(|| (seg.floor, seg.held.range(..=scl).copied().collect()));
                self.send(to, from, Msg::HydrateReply { id, base });
            }
            Msg::HydrateReply { id, base } => match base {
                Some((floor, records)) => {
                    let seg = &mut self.segs[t];
                    if floor > seg.floor {
                        seg.floor = floor;
                        seg.held = seg.held.split_off(&(floor + 1));
                    }
                    seg.held.extend(records.into_iter().filter(|&l| l > floor));
                    self.cores[t].on_pulled(self.now, id, RECORD_BYTES);
                }
                None => self.cores[t].on_failed(self.now, id),
            },
        }
    }

    /// Run until `until`: every node polls each 10 ms, messages arrive in
    /// time order, and `each_ms` is called every millisecond.
    fn run(&mut self, until: Millis, mut each_ms: impl FnMut(&mut World)) {
        while self.now < until {
            self.now += 1;
            each_ms(self);
            while let Some(&Reverse((at, _, idx))) = self.queue.peek() {
                if at > self.now {
                    break;
                }
                self.queue.pop();
                if let Some((to, msg)) = self.msgs[idx].take() {
                    self.deliver(to, msg);
                }
            }
            if self.now % 10 == 0 {
                for i in 0..NODES as usize {
                    if self.up[i] {
                        self.poll(i);
                    }
                }
            }
        }
    }

    fn all_caught_up(&self) -> bool {
        let newest = self.chain.last().copied().unwrap_or(0);
        self.segs.iter().all(|s| s.scl(&self.chain) == newest)
    }
}

fn sim_seeds() -> u64 {
    std::env::var("GOSSIP_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

/// Faults for a while, then none: every segment reaches the newest LSN.
fn run_seed(seed: u64) -> GossipCounters {
    let config = GossipConfig {
        digest_interval_ms: 50,
        pull_bytes_max: 4 * RECORD_BYTES as u32,
        inflight_bytes_max: 8 * 4 * RECORD_BYTES,
        timeout_min_ms: 30,
        timeout_max_ms: 500,
        hydrate_stall_ms: 500,
        ..GossipConfig::default()
    };
    let mut w = World::new(seed, config);
    w.loss_percent = w.rand(20);
    let faults_until = 5_000;
    w.run(faults_until, |w| {
        if w.rand(3) == 0 {
            w.write();
        }
        match w.rand(2_000) {
            0 => {
                // A node goes down; never more than two at once.
                let down = w.up.iter().filter(|u| !**u).count();
                let i = w.rand(NODES) as usize;
                if down < 2 {
                    w.up[i] = false;
                }
            }
            1 => {
                let i = w.rand(NODES) as usize;
                w.up[i] = true;
            }
            2 => {
                let (a, b) = (w.rand(NODES) as usize, w.rand(NODES) as usize);
                w.cut[a][b] = !w.cut[a][b];
            }
            3 | 4 => {
                // An operator asks a node to fill its gaps now (`FillGaps`):
                // back-offs go, digests are due at once.
                let i = w.rand(NODES) as usize;
                if w.up[i] {
                    w.cores[i].fill_now(PG);
                }
            }
            _ => {}
        }
        if w.now % 100 == 0 {
            for i in 0..NODES as usize {
                if w.up[i] {
                    let keep = 5 + w.rand(100);
                    w.coalesce(i, keep);
                }
            }
        }
    });
    // Faults stop: every node up, no partitions, no loss, no more writes.
    w.up = vec![true; NODES as usize];
    w.cut = vec![vec![false; NODES as usize]; NODES as usize];
    w.loss_percent = 0;
    let settle_by = faults_until + 20_000;
    w.run(settle_by, |_| {});
    let newest = w.chain.last().copied().unwrap_or(0);
    for (i, s) in w.segs.iter().enumerate() {
        assert_eq!(
            s.scl(&w.chain),
            newest,
            "seed {seed}: node {} is at SCL {} of {newest} after the faults stopped (floor {}, counters {:?})",
            i + 1,
            s.scl(&w.chain),
            s.floor,
            w.cores[i].counters()
        );
    }
    assert!(w.all_caught_up());
    let mut sum = GossipCounters::default();
    for c in &w.cores {
        let c = c.counters();
        sum.pulls_done += c.pulls_done;
        sum.pulls_timed_out += c.pulls_timed_out;
        sum.hydrations_done += c.hydrations_done;
    }
    sum
}

#[test]
fn every_segment_catches_up_once_faults_stop() {
    if let Ok(seed) = std::env::var("GOSSIP_SIM_SEED") {
        run_seed(seed.parse().expect("GOSSIP_SIM_SEED is a number"));
        return;
    }
    let (mut pulls, mut timeouts, mut hydrations) = (0, 0, 0);
    for seed in 0..sim_seeds() {
        let c = run_seed(seed);
        pulls += c.pulls_done;
        timeouts += c.pulls_timed_out;
        hydrations += c.hydrations_done;
    }
    // The faults are strong enough that every path of the core is taken.
    assert!(
        pulls > 0 && timeouts > 0 && hydrations > 0,
        "pulls {pulls}, timeouts {timeouts}, hydrations {hydrations}"
    );
}

/// A node down while every peer coalesces and releases past its SCL comes
/// back and hydrates: no peer can serve its records any more.
#[test]
fn a_node_behind_every_peers_floor_hydrates() {
    let mut w = World::new(
        42,
        GossipConfig {
            digest_interval_ms: 50,
            timeout_min_ms: 30,
            timeout_max_ms: 500,
            ..GossipConfig::default()
        },
    );
    w.run(200, |w| w.write());
    w.up[5] = false;
    w.run(2_000, |w| {
        w.write();
        if w.now % 100 == 0 {
            for i in 0..5 {
                w.coalesce(i, 10);
            }
        }
    });
    let six = w.segs[5].scl(&w.chain);
    assert!(
        w.segs[..5].iter().all(|s| s.floor > six),
        "every peer released past node 6's SCL"
    );
    w.up[5] = true;
    w.run(6_000, |_| {});
    assert!(w.all_caught_up());
    assert_eq!(w.cores[5].counters().hydrations_done, 1);
}
