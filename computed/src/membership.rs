//! Membership changes of a PG, as the writer runs them: replacing a segment
//! without a consensus service (docs/computed.md, "Membership changes").
//!
//! A PG's membership is a set of six nodes at a membership epoch, or, while
//! a segment moves, a dual one: an old set and a new set of six, each named
//! by a mask over up to eight members (`storaged::membership`). Replacing F
//! by G in ABCDEF goes ABCDEF → (ABCDEF | ABCDEG) → ABCDEG, each step one
//! epoch up. A write counts once a write quorum (4 of 6) of *every* set
//! holds it; a read quorum is 3 of 6 of any set.
//!
//! The writer moves a PG one step at a time. A step is *proposed*: sent to
//! every member of both memberships, and counted by both (a write needs the
//! quorums of the membership in force and of the proposed one). It comes
//! *in force* once a write quorum of every set of the membership it
//! replaces holds it. So a recovery that reads a read quorum of every set of
//! the highest membership it finds cannot miss a step in force, and a step
//! it misses was never the only rule any write was counted by.
//!
//! The old set never changes during a change: a second failure while G
//! hydrates (say E) becomes (ABCDEF | ABCDGH), one epoch up; an abort
//! becomes ABCDEF again, one epoch up. Nothing of F is let go of before the
//! final membership is in force.
//!
//! Pure functions here; the writer core ([`crate::core`]) keeps the state.

use std::net::SocketAddr;

pub use storaged::membership::{MEMBERS_MAX, Member, Membership, SEGMENTS_PER_PG};

use crate::cluster::{READ_QUORUM, WRITE_QUORUM};

/// What an operator asks of a PG's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Replace member `old` (of the set being moved to) by the node `new`,
    /// which is not a member.
    Replace { old: u64, new: Member },
    /// Roll a change under way back to its old set.
    Abort,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("PG {0} is not in the volume")]
    NoSuchPg(u32),
    #[error("node {node} is not a member of PG {pg} (members: {members})")]
    NotMember { pg: u32, node: u64, members: String },
    #[error("node {node} is already a member of PG {pg}")]
    AlreadyMember { pg: u32, node: u64 },
    #[error(
        "PG {pg}: membership epoch {epoch} is still being installed on its segments; ask again once it is in force"
    )]
    Installing { pg: u32, epoch: u64 },
    #[error("PG {0} has no membership change under way to abort")]
    NothingToAbort(u32),
    #[error(
        "PG {pg}: a change already replaces {replaced} of its old set; at most {max} members fit, abort or finish it first"
    )]
    TooManyMembers { pg: u32, replaced: usize, max: usize },
    #[error("this writer no longer owns the volume (epoch {0})")]
    Fenced(u64),
}

/// Where a PG's membership stands, as the writer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgView {
    pub pg: u32,
    /// The membership writes are counted by.
    pub membership: Membership,
    /// The next step, sent and not yet in force; writes meanwhile count by both.
    pub proposed: Option<Membership>,
    /// The PG's complete LSN (by every set of both memberships).
    pub pgcl: u64,
    /// Every member of either membership.
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub addr: SocketAddr,
    /// The writer has a connection to its node.
    pub up: bool,
    pub scl: u64,
    /// Highest membership epoch the segment said it holds (0: not yet).
    pub told_epoch: u64,
    /// Why its node last refused to take the membership, until it takes it.
    pub refused: Option<String>,
}

impl PgView {
    /// A change is under way: a dual membership in force or any step proposed.
    pub fn changing(&self) -> bool {
        self.membership.is_changing() || self.proposed.is_some()
    }
}

/// Member ids of each set of `m` (one set when it is not changing).
pub fn sets(m: &Membership) -> Vec<Vec<u64>> {
    let set = |mask: u8| -> Vec<u64> {
        m.members
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, x)| x.id)
            .collect()
    };
    if m.is_changing() {
        vec![set(m.old), set(m.new)]
    } else {
        vec![set(m.old)]
    }
}

/// The highest LSN that a write quorum of every set of every membership
/// in `ms` holds, given each member's SCL (`scl_of`; 0 for one unknown).
pub fn pgcl<'a>(ms: impl IntoIterator<Item = &'a Membership>, scl_of: impl Fn(u64) -> u64) -> u64 {
    let mut low = u64::MAX;
    for m in ms {
        for set in sets(m) {
            let mut scls: Vec<u64> = set.iter().map(|&id| scl_of(id)).collect();
            scls.sort_unstable_by(|a, b| b.cmp(a));
            low = low.min(scls.get(WRITE_QUORUM - 1).copied().unwrap_or(0));
        }
    }
    if low == u64::MAX { 0 } else { low }
}

/// Whether a write quorum of every set of `m` satisfies `holds`.
pub fn on_write_quorum(m: &Membership, holds: impl Fn(u64) -> bool) -> bool {
    sets(m)
        .iter()
        .all(|set| set.iter().filter(|&&id| holds(id)).count() >= WRITE_QUORUM)
}

/// Whether a read quorum (3) of every set of `m` satisfies `answered`: what
/// a recovery needs of the highest membership it found.
pub fn on_read_quorum_of_every_set(m: &Membership, answered: impl Fn(u64) -> bool) -> bool {
    sets(m)
        .iter()
        .all(|set| set.iter().filter(|&&id| answered(id)).count() >= READ_QUORUM)
}

