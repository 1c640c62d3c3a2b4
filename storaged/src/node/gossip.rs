//! The node's side of gossip repair: the PG's membership a segment keeps,
//! what the gossip shell learns of each segment, what a peer may ask of it,
//! and how records pulled from a peer are taken.
//!
//! Pull, never push: a peer only answers, and a segment takes records only
//! as the answer to its own pull. Every peer request passes one gate
//! ([`Node::check_gossip_peer`]): the asker is a member of the PG at this
//! segment's membership epoch, holds the same membership epoch, and has
//! installed the same volume epoch (or, for a digest, not an older one), so
//! both sides hold the same truncation ranges. Pulled records then go
//! through exactly the admission and log path of an append: the same CRC,
//! chain, epoch and conflict checks, the same durable write before the SCL
//! moves. What they must not be is annulled here: a record a recovery
//! truncated never comes back, whoever serves it.

use super::{Node, NodeError, PageGeometry, SegState, SegmentStatus, chain_records};
use crate::gossip::{Digest, Local};
use crate::membership::Membership;
use crate::record::{RedoRecord, SegmentId, WireRecord};
use crate::segment::{LsnRange, SegmentError};
use crate::segtable::SegmentEntry;

impl SegState {
    /// What this segment says of itself in gossip, under `membership_epoch`.
    fn digest(&self, membership_epoch: u64) -> Digest {
        Digest {
            installed_epoch: self.seg.installed_epoch(),
            membership_epoch,
            scl: self.seg.scl(),
            highest_lsn: self.seg.highest_lsn(),
            floor: self.coalesced_lsn,
        }
    }

    /// The gate of every peer request, on the segment's state as it is
    /// under the caller's lock (see [`Node::check_gossip_peer`]).
    pub(super) fn gossip_gate(
        &self,
        id: SegmentId,
        from: u64,
        installed_epoch: u64,
        membership_epoch: u64,
        exact_installed: bool,
    ) -> Result<&Membership, NodeError> {
        let not_member = |current: u64| NodeError::NotMember {
            node: from,
            volume: id.volume,
            pg: id.pg,
            membership_epoch: current,
        };
        // A segment whose writer never said who the members are serves no one.
        let Some(m) = &self.membership else {
            return Err(not_member(0));
        };
        // Epochs first: a node added at a newer epoch learns that ours is
        // behind, not that it is a stranger.
        if membership_epoch != m.epoch {
            return Err(NodeError::StaleMembership {
                got: membership_epoch,
                current: m.epoch,
            });
        }
        if !m.is_member(from) {
            return Err(not_member(m.epoch));
        }
        let ours = self.seg.installed_epoch();
        let refused = if exact_installed {
            installed_epoch != ours
        } else {
            installed_epoch < ours
        };
        if refused {
            return Err(SegmentError::StaleEpoch {
                got: installed_epoch,
                current: ours,
            }
            .into());
        }
        Ok(m)
    }
}

impl Node {
    /// The writer sets the PG's membership on segment `id`, creating the
    /// segment (installed at `epoch`, as a first Append does) if the node
    /// does not hold it. The membership epoch only moves forward: a lower
    /// one is refused (`StaleMembership`), the same one with other members
    /// too (`MembershipConflict`), the same one again changes nothing. A
    /// volume epoch older than the segment's is refused (`StaleEpoch`); a
    /// newer one is not adopted (only a recovering writer's seal does
    /// that). Durable when it returns; returns the segment's status.
    pub async fn set_membership(
        &self,
        id: SegmentId,
        epoch: u64,
        geometry: PageGeometry,
        membership: Membership,
    ) -> Result<SegmentStatus, NodeError> {
        self.set_membership_with_ranges(id, epoch, geometry, membership, Vec::new())
            .await
    }

