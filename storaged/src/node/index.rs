//! The node's side of the page-version index (`crate::pagemap`): loading
//! it at open, checking each version a read finds against it, and writing
//! it after the versions it names are durable.
//!
//! Entries change in memory as soon as a version is written; a changed
//! index block is written (to the copy not holding its current contents)
//! by [`Node::write_index`]: at the end of a coalescing round before the
//! table moves `coalesced_lsn`, at the end of a hydration after its flush,
//! and after a repair. Never while a rebuild is marked: hydration's
//! versions are durable only at its end, and the index must never be
//! ahead of a durable version.

use std::collections::BTreeSet;

use super::{Node, NodeError, SegState};
use crate::io::{AlignedBuf, BLOCK_SIZE};
use crate::log::layout::block_offset;
use crate::pagemap::{self, Chosen, Entry, PageMap, UNKNOWN};
use crate::pagestore::{self, Current, Extent};
use crate::record::SegmentId;

/// Index blocks read at once at open (both copies of each).
const READ_PAIRS: u64 = 128;

impl SegState {
    pub(super) fn index_entry(&self, local: u64) -> Entry {
        self.index.entries.get(local as usize).copied().unwrap_or_default()
    }

    /// Change page `local`'s entry in memory; its block is written by the
    /// next [`Node::write_index`].
    pub(super) fn index_set(&mut self, local: u64, entry: Entry) {
        if let Some(e) = self.index.entries.get_mut(local as usize)
            && *e != entry
        {
            *e = entry;
            self.index_dirty.insert(PageMap::block_of(local));
        }
    }
}

impl Node {
    /// Read the index of every segment that has an extent (at open).
    pub(super) async fn load_indexes(&self) -> Result<(), NodeError> {
        let segments: Vec<(SegmentId, Extent, Option<u64>)> = {
            let st = self.state();
            st.segments
                .iter()
                .filter_map(|(&id, s)| s.extent.map(|e| (id, e, s.torn_after)))
                .collect()
        };
        for (id, extent, torn_after) in segments {
            let (map, dirty, lost) = self.read_index(id, &extent, torn_after).await?;
            self.state().seg_mut(id)?.index = map;
            // A lost block is written into both copies, one after the other.
            for blocks in [dirty, lost] {
                self.state().seg_mut(id)?.index_dirty.extend(blocks);
                self.write_index(id, true).await?;
            }
        }
        Ok(())
    }

    /// One segment's index from the device. Returns it and the blocks to
    /// write again: those with a damaged copy (rewritten from the other),
    /// and, in both sets, those both copies of which are damaged (rebuilt
    /// from the page slots).
    async fn read_index(
        &self,
        id: SegmentId,
        extent: &Extent,
        torn_after: Option<u64>,
    ) -> Result<(PageMap, BTreeSet<u64>, BTreeSet<u64>), NodeError> {
        let mut map = PageMap::new(extent.pg_pages);
        let mut dirty = BTreeSet::new();
        let mut lost = BTreeSet::new();
        let blocks = extent.map_blocks();
        let start = extent.map_start_block();
        let mut first = 0;
        while first < blocks {
            let n = READ_PAIRS.min(blocks - first);
            let at = pagemap::copy_block(start, first, 0);
            let buf = AlignedBuf::zeroed_blocks((n * pagemap::COPIES) as usize);
            let (buf, result) = self.io.read(block_offset(at), buf).await;
            result?;
            for i in 0..n {
                let index = first + i;
                let pages = map.pages_of(index);
                let copy = |c: usize| {
                    let o = (i * pagemap::COPIES + c as u64) as usize * BLOCK_SIZE;
                    pagemap::decode_block(
                        &buf[o..o + BLOCK_SIZE],
                        &self.device_id,
                        id,
                        index,
                        pagemap::copy_block(start, index, c),
                        pages.len(),
                    )
                };
                let (chosen, other) = pagemap::choose([copy(0), copy(1)]);
                match chosen {
                    Chosen::Never => {}
                    Chosen::Copy { copy, seq, entries } => {
                        map.entries[pages].copy_from_slice(&entries);
                        map.blocks[index as usize] = Some((copy, seq));
                        if let Some(error) = other {
                            tracing::error!(
                                volume = id.volume,
                                pg = id.pg,
                                offset = block_offset(pagemap::copy_block(start, index, 1 - copy)),
                                %error,
                                "page-version index copy damaged; writing it again from the other copy"
                            );
                            dirty.insert(index);
                        }
                    }
                    Chosen::Lost(error) => {
                        tracing::error!(
                            volume = id.volume,
                            pg = id.pg,
                            offset = block_offset(pagemap::copy_block(start, index, 0)),
                            %error,
                            "both copies of a page-version index block damaged; rebuilding it from the page slots \
                             (a lost write among its pages can no longer be told from an older version)"
                        );
                        for local in pages.clone() {
                            map.entries[local] = self.entry_from_slots(id, extent, local as u64, torn_after).await?;
                        }
                        dirty.insert(index);
                        lost.insert(index);
                    }
                }
            }
            first += n;
        }
        Ok((map, dirty, lost))
    }

    /// What page `local`'s slots hold, as an index entry.
    async fn entry_from_slots(
        &self,
        id: SegmentId,
        extent: &Extent,
        local: u64,
        torn_after: Option<u64>,
    ) -> Result<Entry, NodeError> {
        let page = id.pg as u64 * extent.pg_pages + local;
        let slots = self.read_page_slots(id, extent, page, local).await?;
        Ok(match pagestore::current(slots, torn_after) {
            Ok(c) => match c.current {
                Current::Never => Entry::default(),
                Current::Version { version, .. } => Entry::of(version.lsn, &version.bytes),
            },
            Err(_) => UNKNOWN,
        })
    }

    /// Write segment `id`'s changed index blocks durably, each into the copy
    /// not holding its current contents. `rebuild_ok`: the caller knows
    /// every version the entries name is durable (the end of a hydration,
    /// open); otherwise a segment with a rebuild marked is left alone.
    pub(super) async fn write_index(&self, id: SegmentId, rebuild_ok: bool) -> Result<(), NodeError> {
        let _writing = self.index_writes.lock().await;
        loop {
            let (index, copy, seq, entries, extent) = {
                let mut st = self.state();
                let s = st.seg_mut(id)?;
                if !rebuild_ok && s.rebuilding() {
                    return Ok(());
                }
                let Some(extent) = s.extent else { return Ok(()) };
                let Some(index) = s.index_dirty.pop_first() else {
                    return Ok(());
                };
                let (copy, seq) = s.index.next_write(index);
                let entries = s.index.entries[s.index.pages_of(index)].to_vec();
                (index, copy, seq, entries, extent)
            };
            let at = pagemap::copy_block(extent.map_start_block(), index, copy);
            let mut buf = AlignedBuf::zeroed_blocks(1);
            pagemap::encode_block(&mut buf, self.device_id, id, index, at, seq, &entries);
            let (_, result) = self.io.write(block_offset(at), buf).await;
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            if let Err(e) = result {
                s.index_dirty.insert(index);
                return Err(e.into());
            }
            s.index.blocks[index as usize] = Some((copy, seq));
        }
    }
}
