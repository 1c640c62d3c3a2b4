//! storaged: one storage node of the log-is-the-database service.
//!
//! - [`io`]: the block-device seam (io_uring + O_DIRECT, and a fault-injecting simulator);
//! - [`log`]: the durable, circular redo log of 4 KiB self-describing blocks;
//! - [`record`]: redo records as computed produces them.

pub mod cli;
pub mod client;
pub mod gossip;
pub mod hot;
pub mod inspect;
pub mod io;
pub mod log;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod pagemap;
pub mod pagestore;
pub mod proto;
pub mod record;
pub mod scrub;
pub mod segment;
pub mod segtable;
pub mod units;
