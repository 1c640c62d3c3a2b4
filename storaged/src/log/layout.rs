//! Where things live on a device. All positions are in 4 KiB blocks.
//!
//! ```text
//! block 0            superblock copy 0
//! block 1, 2         anchor slots 0 and 1
//! block 128          superblock copy 1 (apart from copy 0, so one bad region
//!                    does not take both)
//! blocks 4, 5        the scrubber's progress, slots 0 and 1
//! blocks 8..120      the segment table, slots 0 and 1 (`segtable`)
//! blocks 3..256      otherwise reserved for metadata
//! blocks 256..       the circular log (log_blocks)
//! after the log      the page store (the rest of the device)
//! ```

use crate::io::BLOCK_SIZE;

use super::format::{DeviceId, Superblock};

pub const SUPERBLOCK_BLOCKS: [u64; 2] = [0, 128];
pub const ANCHOR_BLOCKS: [u64; 2] = [1, 2];
/// The scrubber's progress (`scrub::progress`): two slots, like the anchor.
pub const SCRUB_STATE_BLOCKS: [u64; 2] = [4, 5];
/// The first 1 MiB is metadata.
pub const METADATA_BLOCKS: u64 = 256;
/// The smallest log that still holds a few maximal writes.
pub const LOG_BLOCKS_MIN: u64 = 64;
/// Smallest device accepted by `format`.
pub const DEVICE_BYTES_MIN: u64 = 4 * 1024 * 1024;
/// Default log size limits when `--log-size` is not given: a quarter of the
/// device, within these bounds.
pub const LOG_BYTES_DEFAULT_MIN: u64 = 1024 * 1024;
pub const LOG_BYTES_DEFAULT_MAX: u64 = 1024 * 1024 * 1024;

pub fn block_offset(block: u64) -> u64 {
    block * BLOCK_SIZE as u64
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("device of {0} bytes is too small: at least {DEVICE_BYTES_MIN} bytes are needed")]
    DeviceTooSmall(u64),
    #[error("log of {log_bytes} bytes does not fit a {device_bytes}-byte device (at least {min} bytes of log, and the metadata area, are needed)", min = LOG_BLOCKS_MIN * BLOCK_SIZE as u64)]
    BadLogSize { log_bytes: u64, device_bytes: u64 },
}

/// The superblock a fresh format of a `device_bytes` device gets.
pub fn plan(
    device_id: DeviceId,
    node_id: u64,
    device_bytes: u64,
    log_bytes: Option<u64>,
    created_unix_secs: u64,
) -> Result<Superblock, LayoutError> {
    let device_bytes = device_bytes - device_bytes % BLOCK_SIZE as u64;
    if device_bytes < DEVICE_BYTES_MIN {
        return Err(LayoutError::DeviceTooSmall(device_bytes));
    }
    let device_blocks = device_bytes / BLOCK_SIZE as u64;
    let log_bytes = log_bytes.unwrap_or_else(|| (device_bytes / 4).clamp(LOG_BYTES_DEFAULT_MIN, LOG_BYTES_DEFAULT_MAX));
    let log_blocks = log_bytes / BLOCK_SIZE as u64;
    if log_blocks < LOG_BLOCKS_MIN || METADATA_BLOCKS + log_blocks > device_blocks {
        return Err(LayoutError::BadLogSize {
            log_bytes,
            device_bytes,
        });
    }
    let pages_start_block = METADATA_BLOCKS + log_blocks;
    Ok(Superblock {
        device_id,
        node_id,
        device_bytes,
        log_start_block: METADATA_BLOCKS,
        log_blocks,
        pages_start_block,
        pages_blocks: device_blocks - pages_start_block,
        created_unix_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_consistent() {
        for mb in [4u64, 8, 64, 1024, 100 * 1024] {
            let sb = plan([1; 16], 1, mb << 20, None, 0).unwrap();
            sb.check_geometry().unwrap();
        }
        assert_eq!(
            plan([1; 16], 1, 1 << 20, None, 0),
            Err(LayoutError::DeviceTooSmall(1 << 20))
        );
        assert!(plan([1; 16], 1, 8 << 20, Some(8 << 20), 0).is_err());
        assert!(plan([1; 16], 1, 8 << 20, Some(4096), 0).is_err());
    }
}
