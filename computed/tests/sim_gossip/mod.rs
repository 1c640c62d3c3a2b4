//! The simulator's storage nodes running gossip repair (see the header of
//! `sim.rs`): each node's `GossipCore` fed from its segments, node-to-node
//! `Digest` and `PullRecords` over the faulty network, and pulled records
//! admitted and written as `Node::admit_pulled` does.

use storaged::gossip::{Action, Digest, GossipConfig, Local};
use storaged::proto::ErrorCode;
use storaged::record::{RedoRecord, WireRecord};
use storaged::segment::in_ranges;

use super::{Event, NODES, Sim, SimSegment, Ticket};

/// The gossip core's limits here: short intervals and timeouts for the
/// simulated network's latencies, pulls small enough that catching up takes
/// many of them.
pub(super) fn gossip_config() -> GossipConfig {
    GossipConfig {
        digest_interval_ms: 50,
        digest_stale_intervals: 4,
        pull_bytes_max: 64 * 1024,
        inflight_per_peer_max: 2,
        inflight_bytes_max: 256 * 1024,
        rate_bytes_per_s: 32 << 20,
        timeout_min_ms: 20,
        timeout_max_ms: 500,
        explore_percent: 10,
        foreground_slowdown_max: 1.5,
        hydrate_stall_ms: 30_000,
    }
}

impl SimSegment {
    /// What the segment says of itself in gossip; none without a membership
    /// (a segment whose writer never said who its peers are does not gossip).
    /// The floor is 0: the sim does not coalesce, so every record stays.
    fn digest(&self) -> Option<Digest> {
        let m = self.table.membership.as_ref()?;
        Some(Digest {
            installed_epoch: self.seg.installed_epoch(),
            membership_epoch: m.epoch,
            scl: self.seg.scl(),
            highest_lsn: self.seg.highest_lsn(),
            floor: 0,
        })
    }

    /// The gossip core's view of the segment (`Node::gossip_locals`).
    fn gossip_local(&self) -> Option<Local> {
        let m = self.table.membership.as_ref()?;
        Some(Local {
            digest: self.digest()?,
            members: m.members.iter().map(|m| m.id).collect(),
            // Holes are inclusive `lo..=hi`; the core's ranges are `(after, upto]`.
            missing: self.seg.holes().into_iter().map(|(lo, hi)| (lo - 1, hi)).collect(),
        })
    }

    /// The gate of every peer request (`Node::check_gossip_peer`): `from` is a
    /// member at our membership epoch, at that epoch, and installed the same
    /// volume epoch (`exact`) or not an older one.
    fn gossip_gate(
        &self,
        from: u64,
        installed_epoch: u64,
        membership_epoch: u64,
        exact: bool,
    ) -> Result<(), ErrorCode> {
        let Some(m) = &self.table.membership else {
            return Err(ErrorCode::NotMember);
        };
        if membership_epoch != m.epoch {
            return Err(ErrorCode::StaleMembership);
        }
        if !m.is_member(from) {
            return Err(ErrorCode::NotMember);
        }
        let ours = self.seg.installed_epoch();
        if installed_epoch < ours || (exact && installed_epoch != ours) {
            return Err(ErrorCode::StaleEpoch);
        }
        Ok(())
    }
}

/// A message between two storage nodes' gossip shells (`Digest`,
/// `PullRecords` and their answers). A request carries the asker's
/// incarnation: an answer to an incarnation that is gone is dropped.
#[derive(Debug, Clone)]
pub(super) enum Gossip {
    Digest {
        pg: u32,
        digest: Digest,
        incarnation: u64,
    },
    DigestOk {
        pg: u32,
        digest: Digest,
    },
    /// A request refused (`NotMember`, `StaleMembership`, `StaleEpoch`,
    /// `UnknownSegment`: the asker only learns that it failed).
    Refused {
        pull: Option<u64>,
    },
    Pull {
        pg: u32,
        id: u64,
        installed_epoch: u64,
        membership_epoch: u64,
        after: u64,
        max_bytes: u32,
        incarnation: u64,
    },
    Records {
        id: u64,
        records: Vec<RedoRecord>,
    },
}

