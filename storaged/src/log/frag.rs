//! Entries inside log blocks. A log block's payload is a run of fragments:
//!
//! | size | field |
//! |-----:|-------|
//! | 2 | fragment length n (≥ 1) |
//! | 1 | flags: bit 0 CONT (continues an entry from the previous block), bit 1 MORE (the entry goes on in the next block) |
//! | n | bytes |
//!
//! An entry that fits is one fragment with neither flag; a larger one is split
//! over consecutive blocks (by seq). The reader reassembles them and drops a
//! CONT fragment whose beginning it never saw (the start of the log after a
//! release) and an entry whose MORE chain the log ends in (never acknowledged).

use thiserror::Error;

pub const FRAG_HEADER_BYTES: usize = 3;
pub const FLAG_CONT: u8 = 1;
pub const FLAG_MORE: u8 = 2;

/// Write one fragment at the start of `out`; returns the bytes used.
pub fn put_fragment(out: &mut [u8], bytes: &[u8], flags: u8) -> usize {
    debug_assert!(!bytes.is_empty() && bytes.len() <= u16::MAX as usize);
    debug_assert!(out.len() >= FRAG_HEADER_BYTES + bytes.len());
    out[0..2].copy_from_slice(&(bytes.len() as u16).to_le_bytes());
    out[2] = flags;
    out[FRAG_HEADER_BYTES..FRAG_HEADER_BYTES + bytes.len()].copy_from_slice(bytes);
    FRAG_HEADER_BYTES + bytes.len()
}

#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum FragError {
    #[error("fragment header cut short at payload byte {0}")]
    Truncated(usize),
    #[error("fragment of length 0 at payload byte {0}")]
    Empty(usize),
    #[error("fragment at payload byte {at} claims {len} bytes, {left} left")]
    Overrun { at: usize, len: usize, left: usize },
    #[error("unknown fragment flags {flags:#04x} at payload byte {at}")]
    BadFlags { at: usize, flags: u8 },
    #[error("entry continues from the previous block but this fragment says it does not")]
    MissingCont,
    #[error("a new entry starts while the previous one expected a continuation")]
    UnexpectedCont,
    #[error("MORE is set on a fragment that does not end its block")]
    MoreNotLast,
    #[error("reassembled entry of {0} bytes exceeds the entry limit")]
    TooLarge(usize),
}

/// Reassembles entries from consecutive valid blocks' payloads.
#[derive(Debug)]
pub struct Reassembler {
    /// The entry in progress and the seq of the block it started in.
    partial: Option<(u64, Vec<u8>)>,
    /// True until the first fragment is seen: a leading CONT fragment belongs
    /// to an entry released before the log's tail, and is skipped.
    at_start: bool,
    entry_bytes_max: usize,
}

impl Reassembler {
    pub fn new(entry_bytes_max: usize) -> Reassembler {
        Reassembler {
            partial: None,
            at_start: true,
            entry_bytes_max,
        }
    }

    /// Feed the payload of block `seq`; complete entries go to `out` in
    /// order, each with the seq of the block it starts in. An error means the
    /// block is not a valid continuation of the log: the caller treats it as
    /// the end of the log.
    pub fn push_block(&mut self, seq: u64, payload: &[u8], out: &mut Vec<(u64, Vec<u8>)>) -> Result<(), FragError> {
        // Validate the whole block before emitting anything from it, so a bad
        // block contributes nothing.
        let mut frags = Vec::new();
        let mut at = 0;
        while at < payload.len() {
            if payload.len() - at < FRAG_HEADER_BYTES {
                return Err(FragError::Truncated(at));
            }
            let len = u16::from_le_bytes([payload[at], payload[at + 1]]) as usize;
            let flags = payload[at + 2];
            if len == 0 {
                return Err(FragError::Empty(at));
            }
            if flags & !(FLAG_CONT | FLAG_MORE) != 0 {
                return Err(FragError::BadFlags { at, flags });
            }
            let left = payload.len() - at - FRAG_HEADER_BYTES;
            if len > left {
                return Err(FragError::Overrun { at, len, left });
            }
            let start = at + FRAG_HEADER_BYTES;
            at = start + len;
            if flags & FLAG_MORE != 0 && at != payload.len() {
                return Err(FragError::MoreNotLast);
            }
            frags.push((flags, start, at));
        }
        let mut partial = self.partial.take();
        let mut at_start = self.at_start;
        let mut done = Vec::new();
        for (i, &(flags, start, end)) in frags.iter().enumerate() {
            let bytes = &payload[start..end];
            let cont = flags & FLAG_CONT != 0;
            match (partial.as_mut(), cont) {
                (Some((_, p)), true) => p.extend_from_slice(bytes),
                (None, true) if at_start && i == 0 => {
                    // Tail of an entry released before the log's start: skip,
                    // and skip its further pieces too.
                    if flags & FLAG_MORE != 0 {
                        at_start = true;
                        continue;
                    }
                    at_start = false;
                    continue;
                }
                (None, true) => return Err(FragError::UnexpectedCont),
                (Some(_), false) => return Err(FragError::MissingCont),
                (None, false) => partial = Some((seq, bytes.to_vec())),
            }
            at_start = false;
            let len = partial.as_ref().map_or(0, |(_, p)| p.len());
            if len > self.entry_bytes_max {
                return Err(FragError::TooLarge(len));
            }
            if flags & FLAG_MORE == 0 {
                done.push(partial.take().expect("entry in progress"));
            }
        }
        self.partial = partial;
        self.at_start = at_start;
        out.extend(done);
        Ok(())
    }

