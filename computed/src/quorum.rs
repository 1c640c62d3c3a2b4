//! Quorum math: from each segment's SCL to the PG's complete LSN (PGCL), and
//! from every PG to the volume's complete LSN (VCL). Pure functions, so they
//! can be checked exhaustively against their definitions.

use crate::cluster::{SEGMENTS_PER_PG, WRITE_QUORUM};

/// The highest LSN that at least [`WRITE_QUORUM`] (4) of the 6 segments
/// have reached: the 4th-highest SCL.
pub fn pgcl(scls: &[u64; SEGMENTS_PER_PG]) -> u64 {
    let mut sorted = *scls;
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted[WRITE_QUORUM - 1]
}

/// The volume complete LSN: every record at or below it has reached its PG's
/// write quorum.
///
/// `first_below_quorum[p]` is the lowest LSN of PG `p`'s records that is above
/// that PG's PGCL (`None` when every record of the PG is at quorum);
/// `allocated_through` is the highest LSN allocated so far. Every LSN is a
/// record of exactly one PG, so the VCL is just below the lowest LSN that is
/// not yet at quorum anywhere.
pub fn vcl(first_below_quorum: impl IntoIterator<Item = Option<u64>>, allocated_through: u64) -> u64 {
    let mut vcl = allocated_through;
    for lsn in first_below_quorum.into_iter().flatten() {
        debug_assert!(lsn >= 1);
        vcl = vcl.min(lsn - 1);
    }
    vcl
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pgcl_is_the_fourth_highest() {
        assert_eq!(pgcl(&[10, 9, 8, 7, 6, 5]), 7);
        assert_eq!(pgcl(&[5, 6, 7, 8, 9, 10]), 7);
        assert_eq!(pgcl(&[10, 10, 10, 0, 0, 0]), 0, "3 segments are not a write quorum");
        assert_eq!(pgcl(&[10, 10, 10, 10, 0, 0]), 10, "2 down: still a quorum");
    }

    proptest! {
        /// PGCL is the highest x such that at least 4 segments have SCL >= x.
        #[test]
        fn pgcl_matches_its_definition(scls in prop::array::uniform6(0u64..20)) {
            let p = pgcl(&scls);
            prop_assert!(scls.iter().filter(|&&s| s >= p).count() >= WRITE_QUORUM);
            prop_assert!(scls.iter().filter(|&&s| s > p).count() < WRITE_QUORUM);
        }

        /// Raising any one SCL never lowers the PGCL.
        #[test]
        fn pgcl_is_monotonic(scls in prop::array::uniform6(0u64..20), i in 0usize..6, up in 0u64..10) {
            let mut raised = scls;
            raised[i] += up;
            prop_assert!(pgcl(&raised) >= pgcl(&scls));
        }

        /// VCL against a model: records (LSN 1..=n) spread over PGs, each PG
        /// at quorum through some LSN; VCL is the longest prefix 1..=v of
        /// records all at quorum.
        #[test]
        fn vcl_is_the_quorum_prefix(
            pgs_of in prop::collection::vec(0usize..3, 1..40),
            pgcls in prop::array::uniform3(0u64..45),
        ) {
            let n = pgs_of.len() as u64;
            let at_quorum = |lsn: u64| lsn <= pgcls[pgs_of[lsn as usize - 1]];
            let model = (1..=n).take_while(|&l| at_quorum(l)).last().unwrap_or(0);
            let first = (0..3).map(|p| (1..=n).find(|&l| pgs_of[l as usize - 1] == p && !at_quorum(l)));
            prop_assert_eq!(vcl(first, n), model);
        }
    }
}