    /// [`Node::set_membership`], and a segment it creates takes `annulled`
    /// (the writer's truncation ranges at `epoch`) as applied: it never held
    /// a record of an older epoch, and its records come from appends at
    /// `epoch` and from peers that installed it, which hold none in them.
    /// Without them, a later recovery resending those ranges would be
    /// refused once the segment coalesced past them, and the segment could
    /// never install that recovery's epoch.
    pub async fn set_membership_with_ranges(
        &self,
        id: SegmentId,
        epoch: u64,
        geometry: PageGeometry,
        membership: Membership,
        annulled: Vec<LsnRange>,
    ) -> Result<SegmentStatus, NodeError> {
        geometry.check()?;
        membership.check()?;
        if annulled.len() > crate::segment::ANNULLED_RANGES_MAX {
            return Err(SegmentError::TooManyRanges(annulled.len()).into());
        }
        let (unchanged, rejoins) = {
            let mut st = self.state();
            let created = !st.segments.contains_key(&id);
            let s = st.seg_or_create(id, epoch, geometry, self.config.gap_records_max, "membership")?;
            if created && !annulled.is_empty() {
                s.seg
                    .restore_epochs(epoch, epoch, &crate::segment::union_ranges(annulled.into_iter()));
            }
            if epoch < s.seg.epoch() {
                return Err(SegmentError::StaleEpoch {
                    got: epoch,
                    current: s.seg.epoch(),
                }
                .into());
            }
            if let Some(held) = &s.membership {
                check_membership_change(held, &membership)?;
            }
            let rejoins = !created && membership.rejoins(self.node_id, s.membership.as_ref());
            (s.membership.as_ref() == Some(&membership), rejoins)
        };
        if unchanged {
            return self.status(id, 0);
        }
        if rejoins {
            self.forget_before_rejoining(id, membership.epoch).await?;
        }
        // The segment with its extent first, for one the table does not hold
        // yet (at the epoch it has: this request adopts none).
        let (durable, seg_epoch) = {
            let st = self.state();
            let s = st.seg(id)?;
            (s.durable_epoch.is_some(), s.seg.epoch())
        };
        if !durable {
            self.ensure_durable(id, seg_epoch).await?;
        }
        let entry = self
            .update_entry(id, |e, _| {
                let e = e.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                // Again against what the table holds, under its lock: two
                // writers' requests may have raced here.
                if let Some(held) = &e.membership {
                    check_membership_change(held, &membership)?;
                }
                Ok(SegmentEntry {
                    membership: Some(membership.clone()),
                    ..e.clone()
                })
            })
            .await?;
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            let newer = s
                .membership
                .as_ref()
                .is_none_or(|m| entry.membership.as_ref().is_some_and(|e| e.epoch > m.epoch));
            if newer {
                s.membership = entry.membership;
            }
        }
        self.status(id, 0)
    }

    /// The node comes back into segment `id`'s PG (see
    /// [`Membership::rejoins`]): the records it holds above its coalesced
    /// LSN may be of a branch a recovery annulled while it was out, which
    /// it was never told and the writer no longer names, so it drops them
    /// all and takes the chain above its floor from its peers again, as a
    /// segment that was down does. Its page versions are sound: coalescing
    /// never goes past the PGMRPL, and a record at or below one was
    /// committed, so never annulled. (Kept, the stale records would come
    /// back into the chain once the node installs the writer's epoch, be
    /// coalesced under its PGMRPL, and the writer's next record, linking
    /// below them, would never join it.) What it drops was acknowledged
    /// while it was a member before; the membership it left holds it.
    ///
    /// As a truncation does: appends wait (`Forgetting`), the records let
    /// in before are written first, an annulment in the log makes start-up
    /// drop what the log holds of them, then memory follows. It happens
    /// before the table takes the new membership: a crash between leaves
    /// the old one, and the writer tells the node again.
    async fn forget_before_rejoining(&self, id: SegmentId, membership_epoch: u64) -> Result<(), NodeError> {
        let _fencing = self.fencing.lock().await;
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            // Another telling of this membership (a re-send) did it while
            // this one waited: appends may have been taken since.
            if s.membership.as_ref().is_some_and(|m| m.epoch >= membership_epoch) {
                return Ok(());
            }
            s.forgetting = true;
        }
        let result = async {
            let waited = tokio::time::Instant::now();
            while self.state().seg(id)?.seg.writing() {
                if waited.elapsed() > super::TRUNCATE_WAIT_MAX {
                    return Err(NodeError::TruncationWaited(waited.elapsed()));
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let (scl, range) = {
                let st = self.state();
                let s = st.seg(id)?;
                (s.seg.scl(), (s.coalesced_lsn + 1, s.seg.highest_lsn()))
            };
            if range.1 < range.0 || self.state().seg(id)?.seg.records_held() == 0 {
                return Ok(());
            }
            let annulment = crate::record::Annulment {
                segment: id,
                ranges: vec![range],
            };
            self.log.append_many(vec![annulment.encode()]).await?;
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            let mut freed = 0;
            let mut dropped = 0usize;
            for (lsn, page) in s.seg.annul(&[range]) {
                freed += s.hot.remove(page, lsn);
                dropped += 1;
            }
            st.hot_bytes -= freed;
            tracing::warn!(
                volume = id.volume,
                pg = id.pg,
                membership_epoch,
                was_scl = scl,
                floor = range.0 - 1,
                dropped,
                "node rejoins the PG: dropped the records it held from before, which a recovery may have \
                 annulled meanwhile; its peers fill the chain above its floor again"
            );
            Ok(())
        }
        .await;
        if let Ok(s) = self.state().seg_mut(id) {
            s.forgetting = false;
        }
        result
    }

    /// Every segment that has a membership: (id, the gossip core's Local for
    /// it, its membership).
    pub fn gossip_locals(&self) -> Vec<(SegmentId, Local, Membership)> {
        let st = self.state();
        let mut out = Vec::new();
        for (&id, s) in &st.segments {
            let Some(m) = &s.membership else {
                continue;
            };
            // Holes are inclusive `lo..=hi`; the core's ranges are `(after, upto]`.
            let missing = s.seg.holes().into_iter().map(|(lo, hi)| (lo - 1, hi)).collect();
            let local = Local {
                digest: s.digest(m.epoch),
                members: m.members.iter().map(|m| m.id).collect(),
                missing,
            };
            out.push((id, local, m.clone()));
        }
        out
    }

    /// An operator asks segment `id` to fill its gaps now (`FillGaps`): the
    /// gossip shell takes the request at its next tick and asks every peer
    /// for its digest at once. Refused for a segment the node does not
    /// hold, or one with no membership (it knows no peers).
    pub fn fill_gaps(&self, id: SegmentId) -> Result<(), NodeError> {
        if self.state().seg(id)?.membership.is_none() {
            return Err(NodeError::NoMembership(id.volume, id.pg));
        }
        let mut requests = self.fill_requests.lock().unwrap_or_else(|e| e.into_inner());
        if !requests.contains(&id) {
            requests.push(id);
        }
        Ok(())
    }

    /// A peer `from` sends its digest of segment `id`; returns ours, if it
    /// passes the gate (its installed epoch may be newer than ours: it is
    /// ours that is behind then, and the digest tells the core so).
    pub fn peer_digest(&self, id: SegmentId, from: u64, digest: Digest) -> Result<Digest, NodeError> {
        let st = self.state();
        let s = st.seg(id)?;
        let m = s.gossip_gate(id, from, digest.installed_epoch, digest.membership_epoch, false)?;
        Ok(s.digest(m.epoch))
    }

    /// A peer `from` pulls segment `id`'s chain above `after`, up to our SCL,
    /// about `max_bytes` (at least one record if any); returns our SCL and
    /// the records. Installed epochs must be equal; `after` below our floor
    /// (the coalesced LSN) is `ReadPointBelowPgmrpl`: the puller must hydrate.
    pub fn pull_records(
        &self,
        id: SegmentId,
        from: u64,
        installed_epoch: u64,
        membership_epoch: u64,
        after: u64,
        max_bytes: usize,
    ) -> Result<(u64, Vec<RedoRecord>), NodeError> {
        let pressure = self.hold_pressure();
        let mut st = self.state();
        let pressure = pressure || self.hold_hot_pressure(st.hot_bytes);
        let s = st.seg_mut(id)?;
        s.gossip_gate(id, from, installed_epoch, membership_epoch, true)?;
        // A peer that hydrated from this segment pulls the chain above its
        // floor: coalescing here may follow it up.
        s.hold_moves_to(from, after, pressure);
        chain_records(s, after, max_bytes)
    }

    /// Records a peer served for segment `id` (pulled at our
    /// `installed_epoch` and `membership_epoch`): checked like appended ones
    /// and written through the same log; returns the SCL once they are
    /// durable. Refused, with nothing stored, if any lies in the segment's
    /// annulled ranges, if the segment is sealed by a recovering writer
    /// (its installed epoch below its epoch) or either epoch moved since
    /// the pull. Records the segment already holds are re-sends.
    pub async fn admit_pulled(
        &self,
        id: SegmentId,
        installed_epoch: u64,
        membership_epoch: u64,
        records: Vec<RedoRecord>,
    ) -> Result<u64, NodeError> {
        let geometry = {
            let st = self.state();
            let s = st.seg(id)?;
            let current = s.membership.as_ref().map_or(0, |m| m.epoch);
            if current == 0 || membership_epoch != current {
                return Err(NodeError::StaleMembership {
                    got: membership_epoch,
                    current,
                });
            }
            let (installed, epoch) = (s.seg.installed_epoch(), s.seg.epoch());
            if installed != epoch || installed_epoch != epoch {
                return Err(SegmentError::StaleEpoch {
                    got: installed_epoch,
                    current: epoch,
                }
                .into());
            }
            for r in &records {
                if let Some(&(lo, hi)) = s.seg.annulled().iter().find(|&&(lo, hi)| lo <= r.lsn && r.lsn <= hi) {
                    return Err(NodeError::PulledAnnulled { lsn: r.lsn, lo, hi });
                }
            }
            if records.is_empty() {
                return Ok(s.seg.scl());
            }
            s.geometry
        };
        // The append path checks epoch and ranges again under the lock it
        // admits under: a truncation in between seals first, and the
        // append at the old epoch is then refused.
        let records = records.into_iter().map(WireRecord::new).collect();
        self.append(id, installed_epoch, geometry, records).await
    }

    /// The membership/epoch gate of every peer request: `from` is a member at
    /// our membership epoch (`NotMember`), `membership_epoch` is ours
    /// (`StaleMembership`), `installed_epoch` equals ours (`exact_installed`)
    /// or is not older (`StaleEpoch`); an unknown segment is `UnknownSegment`.
    // The page-version requests of hydration pass this gate too.
    pub(crate) fn check_gossip_peer(
        &self,
        id: SegmentId,
        from: u64,
        installed_epoch: u64,
        membership_epoch: u64,
        exact_installed: bool,
    ) -> Result<(), NodeError> {
        let st = self.state();
        st.seg(id)?
            .gossip_gate(id, from, installed_epoch, membership_epoch, exact_installed)?;
        Ok(())
    }
}