    /// Drop the entry in progress: the incarnation that wrote it crashed
    /// before finishing it (it was never acknowledged), and a new one starts
    /// at an entry boundary.
    pub fn abandon_partial(&mut self) -> usize {
        self.partial.take().map_or(0, |(_, p)| p.len())
    }

    /// Start again after blocks the reader could not use (damaged): the
    /// entry in progress lost its middle and is dropped, and the pieces of
    /// an entry whose start was lost are skipped, as at the log's start.
    /// Returns the bytes dropped.
    pub fn resync(&mut self) -> usize {
        self.at_start = true;
        self.abandon_partial()
    }

    /// Bytes of an entry whose end the log did not reach (dropped at the end).
    pub fn incomplete_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |(_, p)| p.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_reassemble() {
        let mut b1 = vec![0u8; 20];
        let mut n = put_fragment(&mut b1, b"abc", 0);
        n += put_fragment(&mut b1[n..], b"defgh", FLAG_MORE);
        let mut b2 = vec![0u8; 20];
        let m = put_fragment(&mut b2, b"ij", FLAG_CONT);
        let mut r = Reassembler::new(100);
        let mut out = Vec::new();
        r.push_block(7, &b1[..n], &mut out).unwrap();
        assert_eq!(out, vec![(7, b"abc".to_vec())]);
        assert_eq!(r.incomplete_bytes(), 5);
        r.push_block(8, &b2[..m], &mut out).unwrap();
        assert_eq!(out, vec![(7, b"abc".to_vec()), (7, b"defghij".to_vec())]);
    }

    #[test]
    fn leading_continuation_is_skipped_at_start_only() {
        let mut b = vec![0u8; 20];
        let mut n = put_fragment(&mut b, b"xx", FLAG_CONT);
        n += put_fragment(&mut b[n..], b"yy", 0);
        let mut out = Vec::new();
        Reassembler::new(100).push_block(1, &b[..n], &mut out).unwrap();
        assert_eq!(out, vec![(1, b"yy".to_vec())]);

        let mut r = Reassembler::new(100);
        r.push_block(1, &b[n - 5..n], &mut out).unwrap();
        assert_eq!(r.push_block(2, &b[..n], &mut out), Err(FragError::UnexpectedCont));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let mut r = Reassembler::new(100);
        let mut out = Vec::new();
        assert_eq!(r.push_block(1, &[5, 0], &mut out), Err(FragError::Truncated(0)));
        assert_eq!(r.push_block(1, &[0, 0, 0], &mut out), Err(FragError::Empty(0)));
        assert!(matches!(
            r.push_block(1, &[9, 0, 0, 1], &mut out),
            Err(FragError::Overrun { .. })
        ));
        assert!(matches!(
            r.push_block(1, &[1, 0, 8, 1], &mut out),
            Err(FragError::BadFlags { .. })
        ));
        assert_eq!(
            r.push_block(1, &[1, 0, FLAG_MORE, 1, 1, 0, 0, 1], &mut out),
            Err(FragError::MoreNotLast)
        );
        assert!(out.is_empty());
    }
}
