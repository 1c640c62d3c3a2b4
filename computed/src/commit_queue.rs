//! The commit queue: transactions waiting for the VDL to reach their CPL.
//!
//! CPLs are allocated in increasing order, so the queue is a FIFO: one
//! advance of the VCL pops every transaction it covers, in one pass, and the
//! VDL becomes the last CPL popped. No task or thread waits per transaction;
//! the caller turns what is popped into commit acknowledgements.

use std::collections::VecDeque;

#[derive(Debug)]
pub struct CommitQueue<T> {
    waiting: VecDeque<(u64, T)>,
    vdl: u64,
}

impl<T> Default for CommitQueue<T> {
    fn default() -> Self {
        CommitQueue {
            waiting: VecDeque::new(),
            vdl: 0,
        }
    }
}

impl<T> CommitQueue<T> {
    /// Start at a VDL (0 for a new volume, the recovered one after a restart).
    pub fn new(vdl: u64) -> CommitQueue<T> {
        CommitQueue {
            waiting: VecDeque::new(),
            vdl,
        }
    }

    pub fn vdl(&self) -> u64 {
        self.vdl
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A transaction whose last record (its CPL) is `cpl`. CPLs come in
    /// strictly increasing order, above the VDL.
    pub fn push(&mut self, cpl: u64, token: T) {
        assert!(
            cpl > self.vdl && self.waiting.back().is_none_or(|&(last, _)| cpl > last),
            "CPL {cpl} out of order"
        );
        self.waiting.push_back((cpl, token));
    }

    /// The VCL is now `vcl`: move the VDL to the highest CPL at or below it
    /// and hand every transaction it covers to `committed`, oldest first.
    /// Returns whether the VDL moved. The VDL never moves backwards.
    pub fn advance(&mut self, vcl: u64, mut committed: impl FnMut(u64, T)) -> bool {
        let before = self.vdl;
        while let Some(&(cpl, _)) = self.waiting.front() {
            if cpl > vcl {
                break;
            }
            let Some((cpl, token)) = self.waiting.pop_front() else {
                break;
            };
            self.vdl = cpl;
            committed(cpl, token);
        }
        self.vdl != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the VCL does, each transaction is acknowledged exactly
        /// once, in CPL order, exactly when the VCL first reaches its CPL;
        /// the VDL is always a CPL (or the start) and never goes down.
        #[test]
        fn acks_exactly_the_covered_cpls(
            gaps in prop::collection::vec(1u64..5, 0..30),
            vcls in prop::collection::vec(0u64..150, 0..30),
        ) {
            let mut q = CommitQueue::new(0);
            let mut cpls = Vec::new();
            let mut lsn = 0;
            for (i, g) in gaps.iter().enumerate() {
                lsn += g;
                q.push(lsn, i);
                cpls.push(lsn);
            }
            let mut acked: Vec<(u64, usize)> = Vec::new();
            let mut vcl_max = 0;
            let mut vdl = 0;
            for vcl in vcls {
                q.advance(vcl, |cpl, t| acked.push((cpl, t)));
                vcl_max = vcl_max.max(vcl);
                prop_assert!(q.vdl() >= vdl);
                vdl = q.vdl();
                prop_assert!(vdl == 0 || cpls.contains(&vdl));
                prop_assert!(vdl <= vcl_max);
                // Exactly the prefix of CPLs the VCL has reached (the VCL
                // only helps once it covers every earlier CPL: it does, as
                // CPLs increase).
                let expect: Vec<(u64, usize)> = cpls.iter().copied().enumerate()
                    .take_while(|&(_, c)| c <= vcl_max).map(|(i, c)| (c, i)).collect();
                prop_assert_eq!(&acked, &expect);
            }
        }
    }

    #[test]
    fn a_lower_vcl_changes_nothing() {
        let mut q = CommitQueue::new(0);
        q.push(3, 'a');
        q.push(7, 'b');
        let mut got = Vec::new();
        assert!(q.advance(8, |c, t| got.push((c, t))));
        assert!(!q.advance(2, |c, t| got.push((c, t))));
        assert_eq!(q.vdl(), 7);
        assert_eq!(got, vec![(3, 'a'), (7, 'b')]);
    }
}
