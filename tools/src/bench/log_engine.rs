//! `--engine log`: appends redo records through storaged's log engine,
//! in-process, and times each append from call to durable acknowledgement.
//!
//! `--iodepth` appenders per job (`--numjobs` jobs) share one engine on one
//! device, as a storage node's connections do. `--bs` is the log space one
//! record takes, framing included, so bytes/s compares directly with fio's: a
//! 4 KiB record fills exactly one 4 KiB block (4040 bytes of payload after the
//! block header, less 3 bytes of fragment header), and 32 records of 128
//! bytes share one block. A releaser frees the log behind the durable mark
//! whenever it is half full, so a long run wraps the log as a node in steady
//! state does.
//!
//! The device is storbench's own scratch device: a file that does not exist
//! is created and formatted with [`SCRATCH_NODE_ID`]. A device `storaged
//! format` made for a storage node is refused unless `--force` (the node would
//! find storbench's records in its log), and a device another process has
//! open is always refused (its lock, see `storaged::io::lock`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use storaged::io::BLOCK_SIZE;
use storaged::io::device::create_zero_filled;
use storaged::io::uring::{RingPlacement, UringConfig, UringDevice};
use storaged::log::format::PAYLOAD_MAX_BYTES;
use storaged::log::frag::FRAG_HEADER_BYTES;
use storaged::log::mkfs::{FormatOptions, SCRATCH_NODE_ID, format};
use storaged::log::recovery::{read_anchor, read_superblock, scan_log};
use storaged::log::{LogConfig, LogEngine, OpenError};
use storaged::record::LogEntry;
use storaged::record::{RECORD_HEADER_BYTES, RecordBody, RedoRecord, SegmentId};

use super::stats::{DirStats, JobStats};
use super::{BenchArgs, Engine, Rw};

/// Device size when the file does not exist and --size is not given.
const DEVICE_BYTES_DEFAULT: u64 = 1 << 30;
/// Appends per job when neither --runtime nor --size bounds the run.
const RECORDS_DEFAULT: u64 = 100_000;

pub struct LogBench;

/// Entry bytes that make a record take `bs` bytes of log, framing included.
pub fn entry_bytes_for(bs: u64) -> Result<usize> {
    let share = (bs as u128 * PAYLOAD_MAX_BYTES as u128 / BLOCK_SIZE as u128) as usize;
    let entry = share.saturating_sub(FRAG_HEADER_BYTES);
    if entry < RECORD_HEADER_BYTES {
        bail!("--bs {bs} is too small for a redo record: at least 64 bytes");
    }
    if entry - RECORD_HEADER_BYTES > storaged::record::RECORD_PAYLOAD_MAX_BYTES {
        bail!("--bs {bs} is too large for a redo record: at most 64k");
    }
    Ok(entry)
}

