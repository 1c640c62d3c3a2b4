//! The durable redo log: a circular region of self-describing 4 KiB blocks.
//!
//! - [`format`]: block header, superblock and anchor encodings;
//! - [`layout`]: where everything lives on the device;
//! - [`frag`]: entries split into fragments inside blocks;
//! - [`core`]: the sans-IO state machine (packing, durable mark, space);
//! - [`recovery`]: finding the end of the valid log after a crash;
//! - [`engine`]: the tokio shell appenders talk to;
//! - [`mkfs`]: making a device ready.

pub mod core;
pub mod engine;
pub mod format;
pub mod frag;
pub mod layout;
pub mod mkfs;
pub mod recovery;

pub use self::core::{AppendError, DurabilityMode, LogConfig, LogStats};
pub use self::engine::{LogEngine, Opened};
pub use self::recovery::OpenError;
