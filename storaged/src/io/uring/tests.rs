use std::process::Command;
use std::time::Duration;

use super::*;
use crate::io::BLOCK_SIZE;
use crate::io::device::create_zero_filled;
use crate::io::device::tests::scratch_dir;

/// Every test's upper bound; far above what they need.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

fn open_file_device(dir: &tempfile::TempDir, size: u64, config: &UringConfig) -> UringDevice {
    let path = dir.path().join("dev.dat");
    create_zero_filled(&path, size).expect("create");
    UringDevice::open(&path, config).expect("open")
}

fn pattern(blocks: usize, seed: u8) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed_blocks(blocks);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = seed.wrapping_add((i % 251) as u8);
    }
    buf
}

fn config(placement: RingPlacement) -> UringConfig {
    UringConfig {
        placement,
        ..UringConfig::default()
    }
}

/// Each test below runs with the ring on its own thread and on the runtime.
macro_rules! in_both_placements {
    ($(#[$attr:meta] $name:ident;)*) => {
        mod thread {
            $(
                #[$attr]
                async fn $name() {
                    super::$name(super::RingPlacement::Thread).await
                }
            )*
        }
        mod runtime {
            $(
                #[$attr]
                async fn $name() {
                    super::$name(super::RingPlacement::Runtime).await
                }
            )*
        }
    };
}

in_both_placements! {
    #[tokio::test] write_then_read_back;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)] concurrent_io_from_many_tasks;
    #[tokio::test] out_of_range_is_refused;
    #[tokio::test] durable_write_and_flush;
    #[tokio::test] dropped_callers_and_device_do_not_lose_io;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)] background_io_is_bounded_and_lands_as_foreground_io_does;
}

/// `io` does not complete while `held` is held, and does once it is let go.
async fn waits_for(held: impl Sized, io: impl Future<Output = IoOutcome>, what: &str) {
    tokio::pin!(io);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut io).await.is_err(),
        "{what}: went on"
    );
    drop(held);
    let (_, res) = io.await;
    res.unwrap_or_else(|e| panic!("{what}: once let go, failed: {e}"));
}

