//! `--engine uring`: raw I/O on a file or block device through io_uring and
//! `O_DIRECT`, shaped like fio's io_uring engine so the two compare directly.
//!
//! One thread per job, each with its own ring (set up like the storaged
//! device thread's, via [`storaged::io::uring::Ring`]) and the shared file
//! registered in it. The loop keeps `iodepth` I/Os in flight: prepare an SQE
//! for every free slot, then one `io_uring_enter` submits them and waits for at
//! least one completion (what fio does), then reap every available CQE.
//! Latency is submission to completion, stamped once per round on each side.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use io_uring::{opcode, squeue, types};
use storaged::io::device::{Access, DeviceKind, OpenOptions, create_zero_filled, open_device};
use storaged::io::uring::Ring;
use storaged::io::{AlignedBuf, BLOCK_SIZE};

use super::Engine;
use super::args::{BenchArgs, Rw, SyncMode};
use super::stats::{DirStats, JobStats};

/// Size of a file created for the run when --size does not say (as the log
/// engine's).
const FILE_BYTES_DEFAULT: u64 = 1 << 30;

/// Marks the `user_data` of a slot's fsync (`--fdatasync=1`) as opposed to its write.
const FSYNC_TAG: u64 = 1 << 63;

pub struct UringEngine;

/// The validated shape of a run.
#[derive(Debug, Clone)]
struct Plan {
    rw: Rw,
    bs: u64,
    iodepth: u32,
    iodepth_batch_submit: u32,
    numjobs: u32,
    /// Bytes of the file the offsets fall in: `[0, region_bytes)`, a multiple of bs.
    region_bytes: u64,
    /// Time-based runs stop at this; otherwise each job moves `region_bytes`.
    runtime: Option<Duration>,
    rw_flags: i32,
    fdatasync: bool,
}

impl Engine for UringEngine {
    fn run(&self, args: &BenchArgs) -> anyhow::Result<Vec<JobStats>> {
        let path = args
            .filename
            .as_deref()
            .context("--filename is required for --engine uring")?;
        prepare_file(path, args.size)?;
        // Writing takes the device's exclusive lock (refused while anyone has
        // it open); reading a shared one, and reads a device in use as it is.
        let access = if args.rw().is_write() {
            Access::Write
        } else {
            Access::Read
        };
        let opts = OpenOptions {
            access,
            ..OpenOptions::default()
        };
        let opened = open_device(path, &opts)?;
        if let Some(holder) = &opened.in_use_by {
            eprintln!(
                "storbench: note: {} is in use by {holder}; reading it anyway (its writer's I/O shares the device)",
                path.display()
            );
        }
        let device_bytes = opened.geometry.size_bytes;
        let region = match args.size {
            Some(size) if size > device_bytes => {
                bail!("--size {size} is larger than {} ({device_bytes} bytes)", path.display())
            }
            Some(size) => size,
            None => device_bytes,
        };
        let region_bytes = region - region % args.bs;
        if region_bytes == 0 {
            bail!("--size {region} is smaller than --bs {}", args.bs);
        }
        if opened.kind == DeviceKind::BlockDevice && args.rw().is_write() {
            storaged::errln!("storbench: writing to block device {}", path.display());
        }
        let plan = Plan {
            rw: args.rw(),
            bs: args.bs,
            iodepth: args.iodepth,
            iodepth_batch_submit: args.iodepth_batch_submit.min(args.iodepth),
            numjobs: args.numjobs,
            region_bytes,
            runtime: args.duration(),
            rw_flags: match args.sync {
                SyncMode::None => 0,
                SyncMode::Dsync => libc::RWF_DSYNC,
            },
            fdatasync: args.fdatasync == 1 && args.rw().is_write(),
        };
        let fd = opened.file.as_raw_fd();
        let barrier = Barrier::new(plan.numjobs as usize);
        let results: Vec<anyhow::Result<JobStats>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..plan.numjobs)
                .map(|job| {
                    let plan = &plan;
                    let barrier = &barrier;
                    scope.spawn(move || run_job(job, fd, plan, barrier))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("a job thread panicked")),
                })
                .collect()
        });
        // The file stays open until every job has drained its ring.
        drop(opened);
        results.into_iter().collect()
    }
}

/// Creates and zero-fills a missing file (--size bytes, default
/// [`FILE_BYTES_DEFAULT`]), so the run measures overwrites.
fn prepare_file(path: &Path, size: Option<u64>) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{} does not exist, and neither does its directory {}",
            path.display(),
            dir.display()
        );
    }
    let size = size.unwrap_or(FILE_BYTES_DEFAULT);
    storaged::errln!(
        "storbench: {} does not exist; creating it zero-filled, {} MiB (--size sets it)",
        path.display(),
        size >> 20
    );
    create_zero_filled(path, size)?;
    Ok(())
}

struct Slot {
    buf: AlignedBuf,
    offset: u64,
    submitted: Instant,
}

