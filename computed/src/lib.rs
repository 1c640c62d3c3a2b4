//! computed: the single writer of a volume (docs/architecture.md, "The write path").
//!
//! - [`cluster`]: the cluster file (volume, nodes, placement);
//! - [`core`]: the sans-IO writer (LSNs, LAL, boxcar, quorum, commit queue, reads),
//!   built from [`quorum`], [`commit_queue`] and [`cache`];
pub mod api;
pub mod cache;
pub mod client;
pub mod cluster;
pub mod commit_queue;
pub mod core;
pub mod membership;
pub mod quorum;
pub mod recovery;
pub mod server;
