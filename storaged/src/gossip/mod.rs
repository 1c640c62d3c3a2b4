//! Gossip between the segments of a PG: which records a segment lacks, and
//! from which peer to pull them. A sans-IO core: the node's shell feeds it the
//! local segments' state, the peers' digests and the outcome of each pull, and
//! sends what [`GossipCore::poll`] returns. The same core runs in the
//! deterministic simulator.
//!
//! The rules it keeps:
//! - **Pull, never push.** A segment asks for what it lacks; a peer only
//!   answers. A peer that is slow or dead costs the puller a timeout, never
//!   memory: every pull is bounded in bytes, at most
//!   [`GossipConfig::inflight_per_peer_max`] are out to one peer, and the bytes
//!   out to all peers are bounded by [`GossipConfig::inflight_bytes_max`].
//! - **Only from a peer that can serve.** A source must be a member of the PG
//!   at the same membership epoch, have installed the same volume epoch (so
//!   both hold the same truncation ranges and no annulled record can come
//!   back), hold the chain past what is asked (its SCL), and still hold the
//!   records there (its floor is below the start of the range). Among those,
//!   the one with the lowest recent latency, with a share of exploration so a
//!   peer that got faster is noticed. A request unanswered after twice its
//!   peer's latency (clamped) is given up and asked of another.
//! - **Behind the floor, hydrate.** When the records a segment lacks were
//!   coalesced and released by every peer that could serve them, it asks one
//!   peer for the PG's page versions at that peer's floor, then pulls the
//!   chain above it.
//! - **Background yields.** Pulls spend a byte budget refilled at
//!   [`GossipConfig::rate_bytes_per_s`]; the budget shrinks by half whenever
//!   the shell reports foreground latency above its baseline by
//!   [`GossipConfig::foreground_slowdown_max`], and grows back step by step.
//!
//! What a pull brings is checked and written by the node like an append (CRC,
//! chain, epoch, annulled ranges); the core only learns that it finished, and
//! takes the segment's new state from the shell. The SCL is never the core's
//! business.

pub mod shell;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::segment::LsnRange;

pub type NodeId = u64;
pub type Pg = u32;
/// Milliseconds on the shell's monotonic clock.
pub type Millis = u64;

/// Limits and pace. Every queue and count the core keeps is bounded by one.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// How often each peer's digest is asked for.
    pub digest_interval_ms: Millis,
    /// A digest older than this many intervals is not trusted to choose a source.
    pub digest_stale_intervals: u64,
    /// Bytes one pull may bring (the peer's `max_bytes`).
    pub pull_bytes_max: u32,
    /// Pulls out to one peer at once.
    pub inflight_per_peer_max: usize,
    /// Bytes out to all peers at once (counted at each pull's `max_bytes`).
    pub inflight_bytes_max: u64,
    /// Ceiling on pulled bytes per second; 0 is no ceiling.
    pub rate_bytes_per_s: u64,
    /// A request's timeout is twice its peer's latency, clamped to these.
    pub timeout_min_ms: Millis,
    pub timeout_max_ms: Millis,
    /// Percent of choices that go to a random able peer instead of the fastest.
    pub explore_percent: u8,
    /// Foreground latency above baseline × this halves the repair rate.
    pub foreground_slowdown_max: f64,
    /// A hydration with no progress for this long is given up
    /// ([`GossipCore::on_progress`] pushes its deadline on).
    pub hydrate_stall_ms: Millis,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            digest_interval_ms: 500,
            digest_stale_intervals: 4,
            pull_bytes_max: 1 << 20,
            inflight_per_peer_max: 2,
            inflight_bytes_max: 16 << 20,
            rate_bytes_per_s: 1 << 30,
            timeout_min_ms: 200,
            timeout_max_ms: 10_000,
            explore_percent: 10,
            foreground_slowdown_max: 1.5,
            hydrate_stall_ms: 30_000,
        }
    }
}