/// A pull out: what the segment was when it asked.
#[derive(Debug, Clone, Copy)]
pub(super) struct PullOut {
    pg: u32,
    installed_epoch: u64,
    membership_epoch: u64,
}

impl Sim {
    /// One round of every up node's gossip shell: its segments' state to its
    /// core, and what the core asks for onto the network.
    pub(super) fn gossip_tick(&mut self) {
        let now_ms = self.now / 1_000;
        for node in 0..NODES {
            if !self.nodes[node].up {
                continue;
            }
            let n = &mut self.nodes[node];
            for (&pg, s) in &n.segments {
                match s.gossip_local() {
                    Some(local) => n.gossip.set_local(pg, local),
                    None => n.gossip.remove_local(pg),
                }
            }
            for action in n.gossip.poll(now_ms) {
                self.gossip_act(node, action);
            }
        }
    }

    fn gossip_act(&mut self, node: usize, action: Action) {
        let n = &mut self.nodes[node];
        let incarnation = n.incarnation;
        match action {
            Action::SendDigest { pg, to } => {
                let Some(digest) = n.segments.get(&pg).and_then(SimSegment::digest) else {
                    return;
                };
                let msg = Gossip::Digest {
                    pg,
                    digest,
                    incarnation,
                };
                self.gossip_send(node, to as usize - 1, None, msg);
            }
            Action::Pull {
                id,
                pg,
                to,
                after,
                max_bytes,
            } => {
                let Some(digest) = n.segments.get(&pg).and_then(SimSegment::digest) else {
                    return n.gossip.on_failed(self.now / 1_000, id);
                };
                n.pulls.insert(
                    id,
                    PullOut {
                        pg,
                        installed_epoch: digest.installed_epoch,
                        membership_epoch: digest.membership_epoch,
                    },
                );
                let msg = Gossip::Pull {
                    pg,
                    id,
                    installed_epoch: digest.installed_epoch,
                    membership_epoch: digest.membership_epoch,
                    after,
                    max_bytes,
                    incarnation,
                };
                self.gossip_send(node, to as usize - 1, None, msg);
            }
            // Every floor is 0 (nothing is coalesced), so some peer always
            // serves the records: the core has no reason to hydrate.
            Action::Hydrate { pg, from, at, .. } => {
                panic!(
                    "node {} pg {pg}: hydration from node {from} at {at}, with no floor anywhere",
                    node + 1
                )
            }
            Action::Abandon { id } => {
                n.pulls.remove(&id);
            }
        }
    }

    /// A gossip message from `from` to `to`, over the faulty network: delayed
    /// (so reordered), now and then lost or delivered twice, never across a
    /// partition. Each request and answer stands alone: a lost one costs the
    /// asker its core's timeout.
    fn gossip_send(&mut self, from: usize, to: usize, incarnation: Option<u64>, msg: Gossip) {
        let copies = if !self.faults {
            1
        } else if self.cut[from][to] {
            0
        } else {
            match self.rng.u32(..1000) {
                0..10 => 0,
                10..15 => 2,
                _ => 1,
            }
        };
        for _ in 0..copies {
            let m = self.msg_next;
            self.msg_next += 1;
            self.gossip_msgs.insert(m, msg.clone());
            let d = self.latency();
            self.schedule(
                d,
                Event::Gossip {
                    from,
                    to,
                    incarnation,
                    msg: m,
                },
            );
        }
    }

