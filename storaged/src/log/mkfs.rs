//! Making a device ready: zero the metadata area and the log, then write the
//! two superblock copies and the first anchor, durably.
//!
//! The log region is zeroed so that nothing left from before (another format,
//! another program) can ever look like part of the log or upset `inspect`.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo, Durability, IoError};

use super::format::{Anchor, DeviceId, Superblock};
use super::layout::{self, ANCHOR_BLOCKS, LayoutError, METADATA_BLOCKS, SUPERBLOCK_BLOCKS, block_offset};
use super::recovery::{OpenError, read_superblock};

/// The node id storbench formats its own scratch devices with. `storaged
/// format` never gives it (node ids start at 1) and `storaged run` refuses a
/// device that has it, so a device with any other id is a storage node's, and
/// storbench leaves it alone unless told to (`--force`).
pub const SCRATCH_NODE_ID: u64 = 0;

/// Zeroing writes are this big.
const ZERO_CHUNK_BLOCKS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "the device is already formatted (node {node_id}, created at unix time {created_unix_secs}); pass --force to erase it"
    )]
    AlreadyFormatted { node_id: u64, created_unix_secs: u64 },
    #[error("the device holds data (non-zero bytes at offset {offset}); pass --force to erase it")]
    HoldsData { offset: u64 },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("device I/O failed: {0}")]
    Io(#[from] IoError),
}

#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    pub node_id: u64,
    /// Log size; default: a quarter of the device within bounds (see `layout`).
    pub log_bytes: Option<u64>,
    pub force: bool,
}

/// Format `dev` and return the superblock written.
pub async fn format<D: BlockIo>(dev: &D, opts: FormatOptions) -> Result<Superblock, FormatError> {
    let size = dev.geometry().size_bytes;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Plan first: a bad size is refused before anything is read or written.
    let sb = layout::plan(new_device_id(), opts.node_id, size, opts.log_bytes, created)?;
    if !opts.force {
        refuse_if_in_use(dev).await?;
    }
    // Zero everything the log and the metadata own, in big writes.
    let end_block = sb.log_start_block + sb.log_blocks;
    let mut buf = AlignedBuf::zeroed_blocks(ZERO_CHUNK_BLOCKS);
    let mut block = 0u64;
    while block < end_block {
        let n = (ZERO_CHUNK_BLOCKS as u64).min(end_block - block) as usize;
        buf.set_blocks(n);
        let (b, result) = dev.write(block_offset(block), buf, Durability::Volatile).await;
        buf = b;
        result?;
        block += n as u64;
    }
    dev.flush().await?;
    // The anchor first, then the superblocks: a device whose format was cut
    // short has no superblock and reads as unformatted, not as half a log.
    buf.set_blocks(1);
    let anchor = Anchor {
        counter: 1,
        generation: 0,
        tail_seq: 1,
        inflight_blocks: 0,
        floor_seq: 1,
    };
    // Both slots, like every anchor write (see `log::core`).
    for block in ANCHOR_BLOCKS {
        let offset = block_offset(block);
        anchor.encode(&mut buf, sb.device_id, offset);
        let (b, result) = dev.write(offset, buf, Durability::Durable).await;
        buf = b;
        result?;
    }
    for (copy, block) in SUPERBLOCK_BLOCKS.into_iter().enumerate() {
        let offset = block_offset(block);
        sb.encode(&mut buf, copy as u64, offset);
        let (b, result) = dev.write(offset, buf, Durability::Durable).await;
        buf = b;
        result?;
    }
    Ok(sb)
}

async fn refuse_if_in_use<D: BlockIo>(dev: &D) -> Result<(), FormatError> {
    match read_superblock(dev).await {
        Ok(read) => {
            return Err(FormatError::AlreadyFormatted {
                node_id: read.superblock.node_id,
                created_unix_secs: read.superblock.created_unix_secs,
            });
        }
        Err(OpenError::Io(e)) => return Err(e.into()),
        Err(_) => {}
    }
    // Anything non-zero in the metadata area means someone else's data.
    let buf = AlignedBuf::zeroed_blocks(METADATA_BLOCKS as usize);
    let (buf, result) = dev.read(0, buf).await;
    result?;
    if let Some(i) = buf.iter().position(|&b| b != 0) {
        return Err(FormatError::HoldsData { offset: i as u64 });
    }
    Ok(())
}

/// 16 bytes from the kernel's CSPRNG; falls back to time and pid, which is
/// still unique enough to tell two devices apart.
fn new_device_id() -> DeviceId {
    let mut id = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id));
    if filled.is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id.copy_from_slice(&(nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    id
}

const _: () = assert!(ZERO_CHUNK_BLOCKS * BLOCK_SIZE == 1024 * 1024);