fn run_job(job: u32, fd: RawFd, plan: &Plan, barrier: &Barrier) -> anyhow::Result<JobStats> {
    let entries = plan.iodepth.next_power_of_two();
    let mut ring = Ring::new(entries).context("set up io_uring")?;
    ring.register_files(&[fd]).context("register the file with io_uring")?;
    let mut rng = fastrand::Rng::with_seed(0x5700_b3c4 ^ u64::from(job));
    let blocks = (plan.bs as usize) / BLOCK_SIZE;
    let now = Instant::now();
    let mut slots: Vec<Slot> = (0..plan.iodepth)
        .map(|_| {
            let mut buf = AlignedBuf::zeroed_blocks(blocks);
            // Non-zero, incompressible contents for writes.
            rng.fill(&mut buf);
            Slot {
                buf,
                offset: 0,
                submitted: now,
            }
        })
        .collect();
    let region_blocks = plan.region_bytes / plan.bs;
    let mut seq_next: u64 = (u64::from(job) * region_blocks / u64::from(plan.numjobs)) * plan.bs;
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    let mut hist = super::stats::new_latency_histogram();
    let mut ios: u64 = 0;
    let mut issued_bytes: u64 = 0;
    let mut inflight: usize = 0;
    let mut stopping = false;
    let mut first_error: Option<anyhow::Error> = None;

    barrier.wait();
    let start = Instant::now();
    let deadline = plan.runtime.map(|d| start + d);
    let mut end = start;
    // SQEs pushed since the last submit: fio's `iodepth_batch_submit`.
    let mut unsubmitted: u32 = 0;
    let (submitter, mut sq, mut cq) = ring.ring.split();
    loop {
        if !stopping && !free.is_empty() {
            let now = Instant::now();
            while let Some(i) = free.pop() {
                if deadline.is_none() && issued_bytes >= plan.region_bytes {
                    free.push(i);
                    stopping = true;
                    break;
                }
                let offset = if plan.rw.is_random() {
                    rng.u64(0..region_blocks) * plan.bs
                } else {
                    let o = seq_next;
                    seq_next = (seq_next + plan.bs) % plan.region_bytes;
                    o
                };
                let slot = &mut slots[i];
                slot.offset = offset;
                slot.submitted = now;
                let entry = rw_entry(plan, slot, i as u64);
                // SAFETY: the slot's buffer lives in `slots` until this
                // function has reaped every in-flight I/O.
                if unsafe { sq.push(&entry) }.is_err() {
                    // Cannot happen (the ring has ≥ iodepth entries), but if
                    // it did, in-flight buffers must outlive the kernel's use.
                    std::mem::forget(slots);
                    bail!("submission queue full");
                }
                inflight += 1;
                issued_bytes += plan.bs;
                unsubmitted += 1;
                // When no slot is left to fill, the enter below submits and
                // waits in one syscall; submitting here too would cost one more.
                if unsubmitted >= plan.iodepth_batch_submit && !free.is_empty() {
                    sq.sync();
                    unsubmitted = 0;
                    if let Err(e) = submit_now(&submitter) {
                        std::mem::forget(slots);
                        return Err(e).context("io_uring_enter (submit)");
                    }
                }
            }
            sq.sync();
        }
        if inflight == 0 {
            break;
        }
        unsubmitted = 0;
        match submitter.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                // The ring is unusable and the kernel may still own buffers:
                // leak them rather than free memory it could write to.
                std::mem::forget(slots);
                return Err(e).context("io_uring_enter");
            }
        }
        let now = Instant::now();
        // Learn which SQEs the kernel consumed, so pushes below see the room.
        sq.sync();
        cq.sync();
        for cqe in &mut cq {
            let tag = cqe.user_data();
            let i = (tag & !FSYNC_TAG) as usize;
            let res = cqe.result();
            let is_fsync = tag & FSYNC_TAG != 0;
            let expected = if is_fsync { 0 } else { plan.bs as i32 };
            if res != expected {
                let op = if is_fsync {
                    "fdatasync"
                } else if plan.rw.is_write() {
                    "write"
                } else {
                    "read"
                };
                let what = if res < 0 {
                    std::io::Error::from_raw_os_error(-res).to_string()
                } else {
                    format!("short: {res} of {expected} bytes")
                };
                first_error.get_or_insert_with(|| anyhow::anyhow!("{op} at offset {} failed: {what}", slots[i].offset));
                stopping = true;
                inflight -= 1;
                continue;
            }
            if plan.fdatasync && !is_fsync {
                // The write is done; its durability is the fsync's completion.
                let entry = opcode::Fsync::new(types::Fixed(0))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(i as u64 | FSYNC_TAG);
                // SAFETY: an fsync carries no buffer. The slot's write SQE
                // was consumed, so there is room.
                if unsafe { sq.push(&entry) }.is_err() {
                    std::mem::forget(slots);
                    bail!("submission queue full");
                }
                continue;
            }
            inflight -= 1;
            ios += 1;
            hist.saturating_record(now.duration_since(slots[i].submitted).as_nanos() as u64);
            free.push(i);
        }
        sq.sync();
        end = now;
        if deadline.is_some_and(|d| now >= d) {
            stopping = true;
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let dir = DirStats {
        ios,
        bytes: ios * plan.bs,
        runtime: end.duration_since(start),
        latency_ns: hist,
        dropped: 0,
    };
    let mut stats = JobStats::default();
    if plan.rw.is_write() {
        stats.write = dir;
    } else {
        stats.read = dir;
    }
    Ok(stats)
}

/// Submits what is queued without waiting, retrying on EINTR.
fn submit_now(submitter: &io_uring::Submitter<'_>) -> std::io::Result<()> {
    loop {
        match submitter.submit() {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

fn rw_entry(plan: &Plan, slot: &mut Slot, user_data: u64) -> squeue::Entry {
    let len = plan.bs as u32;
    if plan.rw.is_write() {
        opcode::Write::new(types::Fixed(0), slot.buf.as_ptr(), len)
            .offset(slot.offset)
            .rw_flags(plan.rw_flags)
            .build()
            .user_data(user_data)
    } else {
        opcode::Read::new(types::Fixed(0), slot.buf.as_mut_ptr(), len)
            .offset(slot.offset)
            .build()
            .user_data(user_data)
    }
}
