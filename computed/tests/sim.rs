//! The deterministic simulator (ARCHITECTURE.md §6): computed's writer core
//! and 8 storage nodes (each hosting segments built from
//! `storaged::segment::Segment`) in one thread, driven by one seed.
//!
//! - Network: every message has a random delay (so messages reorder), a few
//!   are lost or delivered twice; connections drop (partitions, crashes) and
//!   come back, and everything in flight on a dropped connection is lost.
//! - Disks: a write becomes durable after a random delay (completions out of
//!   order). A crash loses every write not yet durable; the segment is then
//!   rebuilt from its durable records with `Segment::recover`, as storaged does
//!   from its log. (This is a simulated durable log, not storaged's SimDisk +
//!   log engine: those are async and need a runtime, and the property that
//!   matters here — acknowledged means durable, the rest may vanish — is the
//!   one modelled.)
//!
//! Checked after every step: the VDL never goes back and is always a CPL;
//! every acknowledged commit is at or below the VDL and on at least 4 durable
//! segments of each PG it touched; every read returns exactly the model's page
//! at its read point (so an MTR is seen whole or not at all). At the end the
//! network heals, every transaction must commit, and every page read through
//! computed and straight from a caught-up segment must match the model.
//!
//! `SIM_SEEDS=N` runs N seeds (default 32); `SIM_SEED=S` replays seed S;
//! `SIM_STEPS=K` sets the number of transactions per seed. A failing seed is
//! printed with the command that replays it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use computed::cluster::{Cluster, local_cluster_toml};
use computed::core::{Output, PageWrite, Writer, WriterConfig};
use storaged::hot::{HotRecords, apply};
use storaged::proto::{ErrorCode, Message};
use storaged::record::{RecordBody, RedoRecord, SegmentId};
use storaged::segment::Segment;

const NODES: usize = 8;
const PGS: u32 = 2;
const PG_PAGES: u64 = 16;
const PAGE_BYTES: usize = 8192;
const TICK_US: u64 = 5_000;

fn cluster() -> Cluster {
    let nodes: Vec<std::net::SocketAddr> = (1..=NODES)
        .map(|i| format!("127.0.0.1:{}", 7000 + i).parse().unwrap())
        .collect();
    Cluster::parse(&local_cluster_toml(
        1,
        PGS,
        PG_PAGES,
        "127.0.0.1:7000".parse().unwrap(),
        &nodes,
    ))
    .unwrap()
}

struct SimSegment {
    seg: Segment<u64>,
    /// Durable records (they survive a crash).
    durable: Vec<RedoRecord>,
    hot: HotRecords,
}

impl SimSegment {
    fn new(id: SegmentId) -> SimSegment {
        SimSegment {
            seg: Segment::new(id, 1, 1_000_000),
            durable: Vec::new(),
            hot: HotRecords::default(),
        }
    }

    /// What survives a crash: the durable records, replayed.
    fn recovered(&self) -> SimSegment {
        let mut s = SimSegment::new(self.seg.id);
        let mut records = self.durable.clone();
        records.sort_by_key(|r| r.lsn);
        for r in records {
            s.seg.recover(&r, &r.encode(), 1).expect("recover");
            s.hot.insert(&r);
            s.durable.push(r);
        }
        s
    }
}

struct SimNode {
    up: bool,
    /// Bumped at each crash: disk completions of an older incarnation are lost.
    incarnation: u64,
    segments: HashMap<u32, SimSegment>,
}

/// Who is connected: a connection generation per node; messages of an
/// older generation are dropped on arrival.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Event {
    ToNode {
        node: usize,
        conn: u64,
        request: u64,
        msg: usize,
    },
    ToCore {
        node: usize,
        conn: u64,
        request: u64,
        msg: usize,
    },
    Durable {
        node: usize,
        incarnation: u64,
        pg: u32,
        write: usize,
    },
    Reconnect {
        node: usize,
    },
    Tick,
    Client,
}

