//! The hot records of a segment: redo that is durable in the log but not yet
//! coalesced into page versions, kept in memory by page so that a page can
//! be built at any read point without reading the log. Sans-IO.
//!
//! Memory is accounted in payload bytes; the node refuses appends beyond its
//! budget (coalescing, which drains this, is what keeps it below).

use std::collections::HashMap;

use crate::record::{RecordBody, RedoRecord};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("page image of {got} bytes for a {page_bytes}-byte page")]
    ImageSize { got: usize, page_bytes: usize },
    #[error("delta of {len} bytes at offset {offset} runs past the {page_bytes}-byte page")]
    DeltaOutOfPage { offset: u32, len: usize, page_bytes: usize },
}

/// Check that `body` fits a page of `page_bytes`.
pub fn check_body(body: &RecordBody, page_bytes: usize) -> Result<(), ApplyError> {
    match body {
        RecordBody::PageImage(b) if b.len() != page_bytes => Err(ApplyError::ImageSize {
            got: b.len(),
            page_bytes,
        }),
        RecordBody::PageDelta { offset, bytes } if *offset as usize + bytes.len() > page_bytes => {
            Err(ApplyError::DeltaOutOfPage {
                offset: *offset,
                len: bytes.len(),
                page_bytes,
            })
        }
        _ => Ok(()),
    }
}