    /// Node `to` takes a gossip message from `from`, as its shell and the
    /// node's gossip side (`peer_digest`, `pull_records`, `admit_pulled`) do.
    pub(super) fn gossip_handles(&mut self, from: usize, to: usize, msg: Gossip) {
        let now_ms = self.now / 1_000;
        let from_id = from as u64 + 1;
        match msg {
            Gossip::Digest {
                pg,
                digest,
                incarnation,
            } => {
                let n = &mut self.nodes[to];
                let reply = match n.segments.get(&pg) {
                    None => Gossip::Refused { pull: None },
                    Some(s) => match s.gossip_gate(from_id, digest.installed_epoch, digest.membership_epoch, false) {
                        Err(_) => Gossip::Refused { pull: None },
                        Ok(()) => {
                            let ours = s.digest().expect("a segment that passed the gate has a membership");
                            if let Some(local) = s.gossip_local() {
                                n.gossip.set_local(pg, local);
                            }
                            let _ = n.gossip.on_digest(now_ms, pg, from_id, digest);
                            Gossip::DigestOk { pg, digest: ours }
                        }
                    },
                };
                self.gossip_send(to, from, Some(incarnation), reply);
            }
            Gossip::DigestOk { pg, digest } => {
                let _ = self.nodes[to].gossip.on_digest(now_ms, pg, from_id, digest);
            }
            Gossip::Refused { pull, .. } => {
                if let Some(id) = pull
                    && self.nodes[to].pulls.remove(&id).is_some()
                {
                    self.nodes[to].gossip.on_failed(now_ms, id);
                }
            }
            Gossip::Pull {
                pg,
                id,
                installed_epoch,
                membership_epoch,
                after,
                max_bytes,
                incarnation,
            } => {
                let reply = match self.nodes[to].segments.get(&pg) {
                    None => Gossip::Refused { pull: Some(id) },
                    Some(s) => match s.gossip_gate(from_id, installed_epoch, membership_epoch, true) {
                        Err(_) => Gossip::Refused { pull: Some(id) },
                        Ok(()) => Gossip::Records {
                            id,
                            records: s.chain_records(after, max_bytes as usize),
                        },
                    },
                };
                self.gossip_send(to, from, Some(incarnation), reply);
            }
            Gossip::Records { id, records } => {
                // An abandoned pull's answer (or a second copy) is dropped.
                if let Some(out) = self.nodes[to].pulls.remove(&id) {
                    self.admit_pulled(to, id, out, records);
                }
            }
        }
    }

    /// `Node::admit_pulled`: records a peer served, checked and written like
    /// an append at the installed epoch; the core hears when they are
    /// durable. The whole batch is refused if the segment's epochs moved
    /// since the pull (a recovery sealed it, it installed another epoch, its
    /// membership changed) or if any record lies in a range it annulled.
    fn admit_pulled(&mut self, node: usize, id: u64, out: PullOut, records: Vec<RedoRecord>) {
        let now_ms = self.now / 1_000;
        let n = &mut self.nodes[node];
        let Some(s) = n.segments.get_mut(&out.pg) else {
            return n.gossip.on_failed(now_ms, id);
        };
        let refused = s.table.membership.as_ref().map_or(0, |m| m.epoch) != out.membership_epoch
            || s.seg.installed_epoch() != out.installed_epoch
            || s.seg.epoch() != out.installed_epoch
            || records.iter().any(|r| in_ranges(s.seg.annulled(), r.lsn));
        if refused {
            return n.gossip.on_failed(now_ms, id);
        }
        let bytes: u64 = records.iter().map(|r| r.encoded_len() as u64).sum();
        let wire: Vec<WireRecord> = records.into_iter().map(WireRecord::new).collect();
        let admitted = match s.seg.admit(&wire) {
            Ok(a) => a,
            Err(_) => return n.gossip.on_failed(now_ms, id),
        };
        let mut waits = admitted.waits_for;
        let new: Vec<RedoRecord> = wire
            .into_iter()
            .filter(|r| admitted.new.contains(&r.record().lsn))
            .map(WireRecord::into_record)
            .collect();
        waits.extend(new.iter().map(|r| r.lsn));
        let ticket = Ticket {
            conn: 0,
            request: 0,
            epoch: out.installed_epoch,
            pull: Some((id, bytes)),
        };
        if s.seg.defer_ack(waits, ticket).is_some() {
            n.gossip.on_pulled(now_ms, id, bytes);
        }
        self.repaired += new.len() as u64;
        self.write(node, out.pg, new);
    }
}
