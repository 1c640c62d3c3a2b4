//! A PG's membership: which nodes hold its segments, at which membership
//! epoch. Gossip takes records only from a member, and serves only members.
//!
//! The writer sets it (on creating a segment, on sealing one); a node keeps
//! it durably in its segment table, per segment, and it only moves forward
//! by epoch. One membership can be dual while a segment is being replaced:
//! the members are the union of an old and a new set of six, each named by
//! a bit mask over `members`. While not changing, both masks are the same.
//! The fixed encoding here is the one the segment table and the wire share
//! (docs/format.md, docs/protocol.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Segments of a PG: a membership's old and new sets have this many each.
pub const SEGMENTS_PER_PG: usize = 6;
/// Members at most: the old set and the new set of a change that replaces
/// up to two segments at once.
pub const MEMBERS_MAX: usize = 8;
/// One member: node id (8), address family (1), address (16), port (2).
pub const MEMBER_BYTES: usize = 27;
/// Epoch (8), count (1), members, old mask (1), new mask (1).
pub const MEMBERSHIP_BYTES: usize = 8 + 1 + MEMBERS_MAX * MEMBER_BYTES + 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Member {
    pub id: u64,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Starts at 1 with the volume's placement; 0 is "none known".
    pub epoch: u64,
    pub members: Vec<Member>,
    /// Bit `i`: `members[i]` is in the old (current) set.
    pub old: u8,
    /// Bit `i`: `members[i]` is in the new set; equal to `old` when no
    /// change is under way.
    pub new: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("a membership has at most {MEMBERS_MAX} members, got {0}")]
    TooMany(usize),
    #[error("node {0} appears twice in the membership")]
    Duplicate(u64),
    #[error("node id 0 is not a node")]
    ZeroId,
    #[error("the {which} set has {got} members; a PG has {SEGMENTS_PER_PG}")]
    SetSize { which: &'static str, got: u32 },
    #[error("a mask names member {0}, past the members listed")]
    MaskPastMembers(usize),
    #[error("member {0} is in neither set")]
    InNeither(u64),
    #[error("membership epoch 0 is not a membership")]
    ZeroEpoch,
    #[error("bad address family {0}")]
    BadFamily(u8),
    #[error("membership body is {0} bytes, not {MEMBERSHIP_BYTES}")]
    BadLength(usize),
}

impl Membership {
    /// A membership that is not changing: `members` (six) in both sets.
    pub fn single(epoch: u64, members: Vec<Member>) -> Membership {
        let mask = mask_of(members.len());
        Membership {
            epoch,
            members,
            old: mask,
            new: mask,
        }
    }

    pub fn check(&self) -> Result<(), MembershipError> {
        if self.epoch == 0 {
            return Err(MembershipError::ZeroEpoch);
        }
        if self.members.len() > MEMBERS_MAX {
            return Err(MembershipError::TooMany(self.members.len()));
        }
        for (i, m) in self.members.iter().enumerate() {
            if m.id == 0 {
                return Err(MembershipError::ZeroId);
            }
            if self.members[..i].iter().any(|o| o.id == m.id) {
                return Err(MembershipError::Duplicate(m.id));
            }
            if (self.old | self.new) & (1 << i) == 0 {
                return Err(MembershipError::InNeither(m.id));
            }
        }
        let listed = mask_of(self.members.len());
        for mask in [self.old, self.new] {
            if mask & !listed != 0 {
                return Err(MembershipError::MaskPastMembers(
                    (mask & !listed).trailing_zeros() as usize
                ));
            }
        }
        for (which, mask) in [("old", self.old), ("new", self.new)] {
            if mask.count_ones() as usize != SEGMENTS_PER_PG {
                return Err(MembershipError::SetSize {
                    which,
                    got: mask.count_ones(),
                });
            }
        }
        Ok(())
    }

    pub fn is_member(&self, id: u64) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    pub fn is_changing(&self) -> bool {
        self.old != self.new
    }

    /// Whether `node`, taking this membership over `held` (the one its
    /// segment of the PG stored last, if any), comes back into the PG after
    /// being out of it, so that what it holds of the PG's records may be
    /// stale: it is in the new set and not in the old one (it is being
    /// added), and `held` is not the step just before this one with the
    /// node in it. While a node is in a PG's membership, a recovery's
    /// truncation range is kept until the node has applied it; once it is
    /// out, a range may be dropped without it, and it can never learn which
    /// of its records that range annulled. A node added to the change it
    /// was already joining, one step later, was a member throughout.
    pub fn rejoins(&self, node: u64, held: Option<&Membership>) -> bool {
        let continuing = held.is_some_and(|h| h.epoch + 1 == self.epoch && h.is_member(node));
        self.is_added(node) && !continuing
    }

    /// `node` is in the new set and not in the old one: the change adds it.
    /// A writer counts such a node only once it has taken this membership
    /// (taking it may make the node drop what it held: [`Self::rejoins`]).
    pub fn is_added(&self, node: u64) -> bool {
        self.members
            .iter()
            .position(|m| m.id == node)
            .is_some_and(|i| self.new & (1 << i) != 0 && self.old & (1 << i) == 0)
    }