/// Apply one record's change to `page` (checked by [`check_body`] on the way in).
pub fn apply(page: &mut [u8], body: &RecordBody) -> Result<(), ApplyError> {
    check_body(body, page.len())?;
    match body {
        RecordBody::PageImage(b) => page.copy_from_slice(b),
        RecordBody::PageDelta { offset, bytes } => {
            let at = *offset as usize;
            page[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }
    Ok(())
}

/// A page's hot records, in increasing LSN order.
type PageChain = Vec<(u64, RecordBody)>;

#[derive(Debug, Default)]
pub struct HotRecords {
    /// By page. A page's LSNs arrive in increasing order (one writer, in
    /// order, except a re-sent gap), so an insert is almost always a push
    /// and a read a binary search: no ordered map over every record.
    by_page: HashMap<u64, PageChain>,
    records: usize,
    bytes: usize,
}

fn body_len(body: &RecordBody) -> usize {
    match body {
        RecordBody::PageImage(b) => b.len(),
        RecordBody::PageDelta { bytes, .. } => bytes.len(),
    }
}

impl HotRecords {
    /// `seg`'s chain above `after`, up to its SCL and about `max_bytes` (at
    /// least one record if any), each with its body from here: what a
    /// recovering writer reads and a peer pulls. `Err(lsn)`: a record of
    /// the chain has no body here (only a bug does that).
    pub fn chain_records<T>(
        &self,
        seg: &crate::segment::Segment<T>,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<RedoRecord>, u64> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (lsn, meta) in seg.chain_after(after) {
            let body = self.get(meta.page, lsn).ok_or(lsn)?;
            let record = RedoRecord {
                segment: seg.id,
                lsn,
                prev_lsn_pg: meta.prev_lsn_pg,
                prev_lsn_page: meta.prev_lsn_page,
                page: meta.page,
                cpl: meta.cpl,
                body: body.clone(),
            };
            bytes += record.encoded_len();
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(record);
        }
        Ok(out)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn insert(&mut self, record: &RedoRecord) {
        self.insert_body(record.page, record.lsn, record.body.clone());
    }

    /// Take `body` as the change of `page` at `lsn` (no copy: the append
    /// path hands over the decoded record's bytes). A change already held
    /// at that LSN is replaced.
    pub fn insert_body(&mut self, page: u64, lsn: u64, body: RecordBody) {
        let len = body_len(&body);
        let chain = self.by_page.entry(page).or_default();
        match chain.last() {
            Some(&(last, _)) if last >= lsn => match chain.binary_search_by_key(&lsn, |(l, _)| *l) {
                Ok(at) => {
                    self.bytes -= body_len(&chain[at].1);
                    self.bytes += len;
                    chain[at].1 = body;
                }
                Err(at) => {
                    chain.insert(at, (lsn, body));
                    self.records += 1;
                    self.bytes += len;
                }
            },
            _ => {
                chain.push((lsn, body));
                self.records += 1;
                self.bytes += len;
            }
        }
    }

    /// The page as of `read_point`: `base` (a version at `base_lsn`, or zeros
    /// at LSN 0) with every hot record of the page above `base_lsn` and at or
    /// below the read point applied in LSN order. Returns the page and the
    /// LSN of the last change in it.
    pub fn page_at(
        &self,
        page: u64,
        read_point: u64,
        base: Option<(u64, Vec<u8>)>,
        page_bytes: usize,
    ) -> Result<(Vec<u8>, u64), ApplyError> {
        let (mut lsn, mut bytes) = base.unwrap_or_else(|| (0, vec![0; page_bytes]));
        if lsn >= read_point {
            return Ok((bytes, lsn));
        }
        let Some(chain) = self.by_page.get(&page) else {
            return Ok((bytes, lsn));
        };
        let from = chain.partition_point(|(at, _)| *at <= lsn);
        for (at, body) in &chain[from..] {
            if *at > read_point {
                break;
            }
            apply(&mut bytes, body)?;
            lsn = *at;
        }
        Ok((bytes, lsn))
    }

    /// The change of `page` at `lsn`, if held.
    pub fn get(&self, page: u64, lsn: u64) -> Option<&RecordBody> {
        let chain = self.by_page.get(&page)?;
        let at = chain.binary_search_by_key(&lsn, |(l, _)| *l).ok()?;
        Some(&chain[at].1)
    }

    /// Forget the change of `page` at `lsn` (annulled by a truncation);
    /// returns the payload bytes freed.
    pub fn remove(&mut self, page: u64, lsn: u64) -> usize {
        let Some(chain) = self.by_page.get_mut(&page) else {
            return 0;
        };
        let Ok(at) = chain.binary_search_by_key(&lsn, |(l, _)| *l) else {
            return 0;
        };
        let freed = body_len(&chain.remove(at).1);
        if chain.is_empty() {
            self.by_page.remove(&page);
        }
        self.records -= 1;
        self.bytes -= freed;
        freed
    }

    /// Forget every record at or below `lsn` (coalesced into versions).
    /// Costs a look at each page held, not at each record.
    pub fn remove_through(&mut self, lsn: u64) {
        let (mut freed, mut removed) = (0, 0);
        self.by_page.retain(|_, chain| {
            let end = chain.partition_point(|(at, _)| *at <= lsn);
            if end > 0 {
                removed += end;
                freed += chain.drain(..end).map(|(_, b)| body_len(&b)).sum::<usize>();
            }
            !chain.is_empty()
        });
        self.records -= removed;
        self.bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SegmentId;
    use proptest::prelude::*;

    const PAGE: usize = 64;

    fn rec(lsn: u64, page: u64, body: RecordBody) -> RedoRecord {
        RedoRecord {
            segment: SegmentId { volume: 1, pg: 0 },
            lsn,
            prev_lsn_pg: lsn - 1,
            prev_lsn_page: 0,
            page,
            cpl: true,
            body,
        }
    }

    #[test]
    fn bodies_outside_the_page_are_refused() {
        assert!(check_body(&RecordBody::PageImage(vec![0; PAGE - 1]), PAGE).is_err());
        assert!(
            check_body(
                &RecordBody::PageDelta {
                    offset: 60,
                    bytes: vec![1; 5]
                },
                PAGE
            )
            .is_err()
        );
        assert!(
            check_body(
                &RecordBody::PageDelta {
                    offset: u32::MAX,
                    bytes: vec![1]
                },
                PAGE
            )
            .is_err()
        );
        assert!(
            check_body(
                &RecordBody::PageDelta {
                    offset: 60,
                    bytes: vec![1; 4]
                },
                PAGE
            )
            .is_ok()
        );
    }

    #[test]
    fn a_page_never_written_is_zeros_at_lsn_0() {
        let h = HotRecords::default();
        assert_eq!(h.page_at(5, 100, None, PAGE).unwrap(), (vec![0; PAGE], 0));
    }

    #[test]
    fn out_of_order_inserts_and_removal_keep_counts_and_order() {
        let delta = |b: u8| RecordBody::PageDelta {
            offset: 0,
            bytes: vec![b; 4],
        };
        let mut h = HotRecords::default();
        for (lsn, b) in [(5, 5), (9, 9), (7, 7)] {
            h.insert_body(1, lsn, delta(b));
        }
        h.insert_body(2, 6, delta(6));
        // The same LSN again replaces, and is counted once.
        h.insert_body(1, 7, delta(8));
        assert_eq!((h.len(), h.bytes()), (4, 16));
        let (page, lsn) = h.page_at(1, 8, None, PAGE).unwrap();
        assert_eq!((page[0], lsn), (8, 7));
        h.remove_through(7);
        assert_eq!((h.len(), h.bytes()), (1, 4));
        assert_eq!(h.page_at(1, 9, Some((7, vec![0; PAGE])), PAGE).unwrap().1, 9);
        assert_eq!(h.page_at(2, 9, None, PAGE).unwrap(), (vec![0; PAGE], 0));
        h.remove_through(9);
        assert!(h.is_empty());
        assert_eq!(h.bytes(), 0);
    }

    proptest! {
        /// Building a page at any read point equals replaying, in LSN order,
        /// every change to that page up to the read point.
        #[test]
        fn page_at_equals_a_model(
            changes in prop::collection::vec((0u64..3, any::<bool>(), 0u32..60, prop::collection::vec(any::<u8>(), 1..4)), 1..40),
            read_point in 0u64..50,
        ) {
            let mut h = HotRecords::default();
            let mut records = Vec::new();
            for (i, (page, image, offset, bytes)) in changes.into_iter().enumerate() {
                let body = if image {
                    RecordBody::PageImage(bytes.iter().cycle().take(PAGE).copied().collect())
                } else {
                    RecordBody::PageDelta { offset, bytes }
                };
                let r = rec(i as u64 + 1, page, body);
                h.insert(&r);
                records.push(r);
            }
            for page in 0..3u64 {
                let mut model = vec![0u8; PAGE];
                let mut model_lsn = 0;
                for r in records.iter().filter(|r| r.page == page && r.lsn <= read_point) {
                    apply(&mut model, &r.body).unwrap();
                    model_lsn = r.lsn;
                }
                prop_assert_eq!(h.page_at(page, read_point, None, PAGE).unwrap(), (model.clone(), model_lsn));
                // From a base version at some LSN, the same page results.
                let base_lsn = read_point / 2;
                let (base, at) = h.page_at(page, base_lsn, None, PAGE).unwrap();
                let _ = at;
                prop_assert_eq!(h.page_at(page, read_point, Some((base_lsn, base)), PAGE).unwrap().0, model);
            }
        }
    }
}
