//! The page cache: pages as of the VDL, so that a read at the current read
//! point is served without asking storage.
//!
//! A cached page holds its bytes as of the VDL plus the changes computed has
//! made to it above the VDL (not yet durable). When the VDL advances, the
//! changes it covers are folded in, in LSN order. A page enters the cache
//! when a whole-page image is written to it or a storage read returns it
//! (and nothing was written to it since the read point); it leaves, oldest
//! first, when the cache holds more than `pages_max` pages that have no
//! pending change. Pages with pending changes stay: there are at most LAL of
//! those, so the cache is bounded by `pages_max` plus the LAL.

use std::collections::{HashMap, VecDeque};

use storaged::hot::apply;
use storaged::record::RecordBody;

#[derive(Debug, Default)]
struct CachedPage {
    /// The page as of the VDL and the LSN of its last change, once known.
    /// `None` while the page entered by an image that is not durable yet.
    state: Option<(u64, Vec<u8>)>,
    /// Changes above the VDL not folded in yet.
    pending: usize,
}

#[derive(Debug)]
pub struct PageCache {
    pages: HashMap<u64, CachedPage>,
    /// Every change above the VDL to a cached page, in LSN order.
    changes: VecDeque<(u64, u64, RecordBody)>,
    /// Pages in the order they entered, for eviction.
    order: VecDeque<u64>,
    pages_max: usize,
    pub hits: u64,
    pub misses: u64,
}

impl PageCache {
    pub fn new(pages_max: usize) -> PageCache {
        PageCache {
            pages: HashMap::new(),
            changes: VecDeque::new(),
            order: VecDeque::new(),
            pages_max,
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// A transaction changed `page` at `lsn` (above the VDL).
    pub fn on_write(&mut self, page: u64, lsn: u64, body: &RecordBody) {
        if self.pages_max == 0 {
            return;
        }
        let entry = match self.pages.get_mut(&page) {
            Some(e) => e,
            None if matches!(body, RecordBody::PageImage(_)) => {
                self.order.push_back(page);
                self.pages.entry(page).or_default()
            }
            None => return,
        };
        entry.pending += 1;
        self.changes.push_back((lsn, page, body.clone()));
        self.evict();
    }

    /// The VDL reached `vdl`: fold in the changes it covers.
    pub fn on_vdl(&mut self, vdl: u64) {
        while let Some(&(lsn, page, _)) = self.changes.front() {
            if lsn > vdl {
                break;
            }
            let Some((lsn, _, body)) = self.changes.pop_front() else {
                break;
            };
            let Some(entry) = self.pages.get_mut(&page) else {
                continue;
            };
            entry.pending -= 1;
            match (&mut entry.state, body) {
                (state, RecordBody::PageImage(bytes)) => *state = Some((lsn, bytes)),
                (Some((at, bytes)), body) => {
                    // Bodies were checked against the page size on submit.
                    if apply(bytes, &body).is_ok() {
                        *at = lsn;
                    } else {
                        debug_assert!(false, "a checked change did not apply");
                        entry.state = None;
                    }
                }
                (None, _) => {}
            }
        }
        self.evict();
    }

    /// The page as of the VDL, if cached: (LSN of its last change, bytes).
    pub fn get(&mut self, page: u64) -> Option<(u64, Vec<u8>)> {
        let hit = self.pages.get(&page).and_then(|e| e.state.clone());
        if hit.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        hit
    }

    /// A storage read returned `page` as of a read point at which it is
    /// still current (the caller checked nothing was written to it since).
    pub fn insert(&mut self, page: u64, lsn: u64, bytes: Vec<u8>) {
        if self.pages_max == 0 {
            return;
        }
        let entry = match self.pages.get_mut(&page) {
            Some(e) => e,
            None => {
                self.order.push_back(page);
                self.pages.entry(page).or_default()
            }
        };
        if entry.pending == 0 {
            entry.state = Some((lsn, bytes));
        }
        self.evict();
    }

    fn evict(&mut self) {
        // Each page is looked at once per call at most: pages with pending
        // changes go to the back and are skipped.
        let mut budget = self.order.len();
        while self.pages.len() > self.pages_max && budget > 0 {
            budget -= 1;
            let Some(page) = self.order.pop_front() else {
                break;
            };
            match self.pages.get(&page) {
                Some(e) if e.pending > 0 => self.order.push_back(page),
                Some(_) => {
                    self.pages.remove(&page);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_show_only_once_durable() {
        let mut c = PageCache::new(10);
        c.on_write(1, 5, &RecordBody::PageImage(vec![1; 8]));
        assert_eq!(c.get(1), None, "an image above the VDL is not readable yet");
        c.on_write(
            1,
            6,
            &RecordBody::PageDelta {
                offset: 2,
                bytes: vec![9, 9],
            },
        );
        c.on_vdl(5);
        assert_eq!(c.get(1), Some((5, vec![1; 8])));
        c.on_vdl(6);
        assert_eq!(c.get(1), Some((6, vec![1, 1, 9, 9, 1, 1, 1, 1])));
        // A delta to an uncached page is not cached.
        c.on_write(
            2,
            7,
            &RecordBody::PageDelta {
                offset: 0,
                bytes: vec![1],
            },
        );
        c.on_vdl(7);
        assert_eq!(c.get(2), None);
    }

    #[test]
    fn eviction_keeps_pages_with_pending_changes() {
        let mut c = PageCache::new(2);
        c.insert(1, 1, vec![0; 4]);
        c.on_write(
            1,
            10,
            &RecordBody::PageDelta {
                offset: 0,
                bytes: vec![7],
            },
        );
        c.insert(2, 2, vec![0; 4]);
        c.insert(3, 3, vec![0; 4]);
        assert_eq!(c.len(), 2);
        assert!(c.get(2).is_none(), "the oldest page without pending changes went");
        c.on_vdl(10);
        assert_eq!(c.get(1), Some((10, vec![7, 0, 0, 0])));
    }
}