/// The next membership for `change` of PG `pg` at `current` (in force, no
/// step proposed).
pub fn plan(pg: u32, current: &Membership, change: &Change) -> Result<Membership, ChangeError> {
    let names = |m: &Membership| {
        m.members
            .iter()
            .map(|x| x.id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match change {
        Change::Abort => {
            if !current.is_changing() {
                return Err(ChangeError::NothingToAbort(pg));
            }
            Ok(only(current, current.old, current.epoch + 1))
        }
        Change::Replace { old, new } => {
            let idx = |id: u64| current.members.iter().position(|m| m.id == id);
            if idx(new.id).is_some() {
                return Err(ChangeError::AlreadyMember { pg, node: new.id });
            }
            let Some(i) = idx(*old).filter(|&i| current.new & (1 << i) != 0) else {
                return Err(ChangeError::NotMember {
                    pg,
                    node: *old,
                    members: names(current),
                });
            };
            // Keep the old set's members and the new set's, drop `old`
            // from the new set (and from the members if it is in neither),
            // add `new` to the new set.
            let mut members = Vec::with_capacity(MEMBERS_MAX);
            let (mut old_mask, mut new_mask) = (0u8, 0u8);
            for (j, m) in current.members.iter().enumerate() {
                let in_old = current.old & (1 << j) != 0;
                let in_new = current.new & (1 << j) != 0 && j != i;
                if !in_old && !in_new {
                    continue;
                }
                let k = members.len();
                members.push(*m);
                old_mask |= u8::from(in_old) << k;
                new_mask |= u8::from(in_new) << k;
            }
            if members.len() >= MEMBERS_MAX {
                return Err(ChangeError::TooManyMembers {
                    pg,
                    replaced: members.len() + 1 - SEGMENTS_PER_PG,
                    max: MEMBERS_MAX,
                });
            }
            new_mask |= 1 << members.len();
            members.push(*new);
            let next = Membership {
                epoch: current.epoch + 1,
                members,
                old: old_mask,
                new: new_mask,
            };
            debug_assert!(next.check().is_ok(), "{next:?}");
            Ok(next)
        }
    }
}

/// The final step of a change in force: its new set alone, one epoch up.
pub fn finish(current: &Membership) -> Membership {
    only(current, current.new, current.epoch + 1)
}

/// The members of `m` named by `mask`, as a membership not changing.
fn only(m: &Membership, mask: u8, epoch: u64) -> Membership {
    let members = m
        .members
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, x)| *x)
        .collect();
    Membership::single(epoch, members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> Member {
        Member {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        }
    }

    fn abcdef() -> Membership {
        Membership::single(1, (1..=6).map(node).collect())
    }

    #[test]
    fn replacing_f_by_g_goes_dual_then_to_the_new_set() {
        let dual = plan(0, &abcdef(), &Change::Replace { old: 6, new: node(7) }).unwrap();
        assert_eq!(dual.epoch, 2);
        assert_eq!(sets(&dual), vec![vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 4, 5, 7]]);
        let fin = finish(&dual);
        assert_eq!(fin.epoch, 3);
        assert_eq!(sets(&fin), vec![vec![1, 2, 3, 4, 5, 7]]);
        let back = plan(0, &dual, &Change::Abort).unwrap();
        assert_eq!((back.epoch, sets(&back)), (3, vec![vec![1, 2, 3, 4, 5, 6]]));
    }

    #[test]
    fn a_second_failure_during_a_change_keeps_the_old_set() {
        let dual = plan(0, &abcdef(), &Change::Replace { old: 6, new: node(7) }).unwrap();
        let nested = plan(0, &dual, &Change::Replace { old: 5, new: node(8) }).unwrap();
        assert_eq!(sets(&nested), vec![vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 4, 7, 8]]);
        // The new member that failed is replaced in the new set and dropped.
        let redo = plan(0, &dual, &Change::Replace { old: 7, new: node(8) }).unwrap();
        assert_eq!(sets(&redo), vec![vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 4, 5, 8]]);
        assert_eq!(redo.members.len(), 7);
        assert!(matches!(
            plan(0, &nested, &Change::Replace { old: 4, new: node(9) }),
            Err(ChangeError::TooManyMembers { .. })
        ));
    }

    #[test]
    fn bad_changes_are_refused_with_what_is_wrong() {
        let m = abcdef();
        assert_eq!(plan(3, &m, &Change::Abort), Err(ChangeError::NothingToAbort(3)));
        assert_eq!(
            plan(3, &m, &Change::Replace { old: 2, new: node(4) }),
            Err(ChangeError::AlreadyMember { pg: 3, node: 4 })
        );
        assert!(matches!(
            plan(3, &m, &Change::Replace { old: 9, new: node(7) }),
            Err(ChangeError::NotMember { node: 9, .. })
        ));
        // F, still in the old set, is no longer in the new one.
        let dual = plan(0, &m, &Change::Replace { old: 6, new: node(7) }).unwrap();
        assert!(matches!(
            plan(0, &dual, &Change::Replace { old: 6, new: node(8) }),
            Err(ChangeError::NotMember { node: 6, .. })
        ));
    }

    #[test]
    fn a_dual_pgcl_needs_four_of_each_set() {
        let dual = plan(0, &abcdef(), &Change::Replace { old: 6, new: node(7) }).unwrap();
        // A..D at 10, F at 10, E and G behind: 4 of the old set, 4 of the new.
        let scl = |id: u64| match id {
            1..=4 | 6 => 10,
            _ => 0,
        };
        assert_eq!(pgcl([&dual], scl), 10);
        // Only A..C and F: 4 of the old set but 3 of the new.
        let scl = |id: u64| if matches!(id, 1..=3 | 6) { 10 } else { 0 };
        assert_eq!(pgcl([&dual], scl), 0);
        assert!(on_write_quorum(&dual, |id| id <= 4));
        assert!(!on_write_quorum(&dual, |id| id <= 3 || id == 6));
        assert!(on_read_quorum_of_every_set(&dual, |id| id <= 3));
        assert!(!on_read_quorum_of_every_set(&dual, |id| id <= 2 || id == 6));
    }
}
