//! What the node answers to the scrub requests: an operator's `Scrub` (a
//! priority pass) and `ScrubStatus`, and a peer's `GetPageAt` (a page
//! exactly as of an LSN, to repair its own damaged copy). The network
//! shell ([`super::server`]) checks who asks (an operator; a member at the
//! same epochs) before it calls in here.
//!
//! A node without a scrubber (one opened by a test or a tool, not by
//! `storaged run`) refuses a pass and reports that no pass ever ran.

use std::sync::Arc;

use super::{Node, NodeError};
use crate::proto::ErrorCode;
use crate::record::SegmentId;
use crate::scrub;

/// Why a scrub request was not done.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("scrub is not running on this node")]
    NotRunning,
    #[error("page {page} of volume {volume} pg {pg} cannot be built here at exactly LSN {lsn}: {why}")]
    NotHeld {
        volume: u64,
        pg: u32,
        page: u64,
        lsn: u64,
        why: String,
    },
}

impl ScrubError {
    /// The error code a reply carries.
    pub fn wire_code(&self) -> ErrorCode {
        match self {
            // The request is sound; this node cannot do it.
            ScrubError::NotRunning => ErrorCode::BadRequest,
            ScrubError::NotHeld { .. } => ErrorCode::NotHeld,
        }
    }
}

impl Node {
    /// Start a priority pass over the segments `filter` names (the log
    /// always); returns the number the pass will carry in its report.
    pub fn scrub_request(&self, filter: scrub::Filter) -> Result<u64, NodeError> {
        let handle = self.scrubber.get().ok_or(ScrubError::NotRunning)?;
        match handle.request(filter) {
            // Its progress is not read yet: a moment after start-up.
            0 => Err(ScrubError::NotRunning.into()),
            pass => Ok(pass),
        }
    }

    /// The pass under way, the last completed one, and the totals since start.
    pub fn scrub_status(&self) -> scrub::Status {
        self.scrubber.get().map(|h| h.status()).unwrap_or_default()
    }

    /// Scrub passes completed since start (0 without a scrubber).
    pub fn scrub_passes_completed(&self) -> u64 {
        self.scrubber.get().map_or(0, |h| h.passes_completed())
    }

    /// Start the node's scrubber: `storaged run` does, once the node is open.
    pub fn start_scrubber(self: &Arc<Self>, config: scrub::shell::ScrubConfig) {
        let peers = Arc::new(crate::client::PagePeers::new(self.node_id));
        let handle = scrub::shell::spawn(self.clone(), peers, config, self.device_id);
        if self.scrubber.set(handle).is_err() {
            tracing::warn!("the scrubber was already running");
        }
    }

    /// Stop the scrubber (its progress kept), before the node shuts down.
    pub async fn stop_scrubber(&self) {
        if let Some(h) = self.scrubber.get() {
            h.stop().await;
        }
    }

    /// A read found a page version damaged: a priority pass over its
    /// segment repairs it from a peer (a pass already running over the
    /// segment is not asked again).
    pub(super) fn damage_seen(&self, id: SegmentId) {
        if let Some(h) = self.scrubber.get() {
            h.request(scrub::Filter::Segments(vec![id]));
        }
    }

    /// Page `page` of segment `id` exactly as of `lsn`: every change at or
    /// below it, none above. The asker passed the gossip gate at
    /// `installed_epoch` and `membership_epoch` (same epochs as this
    /// segment's); a page this node cannot build at exactly `lsn` is
    /// [`ScrubError::NotHeld`].
    pub async fn page_at_exact(
        &self,
        id: SegmentId,
        installed_epoch: u64,
        membership_epoch: u64,
        page: u64,
        lsn: u64,
    ) -> Result<Vec<u8>, NodeError> {
        // The server checked both epochs against the segment's.
        let _ = (installed_epoch, membership_epoch);
        self.page_exactly_at(id, page, lsn).await
    }
}