/// A membership may replace `held` only at a higher epoch, or be the same.
fn check_membership_change(held: &Membership, next: &Membership) -> Result<(), NodeError> {
    if next.epoch < held.epoch {
        return Err(NodeError::StaleMembership {
            got: next.epoch,
            current: held.epoch,
        });
    }
    if next.epoch == held.epoch && next != held {
        return Err(NodeError::MembershipConflict(format!(
            "membership epoch {} is already set with other members; a change takes a new membership epoch",
            held.epoch
        )));
    }
    Ok(())
}

/// The gossip shell drives the node through this; its errors are reported,
/// not matched on, so they travel as text.
impl crate::gossip::shell::Store for Node {
    fn gossip_locals(&self) -> Vec<(SegmentId, Local, Membership)> {
        Node::gossip_locals(self)
    }

    fn take_fill_requests(&self) -> Vec<SegmentId> {
        std::mem::take(&mut *self.fill_requests.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn page_range(&self, id: SegmentId) -> Option<crate::gossip::shell::SegmentPages> {
        let st = self.state();
        let g = st.segments.get(&id)?.geometry;
        let first = u64::from(id.pg) * g.pg_pages;
        Some(crate::gossip::shell::SegmentPages {
            first,
            end: first + g.pg_pages,
            page_bytes: g.page_bytes,
        })
    }

    async fn admit_pulled(
        &self,
        id: SegmentId,
        installed_epoch: u64,
        membership_epoch: u64,
        records: Vec<RedoRecord>,
    ) -> Result<u64, String> {
        let (count, bytes) = (
            records.len() as u64,
            records.iter().map(|r| r.encoded_len() as u64).sum(),
        );
        let scl = Node::admit_pulled(self, id, installed_epoch, membership_epoch, records)
            .await
            .map_err(|e| e.to_string())?;
        self.counters.pulled(count, bytes);
        Ok(scl)
    }

    async fn hydrate_begin(&self, id: SegmentId) -> Result<(), String> {
        Node::hydrate_begin(self, id).await.map_err(|e| e.to_string())
    }

    async fn hydrate_pages(
        &self,
        id: SegmentId,
        versions: Vec<crate::proto::WirePageVersion>,
        pages: u64,
    ) -> Result<(), String> {
        let bytes = versions.iter().map(|v| v.bytes.len() as u64).sum();
        Node::hydrate_pages(self, id, versions)
            .await
            .map_err(|e| e.to_string())?;
        self.counters.hydrated(bytes);
        self.hydration_progress(id, bytes, pages);
        Ok(())
    }

    async fn hydrate_end(&self, id: SegmentId, floor: u64) -> Result<u64, String> {
        Node::hydrate_end(self, id, floor).await.map_err(|e| e.to_string())
    }

    fn hydrate_abort(&self, id: SegmentId) {
        Node::hydrate_abort(self, id)
    }

    fn caught_up(&self, id: SegmentId, scl: u64) {
        let mut st = self.state();
        if let Ok(s) = st.seg_mut(id)
            && s.seg.scl() >= scl
            && s.seg.clear_log_damage()
        {
            tracing::info!(
                volume = id.volume,
                pg = id.pg,
                scl,
                "the segment holds everything its peers hold: what log damage took from it is back"
            );
        }
    }

    fn foreground_latency_us(&self) -> Option<f64> {
        self.take_foreground_latency()
    }
}
