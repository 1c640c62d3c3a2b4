//! Read buffers kept from range to range: a pass reads the whole device a
//! megabyte at a time, and a fresh buffer for each read is an allocation
//! and a memset of every byte read on the node's one runtime thread. A
//! buffer given back is read into again as it is: a read fills it whole
//! or fails ([`crate::io::IoError::Short`]), so nothing left of an earlier
//! range is ever judged.

use std::sync::Mutex;

use crate::io::AlignedBuf;

/// A bounded pool of [`AlignedBuf`]s: at most `kept_max` are kept, each of
/// at most `blocks_max` blocks; larger or further buffers are allocated
/// when asked for and dropped when given back.
#[derive(Debug)]
pub struct BufPool {
    kept: Mutex<Vec<AlignedBuf>>,
    kept_max: usize,
    blocks_max: usize,
}

impl BufPool {
    pub fn new(kept_max: usize, blocks_max: usize) -> BufPool {
        BufPool {
            kept: Mutex::new(Vec::with_capacity(kept_max)),
            kept_max,
            blocks_max,
        }
    }

    /// A buffer of `blocks` blocks (its contents whatever a read left).
    pub fn take(&self, blocks: usize) -> AlignedBuf {
        let kept = {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            let i = kept.iter().position(|b| b.capacity() >= blocks * crate::io::BLOCK_SIZE);
            i.map(|i| kept.swap_remove(i))
        };
        match kept {
            Some(mut buf) => {
                buf.set_blocks(blocks);
                buf
            }
            None => AlignedBuf::zeroed_blocks(blocks.max(1)),
        }
    }

    /// Keep `buf` for a later [`BufPool::take`], if there is room for it.
    pub fn give(&self, buf: AlignedBuf) {
        if buf.capacity() > self.blocks_max * crate::io::BLOCK_SIZE {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < self.kept_max {
            kept.push(buf);
        }
    }

    /// Buffers kept now.
    pub fn kept(&self) -> usize {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::BLOCK_SIZE;

    #[test]
    fn buffers_are_reused_up_to_the_bound() {
        let pool = BufPool::new(2, 256);
        let mut a = pool.take(256);
        a.block_mut(0)[0] = 7;
        let ptr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.kept(), 1);
        // A smaller read takes the same buffer, used to its length only.
        let b = pool.take(3);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 3 * BLOCK_SIZE);
        // None kept: a new one.
        let c = pool.take(256);
        assert_ne!(c.as_ptr(), ptr);
        let d = pool.take(256);
        pool.give(b);
        pool.give(c);
        pool.give(d);
        assert_eq!(pool.kept(), 2, "no more than the bound kept");
        // Larger than the pool keeps: allocated, and not kept.
        let big = pool.take(512);
        assert_eq!(big.len(), 512 * BLOCK_SIZE);
        pool.give(big);
        assert_eq!(pool.kept(), 2);
    }
}