impl Engine for LogBench {
    fn run(&self, args: &BenchArgs) -> Result<Vec<JobStats>> {
        if args.rw() != Rw::Write {
            bail!("--engine log appends: use --rw write (the default for this engine)");
        }
        let path = args
            .filename
            .as_deref()
            .ok_or_else(|| anyhow!("--engine log needs --filename DEVICE"))?;
        let entry_bytes = entry_bytes_for(args.bs)?;
        let config = LogConfig {
            write_blocks_max: args.log_write_blocks,
            writes_inflight_max: args.log_writes_inflight,
            durability: args.log_durability.into(),
            ..LogConfig::default()
        };
        config.validate().map_err(|e| anyhow!("log engine settings: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        rt.block_on(run(args, path, entry_bytes, config))
    }
}

/// Opens (locked, for writing) the device at `path`, creating and formatting
/// it as a scratch device if it does not exist; refuses a storage node's
/// device unless `force`.
pub async fn open_or_create(
    path: &Path,
    size: Option<u64>,
    placement: RingPlacement,
    force: bool,
) -> Result<Arc<UringDevice>> {
    let fresh = !path.exists();
    if fresh {
        let size = size.unwrap_or(DEVICE_BYTES_DEFAULT);
        storaged::errln!(
            "storbench: creating {} ({} MiB) and formatting it",
            path.display(),
            size >> 20
        );
        create_zero_filled(path, size)?;
    }
    let opened = open_and_check(path, placement, fresh, force).await;
    if opened.is_err() && fresh {
        // Leave nothing of a scratch device that could not be made.
        let _ = std::fs::remove_file(path);
    }
    opened
}

async fn open_and_check(path: &Path, placement: RingPlacement, fresh: bool, force: bool) -> Result<Arc<UringDevice>> {
    // The device names its path in its errors; the lock is held until the
    // last clone of the device is dropped.
    let dev = Arc::new(UringDevice::open(
        path,
        &UringConfig {
            placement,
            ..UringConfig::default()
        },
    )?);
    if fresh {
        format(
            dev.as_ref(),
            FormatOptions {
                node_id: SCRATCH_NODE_ID,
                log_bytes: None,
                force: false,
            },
        )
        .await
        .with_context(|| format!("formatting {}", path.display()))?;
    } else {
        refuse_node_device(&dev, path, force).await?;
    }
    Ok(dev)
}

/// A device `storaged format` made (any node id but [`SCRATCH_NODE_ID`]) is
/// a storage node's: storbench's records in its log are records of segments
/// the node never had. Refused unless `force`, with what the device holds.
async fn refuse_node_device(dev: &Arc<UringDevice>, path: &Path, force: bool) -> Result<()> {
    // An unformatted or damaged device is reported by the log's open.
    let Ok(read) = read_superblock(dev.as_ref()).await else {
        return Ok(());
    };
    let sb = read.superblock;
    if sb.node_id == SCRATCH_NODE_ID {
        return Ok(());
    }
    let segments = match storaged::segtable::read(dev.as_ref(), &sb.device_id).await {
        Ok(table) => table.table.entries.len().to_string(),
        Err(_) => "unknown".to_owned(),
    };
    let mut records = 0u64;
    let counted = match read_anchor(dev.as_ref(), &sb).await {
        Ok(anchor) => scan_log(dev, &sb, anchor, |_, entry| {
            if let Ok(LogEntry::Record(_)) = LogEntry::decode(&entry) {
                records += 1;
            }
        })
        .await
        .is_ok(),
        Err(_) => false,
    };
    let records = if counted {
        records.to_string()
    } else {
        "unknown".to_owned()
    };
    let what = format!(
        "{} is storage node {}'s device ({segments} segments in its table, {records} records in its log)",
        path.display(),
        sb.node_id
    );
    if force {
        eprintln!("storbench: --force: writing into {what}");
        return Ok(());
    }
    bail!(
        "{what}: storbench would write records of segments the node never had into its log. \
         Name a scratch file instead (one that does not exist is created), or pass --force"
    )
}

async fn run(args: &BenchArgs, path: &Path, entry_bytes: usize, config: LogConfig) -> Result<Vec<JobStats>> {
    let dev = open_or_create(path, args.size, args.ring, args.force).await?;
    let opened = match LogEngine::open(dev, config, |_, _| {}).await {
        Ok(o) => o,
        Err(OpenError::NotFormatted) => bail!(
            "{} is not formatted: name a file that does not exist (storbench makes a scratch device of it), \
             not a storage node's device",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("opening the log on {}", path.display())),
    };
    let engine = opened.engine;
    let duration = args.duration();
    let records_per_job = match (duration, args.size) {
        (Some(_), _) => u64::MAX,
        (None, Some(size)) => (size / args.bs).max(1),
        (None, None) => RECORDS_DEFAULT,
    };
    let appenders = args.iodepth as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let max_acked = Arc::new(AtomicU64::new(0));

    let releaser = {
        let engine = engine.clone();
        let stop = stop.clone();
        let max_acked = max_acked.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let s = engine.stats();
                // Each release costs a durable anchor write: only when half full.
                if s.free_blocks < s.log_blocks / 2 {
                    engine.release(max_acked.load(Ordering::Relaxed));
                }
            }
        })
    };

    let start = Instant::now();
    let mut jobs = tokio::task::JoinSet::new();
    for job in 0..args.numjobs as u64 {
        for appender in 0..appenders {
            let engine = engine.clone();
            let stop = stop.clone();
            let max_acked = max_acked.clone();
            let quota = records_per_job / appenders + u64::from(appender < records_per_job % appenders);
            let payload = entry_bytes - RECORD_HEADER_BYTES;
            let lsn_base = (job * appenders + appender) << 40;
            jobs.spawn(async move {
                let mut stats = DirStats::default();
                for i in 0..quota {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let lsn = lsn_base + i + 1;
                    let record = RedoRecord {
                        segment: SegmentId {
                            volume: 1,
                            pg: (job * appenders + appender) as u32,
                        },
                        lsn,
                        prev_lsn_pg: lsn - 1,
                        prev_lsn_page: 0,
                        page: i % 1024,
                        cpl: true,
                        body: RecordBody::PageDelta {
                            offset: 0,
                            bytes: vec![lsn as u8; payload],
                        },
                    };
                    let entry = record.encode();
                    let t = Instant::now();
                    let seq = engine.append(entry).await.map_err(|e| anyhow!("append failed: {e}"))?;
                    let _ = stats.latency_ns.record((t.elapsed().as_nanos() as u64).max(1));
                    stats.ios += 1;
                    max_acked.fetch_max(seq, Ordering::Relaxed);
                }
                anyhow::Ok((job, stats))
            });
        }
    }
    let result = super::appenders::finish(jobs, stop.clone(), duration, args.numjobs, args.bs, start).await;
    let _ = releaser.await;
    drop(engine);
    opened.driver.await.context("log engine task")?;
    result
}
