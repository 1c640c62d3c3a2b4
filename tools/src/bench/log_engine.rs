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
use storaged::log::mkfs::{FormatOptions, format};
use storaged::log::{LogConfig, LogEngine, OpenError};
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

pub async fn open_or_create(path: &Path, size: Option<u64>, placement: RingPlacement) -> Result<Arc<UringDevice>> {
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
    let dev = Arc::new(
        UringDevice::open(
            path,
            &UringConfig {
                placement,
                ..UringConfig::default()
            },
        )
        .with_context(|| format!("opening {}", path.display()))?,
    );
    if fresh {
        format(
            dev.as_ref(),
            FormatOptions {
                node_id: 0,
                log_bytes: None,
                force: false,
            },
        )
        .await
        .with_context(|| format!("formatting {}", path.display()))?;
    }
    Ok(dev)
}

async fn run(args: &BenchArgs, path: &Path, entry_bytes: usize, config: LogConfig) -> Result<Vec<JobStats>> {
    let dev = open_or_create(path, args.size, args.ring).await?;
    let opened = match LogEngine::open(dev, config, |_, _| {}).await {
        Ok(o) => o,
        Err(OpenError::NotFormatted) => bail!(
            "{} is not formatted: run `storaged format --device {} --node-id N` first, or name a file that does not exist",
            path.display(),
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
