//! Library side of the operator tools, shared by the binaries and their tests.
//!
//! - [`bench`]: storbench's engines, fio-compatible reporting and argument parsing;
//! - [`devcluster`]: `storctl dev-cluster up|down`, a local cluster of real processes;
//! - [`repair`]: `storctl repair`, gap fill and segment moves, resumable;
//! - [`scrub`]: `storctl scrub`, a priority scrub pass on chosen nodes and its report;
//! - [`status`]: `storctl status`, a live view of a cluster.

pub mod bench;
pub mod devcluster;
pub mod repair;
pub mod scrub;
pub mod status;