impl GossipConfig {
    /// Refuse limits that would stop repair or let it run unbounded.
    pub fn validate(&self) -> Result<(), String> {
        if self.digest_interval_ms == 0 {
            return Err("gossip_interval_ms must be at least 1".into());
        }
        if self.pull_bytes_max < 4096 || self.pull_bytes_max as usize > crate::proto::FRAME_BYTES_MAX / 2 {
            return Err(format!(
                "repair_pull_bytes_max must be between 4096 and {}",
                crate::proto::FRAME_BYTES_MAX / 2
            ));
        }
        if self.inflight_bytes_max < u64::from(self.pull_bytes_max) {
            return Err("repair_inflight_bytes_max must be at least repair_pull_bytes_max".into());
        }
        if self.inflight_per_peer_max == 0 {
            return Err("repair_inflight_per_peer_max must be at least 1".into());
        }
        if self.timeout_max_ms < self.timeout_min_ms {
            return Err(format!(
                "repair_timeout_max_ms must be at least {}",
                self.timeout_min_ms
            ));
        }
        Ok(())
    }
}

/// What a segment says of itself in gossip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    /// The volume epoch the segment has installed (its truncation ranges are that epoch's).
    pub installed_epoch: u64,
    pub membership_epoch: u64,
    pub scl: u64,
    /// The highest LSN it holds, past gaps.
    pub highest_lsn: u64,
    /// Records at or below this LSN are coalesced into pages and released:
    /// the segment serves page versions there, not records.
    pub floor: u64,
}

/// A local segment as the shell sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub digest: Digest,
    /// The PG's members at `digest.membership_epoch` (this node among them).
    pub members: Vec<NodeId>,
    /// LSN ranges `(after, upto]` past the SCL in which the segment lacks
    /// records, lowest first; the first starts at the SCL. Empty when the
    /// segment holds its chain up to its highest LSN.
    pub missing: Vec<LsnRange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask `to` for its digest of `pg`, sending ours.
    SendDigest { pg: Pg, to: NodeId },
    /// Ask `to` for the chain of `pg` above `after`, at most `max_bytes`.
    /// Report the outcome with [`GossipCore::on_pulled`] or [`GossipCore::on_failed`]
    /// once what came back is durable (or refused).
    Pull {
        id: u64,
        pg: Pg,
        to: NodeId,
        after: u64,
        max_bytes: u32,
    },
    /// Ask `from` for the page versions of `pg` at `at`, and take them as the
    /// segment's base: its records at or below `at` are then not needed.
    Hydrate { id: u64, pg: Pg, from: NodeId, at: u64 },
    /// A request timed out: the shell drops its answer if one still comes.
    Abandon { id: u64 },
}

/// Why a peer's digest was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no local segment of PG {pg}")]
    UnknownPg { pg: Pg },
    #[error("node {from} is not a member of PG {pg} at membership epoch {epoch}")]
    NotMember { pg: Pg, from: NodeId, epoch: u64 },
    #[error("membership epoch {got} is older than this segment's {current}")]
    StaleMembership { got: u64, current: u64 },
    #[error("volume epoch {got} is older than this segment's {current}")]
    StaleEpoch { got: u64, current: u64 },
}

#[derive(Debug, Clone)]
struct PeerView {
    digest: Option<Digest>,
    heard_at: Millis,
    asked_at: Option<Millis>,
}

#[derive(Debug)]
struct SegmentState {
    local: Local,
    peers: BTreeMap<NodeId, PeerView>,
    /// No new request before this: a request of the segment failed, and
    /// what the peers said may be out of date until they are asked again
    /// (without it a refused hydration is asked again at once, for ever).
    retry_at: Millis,
    /// Donors whose hydration failed, and until when each is not asked
    /// again ([`GossipCore::donor_failed`]).
    donors_refused: BTreeMap<NodeId, DonorBackOff>,
}

/// A donor whose hydrations failed `failures` times in a row is asked
/// again no sooner than `until`, and another able donor is preferred
/// meanwhile: a donor that cannot serve (under pressure, damaged, or
/// answering out of bounds) is not asked at every digest interval while
/// others could.
#[derive(Debug, Clone, Copy)]
struct DonorBackOff {
    failures: u32,
    until: Millis,
}

/// A failed donor waits one digest interval after its first failure, and
/// twice as long after each next, up to this many intervals.
const DONOR_BACK_OFF_INTERVALS_MAX: u64 = 32;