/// Background I/O goes to the kernel at the idle priority class (which
/// needs no privilege) and at most `background_inflight` at once: many
/// tasks' background writes and reads, beside foreground ones, all land
/// and read back right, and none of the foreground waits for a
/// background permit.
async fn background_io_is_bounded_and_lands_as_foreground_io_does(placement: RingPlacement) {
    let dir = scratch_dir();
    let config = UringConfig {
        background_inflight: 2,
        ..config(placement)
    };
    let dev = Arc::new(open_file_device(&dir, 8 << 20, &config));
    bounded(async {
        // Every permit taken: a foreground I/O still goes through.
        let held: Vec<_> = (0..2)
            .map(|_| dev.inner.background.try_acquire().expect("a free permit"))
            .collect();
        let (_, res) = dev.write(0, pattern(1, 1), Durability::Durable).await;
        res.expect("a foreground write does not wait for background permits");
        let waiting = dev.read_background(0, AlignedBuf::zeroed_blocks(1));
        waits_for(held, waiting, "a background read while every background permit is held").await;
        // A large one counts for its bytes: with one permit of two held,
        // a 64 KiB read (two of them) waits.
        let held = dev.inner.background.try_acquire().expect("a free permit");
        let large = dev.read_background(0, AlignedBuf::zeroed_blocks(16));
        waits_for(held, large, "a 64 KiB background read while one of two permits is held").await;
        let (_, res) = dev.read_background(0, AlignedBuf::zeroed_blocks(256)).await;
        res.expect("one larger than the whole bound takes all of it, and goes");

        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let dev = Arc::clone(&dev);
            tasks.push(tokio::spawn(async move {
                let at = (i + 1) * 3 * BLOCK_SIZE as u64;
                let buf = pattern(3, i as u8);
                let expected = buf.to_vec();
                let (_, res) = if i % 2 == 0 {
                    dev.write_background(at, buf, Durability::Volatile).await
                } else {
                    dev.write(at, buf, Durability::Volatile).await
                };
                res.expect("write");
                let (back, res) = dev.read_background(at, AlignedBuf::zeroed_blocks(3)).await;
                res.expect("background read");
                assert_eq!(&back[..], &expected[..], "block {i}");
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(dev.inner.background.available_permits(), 2, "every permit is back");
    })
    .await;
}

#[test]
fn a_background_io_costs_one_for_each_32_kib_it_starts_within_the_bound() {
    assert_eq!(background_cost(4096, 16), 1);
    assert_eq!(background_cost(12 << 10, 16), 1);
    assert_eq!(background_cost(32 << 10, 16), 1);
    assert_eq!(background_cost((32 << 10) + 4096, 16), 2);
    assert_eq!(background_cost(2 << 20, 16), 16, "at most the whole bound");
    assert_eq!(background_cost(2 << 20, 1), 1);
    assert_eq!(background_cost(0, 0), 1);
}

async fn write_then_read_back(placement: RingPlacement) {
    let dir = scratch_dir();
    let dev = open_file_device(&dir, 4 << 20, &config(placement));
    assert_eq!(dev.info().placement, placement);
    assert_eq!(dev.geometry().size_bytes, 4 << 20);
    assert_eq!(dev.info().kind, DeviceKind::RegularFile);
    bounded(async {
        let (buf, res) = dev.write(8192, pattern(3, 7), Durability::Volatile).await;
        res.expect("write");
        let expected = buf.to_vec();
        let (back, res) = dev.read(8192, AlignedBuf::zeroed_blocks(3)).await;
        res.expect("read");
        assert_eq!(&back[..], &expected[..]);
    })
    .await;
}

async fn concurrent_io_from_many_tasks(placement: RingPlacement) {
    let dir = scratch_dir();
    // Small bounds so that backpressure (full channel, max in flight) is exercised.
    let config = UringConfig {
        channel_capacity: 4,
        max_inflight: 8,
        ..config(placement)
    };
    let dev = open_file_device(&dir, 8 << 20, &config);
    const TASKS: u64 = 64;
    const IOS_PER_TASK: u64 = 16;
    bounded(async {
        let mut handles = Vec::new();
        for task in 0..TASKS {
            let dev = dev.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..IOS_PER_TASK {
                    let offset = (task * IOS_PER_TASK + i) * BLOCK_SIZE as u64;
                    let seed = (task * 31 + i) as u8;
                    let (_, res) = dev.write(offset, pattern(1, seed), Durability::Volatile).await;
                    res.expect("write");
                    let (back, res) = dev.read(offset, AlignedBuf::zeroed_blocks(1)).await;
                    res.expect("read");
                    assert_eq!(&back[..], &pattern(1, seed)[..], "block at {offset}");
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
    })
    .await;
}

async fn out_of_range_is_refused(placement: RingPlacement) {
    let dir = scratch_dir();
    let dev = open_file_device(&dir, 1 << 20, &config(placement));
    bounded(async {
        let (_, res) = dev.read(1 << 20, AlignedBuf::zeroed_blocks(1)).await;
        assert!(matches!(res, Err(IoError::OutOfRange { .. })), "{res:?}");
        let (_, res) = dev.read(100, AlignedBuf::zeroed_blocks(1)).await;
        assert!(matches!(res, Err(IoError::OutOfRange { .. })), "{res:?}");
        let (_, res) = dev
            .write(u64::MAX - 4095, AlignedBuf::zeroed_blocks(1), Durability::Durable)
            .await;
        assert!(matches!(res, Err(IoError::OutOfRange { .. })), "{res:?}");
        // The device still works afterwards.
        let (_, res) = dev.read(0, AlignedBuf::zeroed_blocks(1)).await;
        res.expect("read");
    })
    .await;
}

async fn durable_write_and_flush(placement: RingPlacement) {
    let dir = scratch_dir();
    let dev = open_file_device(&dir, 1 << 20, &config(placement));
    bounded(async {
        let (_, res) = dev.write(0, pattern(2, 1), Durability::Durable).await;
        res.expect("durable write");
        let (_, res) = dev.write(16384, pattern(1, 2), Durability::Volatile).await;
        res.expect("volatile write");
        dev.flush().await.expect("flush");
        let (back, res) = dev.read(16384, AlignedBuf::zeroed_blocks(1)).await;
        res.expect("read");
        assert_eq!(&back[..], &pattern(1, 2)[..]);
    })
    .await;
}

async fn dropped_callers_and_device_do_not_lose_io(placement: RingPlacement) {
    let dir = scratch_dir();
    let dev = open_file_device(&dir, 1 << 20, &config(placement));
    bounded(async {
        // Start a write and abandon it after it was sent: the device keeps the
        // buffer until the completion, then drops it.
        {
            let fut = dev.write(0, pattern(1, 9), Durability::Volatile);
            let _ = tokio::time::timeout(Duration::from_micros(1), fut).await;
        }
        let clone = dev.clone();
        drop(dev);
        let (_, res) = clone.read(0, AlignedBuf::zeroed_blocks(1)).await;
        res.expect("the clone still works");
        drop(clone);
    })
    .await;
}

/// Detaches the loop device on drop, so a failing test does not leak it.
struct LoopGuard(String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[tokio::test]
async fn loop_device_is_a_block_device() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loop devices need root");
        return;
    }
    let dir = scratch_dir();
    let backing = dir.path().join("loop.img");
    create_zero_filled(&backing, 8 << 20).expect("create backing file");
    let out = match Command::new("losetup")
        .args(["--direct-io=on", "-f", "--show"])
        .arg(&backing)
        .output()
    {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: losetup not runnable: {e}");
            return;
        }
    };
    let loop_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let guard = LoopGuard(loop_path.clone());
    bounded(async {
        let dev = UringDevice::open(Path::new(&loop_path), &UringConfig::default()).expect("open");
        assert_eq!(dev.info().kind, DeviceKind::BlockDevice);
        assert_eq!(dev.geometry().size_bytes, 8 << 20);
        let lbs = dev.geometry().logical_block_bytes;
        assert!(lbs == 512 || lbs == 4096, "BLKSSZGET gave {lbs}");
        // A loop device's queue has a write_cache attribute in sysfs.
        assert!(dev.info().cache.write_cache.is_some(), "{:?}", dev.info().cache);
        let err = match UringDevice::open(Path::new(&loop_path), &UringConfig::default()) {
            Err(e) => e,
            Ok(_) => panic!("second open of {loop_path} succeeded despite O_EXCL"),
        };
        // EBUSY from O_EXCL, and the device's lock names the holder: us.
        assert!(
            matches!(&err, DeviceError::InUse { holder, .. } if holder.pid == Some(std::process::id())),
            "{err}"
        );
        assert!(err.to_string().contains("in use"), "{err}");
        let (_, res) = dev.write(4096, pattern(1, 5), Durability::Durable).await;
        res.expect("write");
        let (back, res) = dev.read(4096, AlignedBuf::zeroed_blocks(1)).await;
        res.expect("read");
        assert_eq!(&back[..], &pattern(1, 5)[..]);
        drop(dev);
    })
    .await;
    drop(guard);
}

#[test]
fn the_runtime_placement_needs_a_runtime() {
    let dir = scratch_dir();
    let path = dir.path().join("dev.dat");
    create_zero_filled(&path, 1 << 20).expect("create");
    let err = match UringDevice::open(&path, &config(RingPlacement::Runtime)) {
        Err(e) => e,
        Ok(_) => panic!("opened a runtime ring outside a runtime"),
    };
    assert!(err.to_string().contains("not inside a tokio runtime"), "{err}");
}

/// Polls `f` once, from inside a task.
async fn poll_once<F: Future>(mut f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_write_abandoned_when_its_runtime_stops_still_lands() {
    // The write is in the kernel, its caller gone, the runtime (and with it
    // the reaper) stopping: its buffer is kept until it completes, and the
    // data is there for the next open. Several rounds, as the write may
    // complete at its first poll, before the runtime stops; the test needs
    // some rounds where it did not.
    let dir = scratch_dir();
    let path = dir.path().join("dev.dat");
    create_zero_filled(&path, 1 << 20).expect("create");
    let mut abandoned = 0;
    for round in 0..20u8 {
        current_thread_runtime().block_on(bounded(async {
            let dev = open_once_released(&path, RingPlacement::Runtime).await;
            let mut fut = std::pin::pin!(dev.write(4096, pattern(1, round), Durability::Durable));
            if poll_once(fut.as_mut()).await.is_pending() {
                abandoned += 1;
            }
        }));
        current_thread_runtime().block_on(bounded(async {
            let dev = open_once_released(&path, RingPlacement::Thread).await;
            let (back, res) = dev.read(4096, AlignedBuf::zeroed_blocks(1)).await;
            res.expect("read");
            assert_eq!(&back[..], &pattern(1, round)[..], "round {round}");
        }));
    }
    assert!(
        abandoned > 0,
        "every write completed at its first poll; nothing was abandoned"
    );
}

/// Opens `path` once the device dropped before has let go of its lock. The
/// lock lives as long as any reference to the open file: the dropped
/// device's ring until it has drained, which may finish after the drop
/// returns, and a child forked meanwhile by a test running beside this one
/// (`losetup`), until it execs. Bounded by the caller.
async fn open_once_released(path: &Path, placement: RingPlacement) -> UringDevice {
    loop {
        match UringDevice::open(path, &config(placement)) {
            Ok(dev) => return dev,
            Err(DeviceError::InUse { .. }) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => panic!("open: {e}"),
        }
    }
}

#[test]
fn a_device_whose_runtime_stopped_refuses_io_instead_of_hanging() {
    let dir = scratch_dir();
    let path = dir.path().join("dev.dat");
    create_zero_filled(&path, 1 << 20).expect("create");
    let rt = current_thread_runtime();
    let dev = rt.block_on(async { UringDevice::open(&path, &config(RingPlacement::Runtime)).expect("open") });
    drop(rt);
    current_thread_runtime().block_on(bounded(async {
        let (_, res) = dev.write(0, pattern(1, 1), Durability::Durable).await;
        assert!(matches!(res, Err(IoError::Closed)), "{res:?}");
        assert!(matches!(dev.flush().await, Err(IoError::Closed)));
    }));
}

/// One durable write at a time: nothing but the reaper can hand each back.
async fn one_write_at_a_time(n: usize) {
    let dir = scratch_dir();
    let dev = open_file_device(&dir, 1 << 20, &config(RingPlacement::Runtime));
    for i in 0..n {
        let offset = ((i % 200) * BLOCK_SIZE) as u64;
        let (_, res) = bounded(dev.write(offset, pattern(1, i as u8), Durability::Durable)).await;
        res.expect("write");
    }
}

#[tokio::test]
async fn the_reaper_alone_hands_back_each_io() {
    one_write_at_a_time(300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_alone_hands_back_each_io_on_a_multi_thread_runtime() {
    // Submitted from a spawned task: submitter and reaper may run on different workers.
    tokio::spawn(one_write_at_a_time(300)).await.expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_io_in_flight_at_most_still_serves_many_tasks() {
    let dir = scratch_dir();
    let config = UringConfig {
        max_inflight: 1,
        ..config(RingPlacement::Runtime)
    };
    let dev = open_file_device(&dir, 1 << 20, &config);
    bounded(async {
        let handles: Vec<_> = (0..32u64)
            .map(|task| {
                let dev = dev.clone();
                tokio::spawn(async move {
                    let offset = task * BLOCK_SIZE as u64;
                    let (_, res) = dev.write(offset, pattern(1, task as u8), Durability::Durable).await;
                    res.expect("write");
                    let (back, res) = dev.read(offset, AlignedBuf::zeroed_blocks(1)).await;
                    res.expect("read");
                    assert_eq!(&back[..], &pattern(1, task as u8)[..]);
                })
            })
            .collect();
        for h in handles {
            h.await.expect("task");
        }
    })
    .await;
}

#[test]
fn placements_parse_from_their_names() {
    assert_eq!("runtime".parse::<RingPlacement>(), Ok(RingPlacement::Runtime));
    assert_eq!("thread".parse::<RingPlacement>(), Ok(RingPlacement::Thread));
    let err = "ring".parse::<RingPlacement>().unwrap_err();
    assert!(err.contains("\"runtime\" or \"thread\""), "{err}");
}

/// The kernel may answer `io_uring_enter` with EAGAIN after it did part of
/// the work (a partial submit under memory pressure). Here the first enter
/// of the device thread really runs (it arms the eventfd poll and sleeps
/// until the write below rings the eventfd) and then reports EAGAIN: the
/// retry reaps the poll's completion and must act on it, or the thread
/// waits for a completion it already took and the write never runs.
#[test]
fn an_eagain_after_a_real_enter_does_not_stall_the_device_thread() {
    let dir = scratch_dir();
    let path = dir.path().join("dev.dat");
    create_zero_filled(&path, 1 << 20).expect("create");
    INJECT_AGAIN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((path.clone(), 1));
    let dev = UringDevice::open(&path, &config(RingPlacement::Thread)).expect("open");
    let rt = current_thread_runtime();
    let done = rt.block_on(async {
        // Let the thread reach its first (injected) enter before writing.
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (_, res) = dev.write(0, pattern(1, 5), Durability::Durable).await;
            res.expect("write");
            let (back, res) = dev.read(0, AlignedBuf::zeroed_blocks(1)).await;
            res.expect("read");
            assert_eq!(&back[..], &pattern(1, 5)[..]);
        })
        .await
    });
    if done.is_err() {
        // The thread is stuck for good: leak the device rather than hang in
        // its drop, and fail.
        std::mem::forget(dev);
        panic!("the device thread never served the write after one EAGAIN");
    }
}
