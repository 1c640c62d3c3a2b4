//! Library side of the operator tools, shared by the binaries and their tests.
//!
//! - [`bench`]: storbench's engines, fio-compatible reporting and argument parsing.

pub mod bench;