#[derive(Debug, Clone)]
struct Request {
    pg: Pg,
    to: NodeId,
    /// The range's start this request serves (pull) or the hydration LSN.
    after: u64,
    bytes: u64,
    sent_at: Millis,
    deadline: Millis,
    hydrate: bool,
}

#[derive(Debug, Clone, Default)]
struct PeerStats {
    inflight: usize,
    /// Exponentially weighted mean latency of answered requests; None until one.
    latency_ms: Option<f64>,
}

/// Counters an operator sees (status, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GossipCounters {
    pub pulls_started: u64,
    pub pulls_done: u64,
    pub pulls_failed: u64,
    pub pulls_timed_out: u64,
    pub bytes_pulled: u64,
    pub hydrations_started: u64,
    pub hydrations_done: u64,
    pub digests_refused: u64,
}

pub struct GossipCore {
    me: NodeId,
    config: GossipConfig,
    segments: BTreeMap<Pg, SegmentState>,
    requests: BTreeMap<u64, Request>,
    peers: BTreeMap<NodeId, PeerStats>,
    next_id: u64,
    rng: u64,
    /// Byte budget: may go negative (a pull's real size is known at its end).
    budget_bytes: f64,
    budget_at: Millis,
    /// 1.0 is the configured rate; halves under foreground pressure.
    rate_factor: f64,
    foreground_baseline_us: Option<f64>,
    counters: GossipCounters,
}

/// Peers that must be heard from before a segment counts as caught up
/// ([`GossipCore::caught_up`]): a PG's six less the two failures it absorbs,
/// less the segment itself.
pub const CAUGHT_UP_PEERS_MIN: usize = 3;

/// Smallest share of the configured rate repair keeps under pressure, so a
/// segment always makes progress (16 MiB/s of the default 1 GiB/s), and the
/// step it grows back by. A sixteenth still took a third of the foreground's
/// commits/s on the test VM, whose six nodes share one disk.
const RATE_FACTOR_MIN: f64 = 1.0 / 64.0;
/// Weight of the newest sample in a peer's latency mean.
const LATENCY_WEIGHT: f64 = 0.2;

impl GossipCore {
    pub fn new(me: NodeId, config: GossipConfig, seed: u64) -> GossipCore {
        GossipCore {
            me,
            config,
            segments: BTreeMap::new(),
            requests: BTreeMap::new(),
            peers: BTreeMap::new(),
            next_id: 1,
            rng: seed | 1,
            budget_bytes: 0.0,
            budget_at: 0,
            rate_factor: 1.0,
            foreground_baseline_us: None,
            counters: GossipCounters::default(),
        }
    }

    pub fn counters(&self) -> &GossipCounters {
        &self.counters
    }

    /// The local segment of `pg` as it is now. Peers that left the
    /// membership are forgotten; their requests stay until they end.
    pub fn set_local(&mut self, pg: Pg, local: Local) {
        let me = self.me;
        let state = self.segments.entry(pg).or_insert_with(|| SegmentState {
            local: local.clone(),
            peers: BTreeMap::new(),
            retry_at: 0,
            donors_refused: BTreeMap::new(),
        });
        state.peers.retain(|id, _| local.members.contains(id));
        for &m in &local.members {
            if m != me {
                state.peers.entry(m).or_insert(PeerView {
                    digest: None,
                    heard_at: 0,
                    asked_at: None,
                });
            }
        }
        state.local = local;
    }

    /// The PGs whose local segment the core knows.
    pub fn pgs(&self) -> Vec<Pg> {
        self.segments.keys().copied().collect()
    }

    pub fn remove_local(&mut self, pg: Pg) {
        self.segments.remove(&pg);
    }

    /// An operator asks `pg` to fill its gaps now (`storctl repair --pg`):
    /// every peer's digest is due at the next poll, and what the segment
    /// waited out (a failed request's back-off, failed donors') is let go,
    /// so it pulls or hydrates as soon as the digests are back. Returns
    /// whether the segment is known.
    pub fn fill_now(&mut self, pg: Pg) -> bool {
        let Some(state) = self.segments.get_mut(&pg) else {
            return false;
        };
        state.retry_at = 0;
        state.donors_refused.clear();
        for view in state.peers.values_mut() {
            view.asked_at = None;
        }
        true
    }

