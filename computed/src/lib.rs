//! computed: the single writer of a volume (ARCHITECTURE.md §3).
//!
//! - [`cluster`]: the cluster file (volume, nodes, placement);
pub mod cluster;