struct Sim {
    rng: fastrand::Rng,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    /// Message bodies by index (events stay `Copy`).
    msgs: HashMap<usize, Message>,
    msg_next: usize,
    /// Disk writes in flight: (records, request ids waiting on them).
    writes: HashMap<usize, Vec<RedoRecord>>,
    write_next: usize,
    core: Writer<u64>,
    nodes: Vec<SimNode>,
    /// Current connection generation per node, and whether it is up.
    conn: Vec<(u64, bool)>,
    partitioned: Vec<bool>,
    placement: Vec<[u64; 6]>,
    // The model.
    txns: HashMap<u64, Vec<PageWrite>>,
    committed: Vec<(u64, u64)>,
    reads: HashMap<u64, u64>,
    next_token: u64,
    last_vdl: u64,
    cpls: std::collections::HashSet<u64>,
    faults: bool,
    reads_checked: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let cluster = cluster();
        let mut config = WriterConfig::from_cluster(&cluster, 1);
        let mut rng = fastrand::Rng::with_seed(seed);
        config.lal = [20, 200, 2000][rng.usize(..3)];
        config.txn_writes_max = 4;
        config.waiting_txns_max = 50;
        config.segment_batches_inflight_max = rng.usize(1..6);
        config.batch_bytes_max = [1, 20_000, 1 << 20][rng.usize(..3)];
        config.page_cache_pages_max = rng.usize(0..20);
        config.read_hedge_after_us = 20_000;
        config.resend_after_us = Some(100_000);
        config.retry_after_us = 10_000;
        let mut nodes = Vec::new();
        for n in 1..=NODES as u64 {
            let mut segments = HashMap::new();
            for (pg, slots) in cluster.placement.iter().enumerate() {
                if slots.contains(&n) {
                    segments.insert(
                        pg as u32,
                        SimSegment::new(SegmentId {
                            volume: 1,
                            pg: pg as u32,
                        }),
                    );
                }
            }
            nodes.push(SimNode {
                up: true,
                incarnation: 0,
                segments,
            });
        }
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            msgs: HashMap::new(),
            msg_next: 0,
            writes: HashMap::new(),
            write_next: 0,
            core: Writer::new(config, 0),
            nodes,
            conn: vec![(0, false); NODES],
            partitioned: vec![false; NODES],
            placement: cluster.placement.clone(),
            txns: HashMap::new(),
            committed: Vec::new(),
            reads: HashMap::new(),
            next_token: 1,
            last_vdl: 0,
            cpls: Default::default(),
            faults: true,
            reads_checked: 0,
        };
        for node in 0..NODES {
            let d = sim.rng.u64(0..1000);
            sim.schedule(d, Event::Reconnect { node });
        }
        sim.schedule(TICK_US, Event::Tick);
        sim
    }

    fn schedule(&mut self, after: u64, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((self.now + after, self.seq, e)));
    }

    fn latency(&mut self) -> u64 {
        if self.rng.u32(..100) < 5 {
            self.rng.u64(1_000..30_000) // a slow one
        } else {
            self.rng.u64(50..1_000)
        }
    }

    fn send(&mut self, to_node: bool, node: usize, request: u64, msg: Message) {
        let conn = self.conn[node].0;
        let copies = if !self.faults {
            1
        } else {
            match self.rng.u32(..1000) {
                0..3 => 0, // lost
                3..6 => 2, // duplicated
                _ => 1,
            }
        };
        for _ in 0..copies {
            let m = self.msg_next;
            self.msg_next += 1;
            self.msgs.insert(m, msg.clone());
            let e = if to_node {
                Event::ToNode {
                    node,
                    conn,
                    request,
                    msg: m,
                }
            } else {
                Event::ToCore {
                    node,
                    conn,
                    request,
                    msg: m,
                }
            };
            let d = self.latency();
            self.schedule(d, e);
        }
    }

    fn drop_connection(&mut self, node: usize) {
        if self.conn[node].1 {
            self.conn[node] = (self.conn[node].0 + 1, false);
            self.core.node_down(node as u64 + 1);
        }
    }

    fn crash(&mut self, node: usize) {
        self.drop_connection(node);
        let n = &mut self.nodes[node];
        n.up = false;
        n.incarnation += 1;
        for s in n.segments.values_mut() {
            *s = s.recovered();
        }
    }

    fn step(&mut self) -> bool {
        let Some(Reverse((at, _, event))) = self.events.pop() else {
            return false;
        };
        self.now = at;
        self.core.set_now(at);
        match event {
            Event::ToNode {
                node,
                conn,
                request,
                msg,
            } => {
                let msg = self.msgs.remove(&msg).expect("message");
                if self.conn[node] == (conn, true) && self.nodes[node].up {
                    self.node_handles(node, request, msg);
                }
            }
            Event::ToCore {
                node,
                conn,
                request,
                msg,
            } => {
                let msg = self.msgs.remove(&msg).expect("message");
                if self.conn[node] == (conn, true) {
                    self.core.on_reply(node as u64 + 1, request, msg);
                }
            }
            Event::Durable {
                node,
                incarnation,
                pg,
                write,
            } => {
                let records = self.writes.remove(&write).expect("write");
                if self.nodes[node].incarnation == incarnation {
                    let seg = self.nodes[node].segments.get_mut(&pg).expect("segment");
                    let lsns: Vec<(u64, u64)> = records.iter().map(|r| (r.lsn, 1)).collect();
                    for r in &records {
                        seg.hot.insert(r);
                    }
                    seg.durable.extend(records);
                    let (ready, linked) = seg.seg.on_durable(&lsns);
                    linked.expect("no fork");
                    let scl = seg.seg.scl();
                    for request in ready {
                        self.send(false, node, request, Message::AppendAck { volume: 1, pg, scl });
                    }
                }
            }
            Event::Reconnect { node } => {
                if self.nodes[node].up && !self.partitioned[node] && !self.conn[node].1 {
                    self.conn[node].1 = true;
                    self.core.node_up(node as u64 + 1);
                }
            }
            Event::Tick => {
                self.core.tick(self.now);
                if self.faults {
                    self.faults_step();
                }
                self.schedule(TICK_US, Event::Tick);
            }
            Event::Client => self.client_step(),
        }
        self.drain_outputs();
        self.check();
        true
    }

    fn node_handles(&mut self, node: usize, request: u64, msg: Message) {
        let reply = match msg {
            Message::Append { pg, epoch, records, .. } => {
                let Some(seg) = self.nodes[node].segments.get_mut(&pg) else {
                    return self.send(false, node, request, Message::error(ErrorCode::UnknownSegment, 0, "?"));
                };
                if let Err(e) = seg.seg.check_epoch(epoch) {
                    return self.send(
                        false,
                        node,
                        request,
                        Message::error(ErrorCode::StaleEpoch, 1, e.to_string()),
                    );
                }
                let batch: Vec<(RedoRecord, Vec<u8>)> = records
                    .into_iter()
                    .map(|r| {
                        let e = r.encode();
                        (r, e)
                    })
                    .collect();
                let admitted = match seg.seg.admit(&batch) {
                    Ok(a) => a,
                    Err(e) => {
                        return self.send(
                            false,
                            node,
                            request,
                            Message::error(ErrorCode::Overloaded, 0, e.to_string()),
                        );
                    }
                };
                let mut waits = admitted.waits_for;
                let new: Vec<RedoRecord> = admitted.new.iter().map(|&i| batch[i].0.clone()).collect();
                waits.extend(new.iter().map(|r| r.lsn));
                let scl = seg.seg.scl();
                let ready = seg.seg.defer_ack(waits, request);
                if !new.is_empty() {
                    let w = self.write_next;
                    self.write_next += 1;
                    self.writes.insert(w, new);
                    let d = self.rng.u64(100..3_000);
                    let incarnation = self.nodes[node].incarnation;
                    self.schedule(
                        d,
                        Event::Durable {
                            node,
                            incarnation,
                            pg,
                            write: w,
                        },
                    );
                }
                match ready {
                    Some(_) => Message::AppendAck { volume: 1, pg, scl },
                    None => return,
                }
            }
            Message::GetPage {
                pg, page, read_point, ..
            } => match self.nodes[node].segments.get(&pg) {
                None => Message::error(ErrorCode::UnknownSegment, 0, "?"),
                Some(seg) if read_point > seg.seg.scl() => Message::error(ErrorCode::ReadPointAboveScl, 0, "behind"),
                Some(seg) => {
                    let (bytes, lsn) = seg.hot.page_at(page, read_point, None, PAGE_BYTES).expect("page");
                    Message::Page {
                        volume: 1,
                        pg,
                        page,
                        lsn,
                        bytes,
                    }
                }
            },
            Message::SetPgmrpl { pg, lsn, .. } => Message::PgmrplOk {
                volume: 1,
                pg,
                pgmrpl: lsn,
            },
            other => panic!("unexpected request {other:?}"),
        };
        self.send(false, node, request, reply);
    }

    fn faults_step(&mut self) {
        let r = self.rng.u32(..1000);
        let node = self.rng.usize(..NODES);
        let down = self.nodes.iter().filter(|n| !n.up).count() + self.partitioned.iter().filter(|&&p| p).count();
        match r {
            // Crash (at most 3 nodes out at once: commits may stall, and resume).
            0..8 if self.nodes[node].up && down < 3 => self.crash(node),
            8..40 if !self.nodes[node].up => {
                self.nodes[node].up = true;
                let d = self.rng.u64(0..20_000);
                self.schedule(d, Event::Reconnect { node });
            }
            40..46 if !self.partitioned[node] && down < 3 => {
                self.partitioned[node] = true;
                self.drop_connection(node);
            }
            46..80 if self.partitioned[node] => {
                self.partitioned[node] = false;
                self.schedule(1_000, Event::Reconnect { node });
            }
            // A connection drops and comes back.
            80..90 => {
                self.drop_connection(node);
                self.schedule(2_000, Event::Reconnect { node });
            }
            _ => {}
        }
    }

    fn client_step(&mut self) {
        if self.rng.u32(..4) == 0 {
            let token = self.next_token;
            self.next_token += 1;
            let page = self.rng.u64(..PG_PAGES * u64::from(PGS));
            if self.core.read(token, page).is_ok() {
                self.reads.insert(token, page);
            }
            return;
        }
        if !self.core.accepting() {
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let n = self.rng.usize(1..=4);
        let mut writes = Vec::new();
        for _ in 0..n {
            let page = self.rng.u64(..PG_PAGES * u64::from(PGS));
            let fill = self.rng.u8(..);
            if self.rng.u32(..5) == 0 {
                let mut bytes = vec![fill; PAGE_BYTES];
                bytes[..8].copy_from_slice(&token.to_le_bytes());
                writes.push(PageWrite::Image { page, bytes });
            } else {
                let len = self.rng.usize(1..64);
                let offset = self.rng.u32(..(PAGE_BYTES - len) as u32);
                let mut bytes = vec![fill; len];
                bytes[0] = token as u8;
                writes.push(PageWrite::Range { page, offset, bytes });
            }
        }
        self.core.submit(token, writes.clone()).expect("submit");
        self.txns.insert(token, writes);
    }

    fn drain_outputs(&mut self) {
        let mut out = Vec::new();
        self.core.take_outputs(&mut out);
        for o in out {
            match o {
                Output::Append {
                    node,
                    request,
                    pg,
                    epoch,
                    records,
                } => {
                    let records = records
                        .iter()
                        .map(|r| RedoRecord::decode(&r.bytes).expect("core encodes valid records"))
                        .collect();
                    let msg = Message::Append {
                        volume: 1,
                        epoch,
                        pg,
                        page_bytes: PAGE_BYTES as u32,
                        pg_pages: PG_PAGES,
                        records,
                    };
                    self.send(true, node as usize - 1, request, msg);
                }
                Output::Request { node, request, message } => self.send(true, node as usize - 1, request, message),
                Output::Committed { token, lsn } => {
                    assert!(self.txns.contains_key(&token), "commit of an unknown transaction");
                    assert!(lsn <= self.core.vdl(), "commit {lsn} acknowledged above the VDL");
                    if let Some(&(last, _)) = self.committed.last() {
                        assert!(lsn > last, "commits out of order");
                    }
                    self.committed.push((lsn, token));
                    self.cpls.insert(lsn);
                }
                Output::ReadDone { token, page } => {
                    let p = self.reads.remove(&token).expect("read");
                    let (want, want_lsn) = self.model_page(p, page.read_point);
                    assert!(page.read_point <= self.core.vdl());
                    assert_eq!(page.lsn, want_lsn, "page {p} at read point {}: LSN", page.read_point);
                    assert!(
                        page.bytes == want,
                        "page {p} at read point {}: content",
                        page.read_point
                    );
                    self.reads_checked += 1;
                }
                Output::Fenced { .. } => panic!("fenced with a single writer"),
            }
        }
    }

    /// The model's page at read point `r`: every committed transaction
    /// with CPL <= r applied in order; and the LSN of its last change.
    fn model_page(&self, page: u64, r: u64) -> (Vec<u8>, u64) {
        let mut bytes = vec![0; PAGE_BYTES];
        let mut lsn = 0;
        for &(cpl, token) in &self.committed {
            if cpl > r {
                break;
            }
            let writes = &self.txns[&token];
            let first = cpl + 1 - writes.len() as u64;
            for (i, w) in writes.iter().enumerate() {
                if w.page() != page {
                    continue;
                }
                let body = match w {
                    PageWrite::Image { bytes, .. } => RecordBody::PageImage(bytes.clone()),
                    PageWrite::Range { offset, bytes, .. } => RecordBody::PageDelta {
                        offset: *offset,
                        bytes: bytes.clone(),
                    },
                };
                apply(&mut bytes, &body).expect("apply");
                lsn = first + i as u64;
            }
        }
        (bytes, lsn)
    }

    fn check(&mut self) {
        let vdl = self.core.vdl();
        assert!(vdl >= self.last_vdl, "VDL went back from {} to {vdl}", self.last_vdl);
        assert!(vdl == 0 || self.cpls.contains(&vdl), "VDL {vdl} is not a CPL");
        self.last_vdl = vdl;
        // Every acknowledged record is durable on 4 segments of its PG.
        // (Checked on the last committed record of each PG: SCLs cover chains.)
        for pg in 0..PGS {
            let tail = self.committed_tail(pg);
            if tail == 0 {
                continue;
            }
            let holding = self.placement[pg as usize]
                .iter()
                .filter(|&&n| self.nodes[n as usize - 1].segments[&pg].seg.scl() >= tail)
                .count();
            assert!(
                holding >= 4,
                "PG {pg}: committed LSN {tail} durable on only {holding} segments"
            );
        }
    }

    /// The last LSN of PG `pg` among committed transactions (cached scan from the end).
    fn committed_tail(&self, pg: u32) -> u64 {
        for &(cpl, token) in self.committed.iter().rev() {
            let writes = &self.txns[&token];
            let first = cpl + 1 - writes.len() as u64;
            for (i, w) in writes.iter().enumerate().rev() {
                if w.page() / PG_PAGES == u64::from(pg) {
                    return first + i as u64;
                }
            }
        }
        0
    }

    fn run(&mut self, txns: u64) {
        let mut submitted = 0;
        while submitted < txns {
            if self.rng.u32(..3) == 0 {
                let d = self.rng.u64(0..500);
                self.schedule(d, Event::Client);
                submitted += 1;
            }
            if !self.step() {
                break;
            }
        }
        // Heal: every node up and connected, no more faults.
        self.faults = false;
        for node in 0..NODES {
            self.nodes[node].up = true;
            self.partitioned[node] = false;
            self.schedule(1_000, Event::Reconnect { node });
        }
        let deadline = self.now + 60_000_000;
        while (self.core.uncommitted_txns() > 0 || self.core.waiting_txns() > 0 || !self.reads.is_empty())
            && self.now < deadline
        {
            assert!(self.step(), "no events left");
        }
        assert_eq!(
            self.core.uncommitted_txns(),
            0,
            "transactions never committed after healing"
        );
        assert!(self.reads.is_empty(), "reads never answered after healing");
        // Records are held until all 6 segments have them (the memory bound
        // is not reached here), so after healing every segment catches up.
        while self.now < deadline {
            let behind = (0..PGS).any(|pg| {
                let tail = self.committed_tail(pg);
                self.placement[pg as usize]
                    .iter()
                    .any(|&n| self.nodes[n as usize - 1].segments[&pg].seg.scl() < tail)
            });
            if !behind {
                break;
            }
            assert!(self.step(), "no events left");
        }
        assert!(self.now < deadline, "a segment never caught up after healing");
        // Every page, through computed and straight from a caught-up segment.
        let vdl = self.core.vdl();
        for page in 0..PG_PAGES * u64::from(PGS) {
            let token = self.next_token;
            self.next_token += 1;
            self.core.read(token, page).expect("read");
            self.reads.insert(token, page);
            let pg = (page / PG_PAGES) as u32;
            let tail = self.committed_tail(pg).min(vdl);
            let (want, _) = self.model_page(page, vdl);
            let mut fresh = 0;
            for &n in &self.placement[pg as usize] {
                let seg = &self.nodes[n as usize - 1].segments[&pg];
                if seg.seg.scl() >= tail {
                    let (bytes, _) = seg.hot.page_at(page, tail, None, PAGE_BYTES).expect("page");
                    assert!(bytes == want, "page {page} on node {n} differs from the model");
                    fresh += 1;
                }
            }
            assert!(fresh >= 4, "page {page}: only {fresh} segments caught up");
        }
        while !self.reads.is_empty() {
            assert!(self.step(), "no events left");
        }
    }
}

fn run_seed(seed: u64, txns: u64) -> (u64, u64) {
    let result = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed);
        sim.run(txns);
        (sim.committed.len() as u64, sim.reads_checked)
    });
    match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("simulator: seed {seed} FAILED; replay with SIM_SEED={seed} cargo test -p computed --test sim");
            std::panic::resume_unwind(e)
        }
    }
}

#[test]
fn simulate() {
    let txns: u64 = std::env::var("SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        let (c, r) = run_seed(seed, txns);
        eprintln!("simulator: seed {seed}: {c} commits, {r} reads checked");
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let base = 0x5EED_0000;
    let mut total = (0, 0);
    for i in 0..seeds {
        let (c, r) = run_seed(base + i, txns);
        total.0 += c;
        total.1 += r;
    }
    eprintln!(
        "simulator: {seeds} seeds, {} commits, {} reads checked",
        total.0, total.1
    );
}

#[test]
fn the_model_agrees_with_itself() {
    // A sanity check of the harness: a simulator with no faults commits everything.
    let mut sim = Sim::new(1);
    sim.faults = false;
    sim.run(200);
    assert!(sim.committed.len() > 100);
}