    /// Our digest of `pg`, to send with a request or as a reply.
    pub fn digest(&self, pg: Pg) -> Option<Digest> {
        self.segments.get(&pg).map(|s| s.local.digest)
    }

    /// A peer's digest arrived (its request or its reply). Refused when the
    /// peer is not a member at our membership epoch or its epochs are stale;
    /// the shell answers a refused request with the reason.
    pub fn on_digest(&mut self, now: Millis, pg: Pg, from: NodeId, digest: Digest) -> Result<(), Refusal> {
        let result = self.take_digest(now, pg, from, digest);
        if result.is_err() {
            self.counters.digests_refused += 1;
        }
        result
    }

    fn take_digest(&mut self, now: Millis, pg: Pg, from: NodeId, digest: Digest) -> Result<(), Refusal> {
        let state = self.segments.get_mut(&pg).ok_or(Refusal::UnknownPg { pg })?;
        let ours = state.local.digest;
        if digest.membership_epoch < ours.membership_epoch {
            return Err(Refusal::StaleMembership {
                got: digest.membership_epoch,
                current: ours.membership_epoch,
            });
        }
        if digest.installed_epoch < ours.installed_epoch {
            return Err(Refusal::StaleEpoch {
                got: digest.installed_epoch,
                current: ours.installed_epoch,
            });
        }
        let Some(view) = state.peers.get_mut(&from) else {
            return Err(Refusal::NotMember {
                pg,
                from,
                epoch: ours.membership_epoch,
            });
        };
        view.digest = Some(digest);
        view.heard_at = now;
        Ok(())
    }

    /// A pull's records are durable (or were all held already): `bytes` came.
    pub fn on_pulled(&mut self, now: Millis, id: u64, bytes: u64) {
        if let Some(r) = self.finish(now, id, true) {
            if !r.hydrate {
                // The pull was charged its `max_bytes` when it started; a
                // hydration was charged (and counted) batch by batch as
                // its progress came.
                self.budget_bytes += r.bytes as f64 - bytes as f64;
                self.counters.bytes_pulled += bytes;
            }
            if r.hydrate {
                self.counters.hydrations_done += 1;
                if let Some(state) = self.segments.get_mut(&r.pg) {
                    state.donors_refused.remove(&r.to);
                }
            } else {
                self.counters.pulls_done += 1;
            }
        }
    }