    /// Every member but `me`.
    pub fn peers(&self, me: u64) -> impl Iterator<Item = &Member> + '_ {
        self.members.iter().filter(move |m| m.id != me)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.epoch.to_le_bytes());
        let n = self.members.len().min(MEMBERS_MAX);
        out.push(n as u8);
        for m in &self.members[..n] {
            out.extend_from_slice(&m.id.to_le_bytes());
            let (family, ip) = match m.addr.ip() {
                IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
                IpAddr::V6(v6) => (6u8, v6.octets()),
            };
            out.push(family);
            out.extend_from_slice(&ip);
            out.extend_from_slice(&m.addr.port().to_le_bytes());
        }
        out.resize(start + 8 + 1 + MEMBERS_MAX * MEMBER_BYTES, 0);
        out.push(self.old);
        out.push(self.new);
    }

    /// Decode [`MEMBERSHIP_BYTES`] bytes. All zeros is "none" (`Ok(None)`):
    /// a segment whose writer never said.
    pub fn decode(b: &[u8]) -> Result<Option<Membership>, MembershipError> {
        if b.len() != MEMBERSHIP_BYTES {
            return Err(MembershipError::BadLength(b.len()));
        }
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let epoch = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let n = usize::from(b[8]);
        if n > MEMBERS_MAX {
            return Err(MembershipError::TooMany(n));
        }
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let m = &b[9 + i * MEMBER_BYTES..9 + (i + 1) * MEMBER_BYTES];
            let id = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
            let octets: [u8; 16] = m[9..25].try_into().expect("16 bytes");
            let ip = match m[8] {
                4 => IpAddr::V4(Ipv6Addr::from(octets).to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                6 => IpAddr::V6(Ipv6Addr::from(octets)),
                other => return Err(MembershipError::BadFamily(other)),
            };
            let port = u16::from_le_bytes(m[25..27].try_into().expect("2 bytes"));
            members.push(Member {
                id,
                addr: SocketAddr::new(ip, port),
            });
        }
        let masks = 9 + MEMBERS_MAX * MEMBER_BYTES;
        let membership = Membership {
            epoch,
            members,
            old: b[masks],
            new: b[masks + 1],
        };
        membership.check()?;
        Ok(Some(membership))
    }
}

#[cfg(test)]
impl Membership {
    /// This membership at `epoch`, with member `out` replaced by node
    /// `with` (at 127.0.0.1:7000 + id) in its new set.
    pub(crate) fn replacing(&self, epoch: u64, out: u64, with: u64) -> Membership {
        let mut m = self.clone();
        m.epoch = epoch;
        let i = m.members.iter().position(|x| x.id == out).expect("a member");
        m.members.push(Member {
            id: with,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + with as u16)),
        });
        m.new = (m.new & !(1 << i)) | (1 << (m.members.len() - 1));
        m.check().expect("a membership");
        m
    }
}

fn mask_of(n: usize) -> u8 {
    if n >= 8 { u8::MAX } else { (1u8 << n) - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn six(base: u64) -> Vec<Member> {
        (base..base + 6)
            .map(|id| Member {
                id,
                addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
            })
            .collect()
    }

    #[test]
    fn a_membership_round_trips_through_its_fixed_encoding() {
        let mut m = Membership::single(3, six(1));
        m.members.push(Member {
            id: 9,
            addr: "[::1]:7009".parse().unwrap(),
        });
        m.new = (m.old & !1) | (1 << 6);
        m.check().unwrap();
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(out.len(), MEMBERSHIP_BYTES);
        assert_eq!(Membership::decode(&out).unwrap(), Some(m));
        assert_eq!(Membership::decode(&[0; MEMBERSHIP_BYTES]).unwrap(), None);
    }

    #[test]
    fn a_node_added_back_after_being_out_of_the_pg_rejoins() {
        let placed = Membership::single(1, six(1));
        // Node 7 joins in a change from the placement: whatever it holds
        // of the PG is from before.
        let adding = placed.replacing(2, 6, 7);
        assert!(adding.rejoins(7, None));
        // Members of the old set, and nodes not in it, do not.
        assert!(!adding.rejoins(1, Some(&placed)));
        assert!(!adding.rejoins(6, Some(&placed)));
        assert!(!adding.rejoins(9, None));
        // The change it joins goes on one step later (a second failure
        // replaces another member too): it was in it throughout.
        let nested = adding.replacing(3, 5, 8);
        assert!(!nested.rejoins(7, Some(&adding)));
        assert!(nested.rejoins(8, Some(&adding)));
        // Node 6 left for good (epoch 3), and is added back at epoch 5:
        // it stored the placement, two steps and more behind.
        let mut left = adding.members.clone();
        left.retain(|m| m.id != 6);
        let done = Membership::single(3, left);
        let back = done.replacing(5, 5, 6);
        assert!(back.rejoins(6, Some(&placed)));
        // The same change again after an abort: the node stored the first
        // try, two steps behind, and was out between.
        let again = Membership {
            epoch: 4,
            ..adding.clone()
        };
        assert!(again.rejoins(7, Some(&adding)));
    }

    #[test]
    fn a_broken_membership_is_refused_with_what_is_wrong() {
        let mut m = Membership::single(1, six(1));
        m.members[3].id = 2;
        assert_eq!(m.check(), Err(MembershipError::Duplicate(2)));
        let m = Membership::single(1, six(1)[..5].to_vec());
        assert!(matches!(m.check(), Err(MembershipError::SetSize { got: 5, .. })));
        let m = Membership::single(0, six(1));
        assert_eq!(m.check(), Err(MembershipError::ZeroEpoch));
        let mut bytes = Vec::new();
        Membership::single(1, six(1)).encode(&mut bytes);
        bytes[8 + 1 + 8] = 5;
        assert_eq!(Membership::decode(&bytes), Err(MembershipError::BadFamily(5)));
    }
}
