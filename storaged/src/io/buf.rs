//! 4096-aligned, zero-initialised I/O buffers, as `O_DIRECT` requires.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use super::BLOCK_SIZE;

/// A heap buffer aligned to [`BLOCK_SIZE`] whose capacity is a whole number of
/// blocks. `len()` (also whole blocks) is how much of it an I/O uses.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `blocks` blocks, with `len() == capacity()`.
    ///
    /// # Panics
    /// If `blocks` is 0 or the size overflows: both are programming errors,
    /// sizes come from configuration, never from the disk or the network.
    pub fn zeroed_blocks(blocks: usize) -> AlignedBuf {
        assert!(blocks > 0, "an I/O buffer holds at least one block");
        let capacity = blocks.checked_mul(BLOCK_SIZE).expect("buffer size overflows");
        let layout = Layout::from_size_align(capacity, BLOCK_SIZE).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            capacity,
            len: capacity,
        }
    }

    /// A zeroed buffer of at least `bytes` bytes, rounded up to whole blocks.
    pub fn zeroed(bytes: usize) -> AlignedBuf {
        AlignedBuf::zeroed_blocks(bytes.div_ceil(BLOCK_SIZE).max(1))
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    #[allow(clippy::len_without_is_empty)] // never empty: at least one block
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn blocks(&self) -> usize {
        self.len / BLOCK_SIZE
    }

    /// Use the first `blocks` blocks for the next I/O.
    ///
    /// # Panics
    /// If `blocks` is 0 or more than the capacity holds.
    pub fn set_blocks(&mut self, blocks: usize) {
        assert!(
            blocks > 0 && blocks * BLOCK_SIZE <= self.capacity,
            "set_blocks({blocks}) outside capacity {}",
            self.capacity
        );
        self.len = blocks * BLOCK_SIZE;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Block `i` of the used length.
    pub fn block(&self, i: usize) -> &[u8] {
        &self[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }

    pub fn block_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }

    /// Zero the used length.
    pub fn clear(&mut self) {
        self.fill(0);
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len bytes, initialised (zeroed at alloc).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, BLOCK_SIZE).expect("valid layout");
        // SAFETY: allocated in zeroed_blocks with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(5000);
        assert_eq!(b.capacity(), 2 * BLOCK_SIZE);
        assert_eq!(b.as_ptr() as usize % BLOCK_SIZE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b.set_blocks(1);
        assert_eq!(b.len(), BLOCK_SIZE);
        b.block_mut(0)[7] = 9;
        assert_eq!(b[7], 9);
    }
}