    /// A hydration is still moving: `bytes` more came from its donor. Its
    /// deadline moves on; a donor that stops sending is given up.
    pub fn on_progress(&mut self, now: Millis, id: u64, bytes: u64) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.deadline = now + self.config.hydrate_stall_ms;
            self.budget_bytes -= bytes as f64;
            self.counters.bytes_pulled += bytes;
        }
    }

    /// A request failed: an error answer, a refused batch, a lost connection.
    pub fn on_failed(&mut self, now: Millis, id: u64) {
        if let Some(r) = self.finish(now, id, false) {
            if !r.hydrate {
                self.budget_bytes += r.bytes as f64;
            }
            self.counters.pulls_failed += 1;
            self.back_off(now, r.pg);
            if r.hydrate {
                self.donor_failed(now, r.pg, r.to);
            }
        }
    }

    /// A hydration from `donor` failed or stalled: it is not asked again
    /// for one digest interval, doubled with each failure in a row (up to
    /// [`DONOR_BACK_OFF_INTERVALS_MAX`]); other donors go first meanwhile.
    fn donor_failed(&mut self, now: Millis, pg: Pg, donor: NodeId) {
        let interval = self.config.digest_interval_ms;
        if let Some(state) = self.segments.get_mut(&pg) {
            let b = state
                .donors_refused
                .entry(donor)
                .or_insert(DonorBackOff { failures: 0, until: 0 });
            b.failures = b.failures.saturating_add(1);
            let intervals = 1u64
                .checked_shl(b.failures - 1)
                .unwrap_or(u64::MAX)
                .min(DONOR_BACK_OFF_INTERVALS_MAX);
            b.until = now.saturating_add(interval.saturating_mul(intervals));
        }
    }

    /// A refused or failed request may mean the peers' digests are out of
    /// date: the segment asks nothing more for one digest interval.
    fn back_off(&mut self, now: Millis, pg: Pg) {
        if let Some(state) = self.segments.get_mut(&pg) {
            state.retry_at = now + self.config.digest_interval_ms;
        }
    }

    fn finish(&mut self, now: Millis, id: u64, answered: bool) -> Option<Request> {
        let r = self.requests.remove(&id)?;
        let peer = self.peers.entry(r.to).or_default();
        peer.inflight -= 1;
        if answered && !r.hydrate {
            let sample = now.saturating_sub(r.sent_at) as f64;
            peer.latency_ms = Some(match peer.latency_ms {
                Some(l) => l + LATENCY_WEIGHT * (sample - l),
                None => sample,
            });
        }
        Some(r)
    }

    /// The foreground's recent latency (e.g. the append p99 over the last
    /// second). Repair halves its rate when it is well above the lowest seen,
    /// and grows back by a sixty-fourth of the configured rate otherwise.
    ///
    /// The lowest seen is what the foreground takes without repair: it is
    /// first taken while no request is in flight. A node that starts
    /// repairing at once (back after a crash, a new disk) has seen the
    /// foreground only under its own repair, so until it has a baseline
    /// it counts the foreground as slowed, and yields.
    pub fn observe_foreground(&mut self, latency_us: f64) {
        let repairing = !self.requests.is_empty();
        let baseline = match self.foreground_baseline_us {
            Some(b) if b <= latency_us => Some(b),
            Some(_) => Some(latency_us),
            None if repairing => None,
            None => Some(latency_us),
        };
        self.foreground_baseline_us = baseline;
        let slowed = baseline.is_none_or(|b| latency_us > b * self.config.foreground_slowdown_max);
        if slowed {
            self.rate_factor = (self.rate_factor / 2.0).max(RATE_FACTOR_MIN);
        } else {
            self.rate_factor = (self.rate_factor + RATE_FACTOR_MIN).min(1.0);
        }
    }

    /// No foreground append since the last sample: nothing to yield to,
    /// so the rate grows back as it does under a foreground that is fast.
    pub fn observe_no_foreground(&mut self) {
        self.rate_factor = (self.rate_factor + RATE_FACTOR_MIN).min(1.0);
    }

    /// The share of the configured rate repair may use now.
    pub fn rate_factor(&self) -> f64 {
        self.rate_factor
    }

    /// Whether a hydration under way may fetch its next batch: the byte
    /// budget (refilled at the rate, halved under foreground pressure, and
    /// charged each batch by [`GossipCore::on_progress`]) is not spent. A
    /// hydration is one long request whose size is not known ahead, so it
    /// is paced batch by batch rather than charged up front like a pull.
    pub fn hydration_may_go_on(&self) -> bool {
        self.config.rate_bytes_per_s == 0 || self.budget_bytes > 0.0
    }

    /// What to send now: digests due, requests to give up, pulls and
    /// hydrations the budget allows.
    pub fn poll(&mut self, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        self.expire(now, &mut actions);
        self.refill(now);
        self.ask_digests(now, &mut actions);
        let pgs: Vec<Pg> = self.segments.keys().copied().collect();
        for pg in pgs {
            self.plan(now, pg, &mut actions);
        }
        actions
    }

    fn expire(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let late: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            if let Some(r) = self.finish(now, id, false) {
                // A timeout says the peer is at least this slow.
                let peer = self.peers.entry(r.to).or_default();
                let waited = now.saturating_sub(r.sent_at) as f64;
                peer.latency_ms = Some(peer.latency_ms.map_or(waited, |l| l.max(waited)));
                // A slow peer, not a stale view: another is asked at once.
                self.counters.pulls_timed_out += 1;
                if r.hydrate {
                    self.donor_failed(now, r.pg, r.to);
                }
                actions.push(Action::Abandon { id });
            }
        }
    }

    fn refill(&mut self, now: Millis) {
        let rate = self.config.rate_bytes_per_s as f64 * self.rate_factor;
        let elapsed_s = now.saturating_sub(self.budget_at) as f64 / 1000.0;
        self.budget_at = now;
        if self.config.rate_bytes_per_s == 0 {
            self.budget_bytes = f64::INFINITY;
            return;
        }
        // At most one second's worth (or one pull, if more) is saved up, so
        // an idle spell is not followed by a burst.
        let cap = rate.max(f64::from(self.config.pull_bytes_max));
        self.budget_bytes = (self.budget_bytes + rate * elapsed_s).min(cap);
    }

    fn ask_digests(&mut self, now: Millis, actions: &mut Vec<Action>) {
        let interval = self.config.digest_interval_ms;
        for (&pg, state) in self.segments.iter_mut() {
            for (&peer, view) in state.peers.iter_mut() {
                let due = match view.asked_at {
                    Some(at) => now >= at + interval,
                    None => true,
                };
                if due {
                    view.asked_at = Some(now);
                    actions.push(Action::SendDigest { pg, to: peer });
                }
            }
        }
    }

    fn inflight_bytes(&self) -> u64 {
        self.requests.values().map(|r| r.bytes).sum()
    }

    fn plan(&mut self, now: Millis, pg: Pg, actions: &mut Vec<Action>) {
        let Some(state) = self.segments.get(&pg) else { return };
        if now < state.retry_at {
            return;
        }
        let ours = state.local.digest;
        let fresh_after = now.saturating_sub(self.config.digest_interval_ms * self.config.digest_stale_intervals);
        // Peers whose word we take: same epochs, heard from lately.
        let able: Vec<(NodeId, Digest)> = state
            .peers
            .iter()
            .filter_map(|(&id, v)| v.digest.map(|d| (id, d, v.heard_at)))
            .filter(|&(_, d, heard)| {
                heard >= fresh_after
                    && d.installed_epoch == ours.installed_epoch
                    && d.membership_epoch == ours.membership_epoch
            })
            .map(|(id, d, _)| (id, d))
            .collect();
        let target = able.iter().map(|(_, d)| d.scl).max().unwrap_or(0);
        if target <= ours.scl {
            return;
        }
        if self.requests.values().any(|r| r.pg == pg && r.hydrate) {
            return;
        }
        // The ranges to fill: the known holes, then the tail up to the target.
        let mut wanted: Vec<LsnRange> = state
            .local
            .missing
            .iter()
            .copied()
            .filter(|&(after, _)| after < target)
            .collect();
        let tail_from = ours.highest_lsn.max(ours.scl);
        if target > tail_from && wanted.last().is_none_or(|&(_, upto)| upto < target) {
            wanted.push((tail_from, target));
        }
        if wanted.is_empty() {
            wanted.push((ours.scl, target));
        }

        // Every able peer released what we lack first: hydrate from the one
        // that needs the least chain on top (the highest floor at or below its SCL).
        let first_after = wanted[0].0;
        let can_serve_first = able.iter().any(|(_, d)| d.floor <= first_after && d.scl > first_after);
        if !can_serve_first {
            // Donors backing off after a failure wait their turn.
            let donors: Vec<(NodeId, Digest)> = (able.iter().copied())
                .filter(|(_, d)| d.floor > first_after)
                .filter(|(id, _)| state.donors_refused.get(id).is_none_or(|b| b.until <= now))
                .collect();
            // One that never failed goes before one whose back-off ended.
            let unrefused: Vec<(NodeId, Digest)> = (donors.iter().copied())
                .filter(|(id, _)| !state.donors_refused.contains_key(id))
                .collect();
            let donors = if unrefused.is_empty() { donors } else { unrefused };
            if let Some(from) = self.choose(now, &donors) {
                let at = donors
                    .iter()
                    .find(|(id, _)| *id == from)
                    .map(|(_, d)| d.floor)
                    .unwrap_or(0);
                let id = self.start(now, pg, from, at, u64::from(self.config.pull_bytes_max), true);
                self.counters.hydrations_started += 1;
                actions.push(Action::Hydrate { id, pg, from, at });
            }
            return;
        }

        for (after, upto) in wanted {
            if self
                .requests
                .values()
                .any(|r| r.pg == pg && !r.hydrate && r.after == after)
            {
                continue;
            }
            let max_bytes = self.config.pull_bytes_max;
            if self.budget_bytes < f64::from(max_bytes) {
                return;
            }
            if self.inflight_bytes() + u64::from(max_bytes) > self.config.inflight_bytes_max {
                return;
            }
            // A source holds records from `after` on and has the chain at
            // least one record further; one that reaches `upto` is best,
            // but any that can move us is taken.
            let mut sources: Vec<(NodeId, Digest)> = able
                .iter()
                .copied()
                .filter(|(_, d)| d.floor <= after && d.scl >= upto)
                .collect();
            if sources.is_empty() {
                sources = able
                    .iter()
                    .copied()
                    .filter(|(_, d)| d.floor <= after && d.scl > after)
                    .collect();
            }
            let Some(to) = self.choose(now, &sources) else { continue };
            let id = self.start(now, pg, to, after, u64::from(max_bytes), false);
            self.budget_bytes -= f64::from(max_bytes);
            self.counters.pulls_started += 1;
            actions.push(Action::Pull {
                id,
                pg,
                to,
                after,
                max_bytes,
            });
        }
    }

    /// The peer to ask among `candidates`: one below its in-flight limit,
    /// the fastest known (a peer never measured counts as fastest, so each
    /// is tried), or a random one `explore_percent` of the time.
    fn choose(&mut self, _now: Millis, candidates: &[(NodeId, Digest)]) -> Option<NodeId> {
        let limit = self.config.inflight_per_peer_max;
        let open: Vec<NodeId> = candidates
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.peers.get(id).is_none_or(|p| p.inflight < limit))
            .collect();
        if open.is_empty() {
            return None;
        }
        if self.random_below(100) < u64::from(self.config.explore_percent) {
            let i = self.random_below(open.len() as u64) as usize;
            return Some(open[i]);
        }
        let latency = |id: &NodeId| self.peers.get(id).and_then(|p| p.latency_ms).unwrap_or(0.0);
        let mut best = open[0];
        for id in &open[1..] {
            if latency(id) < latency(&best) {
                best = *id;
            }
        }
        Some(best)
    }

    fn start(&mut self, now: Millis, pg: Pg, to: NodeId, after: u64, bytes: u64, hydrate: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let peer = self.peers.entry(to).or_default();
        peer.inflight += 1;
        let timeout = match (hydrate, peer.latency_ms) {
            (true, _) => self.config.hydrate_stall_ms,
            (false, Some(l)) => ((2.0 * l) as Millis).clamp(self.config.timeout_min_ms, self.config.timeout_max_ms),
            (false, None) => self.config.timeout_max_ms,
        };
        self.requests.insert(
            id,
            Request {
                pg,
                to,
                after,
                bytes,
                sent_at: now,
                deadline: now + timeout,
                hydrate,
            },
        );
        id
    }

    /// xorshift64: deterministic for a seed, so the simulator replays.
    fn random_below(&mut self, n: u64) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        if n == 0 { 0 } else { x % n }
    }

    /// Whether the segment of `pg` holds everything its peers hold: at
    /// least [`CAUGHT_UP_PEERS_MIN`] peers heard from lately (same epochs),
    /// and its SCL at or above every one of theirs. Returns the highest of
    /// their SCLs. A segment that lost records to log damage and is caught
    /// up by this rule holds every committed record: a commit is on 4
    /// segments, so on 3 peers besides it, and at most 2 peers are unheard.
    pub fn caught_up(&self, now: Millis, pg: Pg) -> Option<u64> {
        let state = self.segments.get(&pg)?;
        let ours = state.local.digest;
        let fresh_after = now.saturating_sub(self.config.digest_interval_ms * self.config.digest_stale_intervals);
        let heard: Vec<u64> = state
            .peers
            .values()
            .filter(|v| v.heard_at >= fresh_after)
            .filter_map(|v| v.digest)
            .filter(|d| d.installed_epoch == ours.installed_epoch && d.membership_epoch == ours.membership_epoch)
            .map(|d| d.scl)
            .collect();
        let best = heard.iter().copied().max()?;
        (heard.len() >= CAUGHT_UP_PEERS_MIN && ours.scl >= best).then_some(best)
    }

    /// Requests out now (for status).
    pub fn inflight(&self) -> usize {
        self.requests.len()
    }
}
