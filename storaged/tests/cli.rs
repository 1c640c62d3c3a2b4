//! `storaged format` as an operator runs it.

use std::path::Path;
use std::process::{Command, Output};

mod support;

fn tempdir() -> tempfile::TempDir {
    support::tempdir("storaged-cli-")
}

fn storaged(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_storaged"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn format(device: &Path, extra: &[&str]) -> Output {
    let device = device.to_str().unwrap();
    let mut args = vec!["format", "--device", device, "--node-id", "3"];
    args.extend_from_slice(extra);
    storaged(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn format_creates_refuses_to_overwrite_and_forces() {
    let dir = tempdir();
    let dev = dir.path().join("dev0");
    let out = format(&dev, &["--size", "32m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), 32 << 20);
    assert!(String::from_utf8_lossy(&out.stdout).contains("node 3"));
    let before = std::fs::read(&dev).unwrap();

    let out = format(&dev, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already formatted") && stderr(&out).contains("--force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&dev).unwrap(), before, "a refused format must not write");

    let out = format(&dev, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(std::fs::read(&dev).unwrap()[..4096], before[..4096], "a new device id");
}

#[test]
fn format_explains_bad_input() {
    let dir = tempdir();
    let missing = dir.path().join("missing");
    let out = format(&missing, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pass --size"), "{}", stderr(&out));

    let out = format(&missing, &["--size", "1m"]);
    assert_eq!(out.status.code(), Some(2), "a size out of range is a usage error");
    assert!(
        stderr(&out).contains("too small") || stderr(&out).contains("at least"),
        "{}",
        stderr(&out)
    );

    let out = format(&dir.path().join("x"), &["--size", "12q"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(stderr(&out).contains("unknown size suffix"), "{}", stderr(&out));

    let out = format(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    let dev = dir.path().join("small");
    let out = format(&dev, &["--size", "8m", "--log-size", "8m"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not fit"), "{}", stderr(&out));

    // Someone else's data in the first MiB: refused, untouched.
    let foreign = dir.path().join("foreign");
    let mut bytes = vec![0u8; 8 << 20];
    bytes[5000] = 1;
    std::fs::write(&foreign, &bytes).unwrap();
    let out = format(&foreign, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("holds data"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&foreign).unwrap(), bytes);
}

/// `storaged run` on `device` with stderr in `stderr_path`, killed by PID
/// when dropped. Returns once it prints "listening on".
struct Node {
    child: std::process::Child,
}

impl Node {
    fn start(device: &Path, stderr_path: &Path) -> Node {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_storaged"))
            .args(["run", "--device", device.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on ") {
                    let _ = tx.send(());
                }
            }
        });
        let node = Node { child };
        if rx.recv_timeout(std::time::Duration::from_secs(30)).is_err() {
            panic!(
                "storaged run did not start listening: {}",
                std::fs::read_to_string(stderr_path).unwrap_or_default()
            );
        }
        node
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_served_device_is_refused_to_every_other_writer() {
    let dir = tempdir();
    let dev = dir.path().join("dev0");
    assert!(format(&dev, &["--size", "16m"]).status.success());
    let node = Node::start(&dev, &dir.path().join("run.err"));
    let pid = node.child.id();
    let before = std::fs::read(&dev).unwrap();
    let in_use = format!("device {} is in use by pid {pid}", dev.display());

    let out = format(&dev, &["--force"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&in_use), "{}", stderr(&out));
    // Re-creating it at another size is refused the same way.
    let out = format(&dev, &["--force", "--size", "8m"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&in_use), "{}", stderr(&out));
    // The node itself writes its scrubber's progress (blocks 4 and 5).
    let without_progress = |mut d: Vec<u8>| {
        d[4 * 4096..6 * 4096].fill(0);
        d
    };
    assert!(
        without_progress(std::fs::read(&dev).unwrap()) == without_progress(before.clone()),
        "a refused format must not write"
    );

    let out = storaged_bounded(&["run", "--device", dev.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&in_use), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains(&format!("opening {}", dev.display())),
        "the path is named once: {}",
        stderr(&out)
    );
    drop(node);

    // The lock went with the process: the device is free again.
    let out = format(&dev, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn run_help_shows_metrics() {
    let out = storaged(&["run", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--metrics <METRICS>"), "{help}");
    assert!(help.contains("/metrics"), "{help}");
}

#[test]
fn run_refuses_a_metrics_address_it_cannot_bind_naming_it() {
    let dir = tempdir();
    let dev = dir.path().join("dev0");
    assert!(format(&dev, &["--size", "16m"]).status.success());
    // Held by this test for as long as the node tries to bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = storaged_bounded(&[
        "run",
        "--device",
        dev.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("serving metrics on {addr}")),
        "{}",
        stderr(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "no ready line before the metrics are served"
    );
    drop(taken);
    // A usage error (exit 2) for an address that is not one.
    let out = storaged(&[
        "run",
        "--device",
        dev.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "localhost",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--metrics"), "{}", stderr(&out));
}

#[test]
fn format_names_one_minimum_and_leaves_nothing_when_it_fails() {
    let dir = tempdir();
    let mut minimums = Vec::new();
    for size in ["1k", "1m", "4095k"] {
        let dev = dir.path().join(format!("dev-{size}"));
        let out = format(&dev, &["--size", size]);
        assert_eq!(out.status.code(), Some(2), "{size}: {}", stderr(&out));
        let msg = stderr(&out);
        let min = msg
            .split("at least ")
            .nth(1)
            .map(|m| m.split_whitespace().next().unwrap().to_owned());
        minimums.push(min.unwrap_or_else(|| panic!("{size}: no minimum in: {msg}")));
        assert!(!dev.exists(), "{size}: a failed format left its file behind");
    }
    assert!(minimums.iter().all(|m| m == &minimums[0]), "{minimums:?}");

    // Fails after creating the file (the log does not fit): removed.
    let dev = dir.path().join("log-too-big");
    let out = format(&dev, &["--size", "8m", "--log-size", "8m"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!dev.exists(), "a failed format left its file behind");

    // A file that was there before stays, whatever happens.
    let dev = dir.path().join("old");
    std::fs::write(&dev, vec![0u8; 8 << 20]).unwrap();
    let out = format(&dev, &["--log-size", "8m"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), 8 << 20);

    // 0 marks storbench's scratch devices: not a node id.
    let out = storaged(&["format", "--device", dev.to_str().unwrap(), "--node-id", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("node ids start at 1"), "{}", stderr(&out));
}

#[test]
fn records_of_unknown_segments_are_reported_once() {
    use std::sync::Arc;
    use storaged::io::uring::{UringConfig, UringDevice};
    use storaged::log::{LogConfig, LogEngine};
    use storaged::record::{RecordBody, RedoRecord, SegmentId};

    let dir = tempdir();
    let dev = dir.path().join("dev0");
    assert!(format(&dev, &["--size", "16m"]).status.success());
    // What another program (storbench --force) leaves in a node's log:
    // records of segments the node's table does not hold.
    const RECORDS: u64 = 500;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let device = Arc::new(UringDevice::open(&dev, &UringConfig::default()).unwrap());
        let opened = LogEngine::open(device, LogConfig::default(), |_, _| {}).await.unwrap();
        for lsn in 1..=RECORDS {
            let record = RedoRecord {
                segment: SegmentId {
                    volume: 9,
                    pg: (lsn % 3) as u32,
                },
                lsn: 100 + lsn,
                prev_lsn_pg: 99 + lsn,
                prev_lsn_page: 0,
                page: 0,
                cpl: true,
                body: RecordBody::PageDelta {
                    offset: 0,
                    bytes: vec![1; 16],
                },
            };
            opened.engine.append(record.encode()).await.unwrap();
        }
        drop(opened.engine);
        opened.driver.await.unwrap();
    });
    let err_path = dir.path().join("run.err");
    let node = Node::start(&dev, &err_path);
    drop(node);
    let log = strip_ansi(&std::fs::read_to_string(&err_path).unwrap());
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("unknown") || l.contains("no table entry"))
        .collect();
    assert_eq!(lines.len(), 1, "one line, not one per record: {log}");
    for needle in [
        format!("records={RECORDS}"),
        "segments=3".to_owned(),
        "lsn_min=101".to_owned(),
        format!("lsn_max={}", 100 + RECORDS),
    ] {
        assert!(lines[0].contains(&needle), "`{needle}` not in: {}", lines[0]);
    }
}

/// The log's text without terminal colour codes (ESC [ ... m).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `storaged` with arguments that should make it exit (a `run` that is
/// refused), killed by PID if it is still running after 30 s.
fn storaged_bounded(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_storaged"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: a signal to our own child, by its PID.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("storaged {args:?} kept running: it was not refused");
        }
    }
}

#[test]
fn run_refuses_a_storbench_scratch_device() {
    use storaged::io::uring::{UringConfig, UringDevice};
    use storaged::log::mkfs::{FormatOptions, SCRATCH_NODE_ID, format};
    let dir = tempdir();
    let dev = dir.path().join("scratch");
    storaged::io::device::create_zero_filled(&dev, 16 << 20).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let device = UringDevice::open(&dev, &UringConfig::default()).unwrap();
        let opts = FormatOptions {
            node_id: SCRATCH_NODE_ID,
            log_bytes: None,
            force: false,
        };
        format(&device, opts).await.unwrap();
    });
    let out = storaged_bounded(&["run", "--device", dev.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("storbench scratch device"), "{}", stderr(&out));
}
