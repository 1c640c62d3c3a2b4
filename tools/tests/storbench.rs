//! storbench as a user runs it: a short real run, and the exit codes and
//! messages of bad input. Each run is bounded by its --runtime or fails fast.

use std::process::{Command, Output};

fn storbench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_storbench"))
        .args(args)
        .output()
        .expect("run storbench")
}

/// On a disk-backed filesystem: O_DIRECT may not work on a tmpfs /tmp.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("storbench-test-")
        .tempdir_in("/var/tmp")
        .expect("scratch dir")
}

#[test]
fn short_uring_run_prints_fio_json() {
    let dir = scratch_dir();
    let file = dir.path().join("bench.dat");
    let file_arg = format!("--filename={}", file.display());
    for rw in ["randwrite", "randread"] {
        let out = storbench(&[
            "--engine",
            "uring",
            &file_arg,
            "--size=4m",
            &format!("--rw={rw}"),
            "--bs=4k",
            "--iodepth=8",
            "--numjobs=2",
            "--runtime",
            "1",
            "--output-format=json",
        ]);
        assert!(out.status.success(), "{rw}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        let jobs = v["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 2, "one entry per job");
        let dir_key = if rw == "randread" { "read" } else { "write" };
        let other = if rw == "randread" { "write" } else { "read" };
        for job in jobs {
            assert!(job[dir_key]["total_ios"].as_u64().is_some_and(|n| n > 0));
            assert!(job[dir_key]["iops"].as_f64().is_some_and(|n| n > 0.0));
            assert_eq!(job[other]["total_ios"], 0);
        }
    }
    // A size-bound run (no runtime) moves exactly --size bytes per job.
    let out = storbench(&[
        &file_arg,
        "--rw=read",
        "--bs=64k",
        "--size=1m",
        "--output-format=json",
        "--group_reporting",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["jobs"][0]["read"]["io_bytes"], 1 << 20);
}

fn assert_fails(args: &[&str], code: i32, needle: &str) {
    let out = storbench(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: `{needle}` not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn usage_errors_exit_2_and_name_the_flag() {
    let dir = scratch_dir();
    let file = dir.path().join("bench.dat");
    let file_arg = format!("--filename={}", file.display());
    assert_fails(&["--bs=4x", &file_arg], 2, "unknown size suffix");
    assert_fails(&["--runtime=soon", &file_arg], 2, "not a duration");
    assert_fails(&["--rw=sideways", &file_arg], 2, "invalid value");
    // Every numeric flag refuses a value it cannot use, naming the flag.
    for (flag, needle) in [
        ("--bs=0", "--bs"),
        ("--size=0", "--size"),
        ("--iodepth=0", "--iodepth"),
        ("--numjobs=0", "--numjobs"),
        ("--grace=0", "--grace"),
        ("--runtime=0", "--runtime"),
        ("--cluster-connections=0", "--cluster-connections"),
        ("--node-connections=0", "--node-connections"),
        ("--log-write-blocks=0", "--log-write-blocks"),
        ("--device-size=0", "--device-size"),
        ("--local-cluster=3", "--local-cluster"),
        ("--pages-per-txn=0", "--pages-per-txn"),
    ] {
        let out = storbench(&["--engine=cluster", "--cluster=/nonexistent.toml", flag]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(needle), "{flag}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let grace = storbench(&["--engine=cluster", "--cluster=x", "--grace=0"]);
    assert!(!String::from_utf8_lossy(&grace.stderr).contains("runtime"));
    assert_fails(
        &[
            &file_arg,
            "--engine=log",
            "--log-write-blocks=4096",
            "--log-writes-inflight=4096",
        ],
        2,
        "--log-write-blocks and --log-writes-inflight",
    );
    assert_fails(
        &[&file_arg, "--size=4m", "--bs=1000", "--runtime=1"],
        2,
        "multiple of 4096",
    );
    // The cluster engine takes any --bs up to a page, but not --sync.
    assert_fails(
        &["--engine=cluster", "--cluster=x", "--sync=dsync"],
        2,
        "--sync is for --engine uring",
    );
    assert_fails(
        &[&file_arg, "--rw=commit", "--runtime=1"],
        2,
        "--rw commit is for --engine cluster",
    );
    let commit = storbench(&[&file_arg, "--rw=commit"]);
    assert!(!String::from_utf8_lossy(&commit.stderr).contains("not built"));
    assert_fails(&["--engine=cluster", "--runtime=1"], 2, "--cluster FILE");
    assert_fails(&["--engine=cluster", "--rw=randwrite", "--cluster=x"], 2, "--rw commit");
    assert_fails(
        &["--engine=cluster", "--verify", "--bs=8", "--cluster=x"],
        2,
        "at least 16",
    );
    assert_fails(
        &["--engine=cluster", "--cluster=x", "--verify-journal=j"],
        2,
        "--verify",
    );
    assert_fails(
        &["--engine=cluster", "--cluster=x", "--verify-only"],
        2,
        "--verify-journal",
    );
    assert_fails(
        &[&file_arg, "--engine=log", "--bs=32", "--runtime=1"],
        2,
        "too small for a redo record",
    );
    assert_fails(&[&file_arg, "--engine=node", "--bs=16k"], 2, "--bs");
    let help = storbench(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--filename",
        "--rw",
        "--bs",
        "--iodepth",
        "--numjobs",
        "--size",
        "--runtime",
        "--time_based",
        "--sync",
        "--output-format",
        "--engine",
        "--group_reporting",
        "--verify-journal",
        "--verify-only",
        "Exit status",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn failed_runs_exit_1_with_a_clear_message() {
    let dir = scratch_dir();
    assert_fails(
        &["--filename=/nonexistent-dir/x.dat", "--size=4m", "--runtime=1"],
        1,
        "does not exist",
    );
    assert_fails(
        &["--engine=cluster", "--cluster=/nonexistent.toml"],
        1,
        "nonexistent.toml",
    );
    // An existing file that is not a formatted device is never formatted over.
    let plain = dir.path().join("plain.dat");
    std::fs::write(&plain, vec![0u8; 8 << 20]).unwrap();
    let plain_arg = format!("--filename={}", plain.display());
    assert_fails(&[&plain_arg, "--engine=log", "--runtime=1"], 1, "not formatted");
    // A refused connection is said once, not once per layer.
    let out = storbench(&["--engine=node", "--node-addr=127.0.0.1:1", "--runtime=1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("refused").count(), 1, "{stderr}");
    // A node's log that fills up says what to change.
    let small = dir.path().join("small.dat");
    assert_fails(
        &[
            &format!("--filename={}", small.display()),
            "--engine=node",
            "--size=8m",
            "--bs=4k",
            "--iodepth=8",
            "--runtime=30",
        ],
        1,
        "give a larger --size",
    );
}

#[test]
fn uring_creates_a_missing_file_of_a_default_size() {
    // The README's command, on a file that does not exist yet.
    let dir = scratch_dir();
    let file = dir.path().join("f");
    let out = storbench(&[
        "--engine",
        "uring",
        "--filename",
        file.to_str().unwrap(),
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--iodepth",
        "32",
        "--runtime",
        "1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 30);
    assert!(String::from_utf8_lossy(&out.stdout).contains("read: IOPS="));
}

#[test]
fn log_engine_creates_formats_and_appends() {
    let dir = scratch_dir();
    let file = dir.path().join("log.dat");
    let file_arg = format!("--filename={}", file.display());
    for _ in 0..2 {
        // The first run creates and formats the device; the second reopens
        // and recovers it, and appends after what is there.
        let out = storbench(&[
            &file_arg,
            "--engine=log",
            "--size=16m",
            "--bs=128",
            "--iodepth=8",
            "--runtime=1",
            "--output-format=json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let w = &v["jobs"][0]["write"];
        assert!(w["total_ios"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(w["io_bytes"].as_u64().unwrap(), w["total_ios"].as_u64().unwrap() * 128);
        assert_eq!(v["jobs"][0]["read"]["total_ios"], 0);
    }
}

/// A device `storaged format` made for node 3 (through storaged's library,
/// as the binary does), 16 MiB.
fn node_device(dir: &std::path::Path) -> std::path::PathBuf {
    use storaged::io::device::create_zero_filled;
    use storaged::io::uring::{UringConfig, UringDevice};
    use storaged::log::mkfs::{FormatOptions, format};
    let path = dir.join("node3.dev");
    create_zero_filled(&path, 16 << 20).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dev = UringDevice::open(&path, &UringConfig::default()).unwrap();
        let opts = FormatOptions {
            node_id: 3,
            log_bytes: None,
            force: false,
        };
        format(&dev, opts).await.unwrap();
    });
    path
}

#[test]
fn log_and_node_engines_leave_a_storage_nodes_device_alone_unless_forced() {
    let dir = scratch_dir();
    let dev = node_device(dir.path());
    let before = std::fs::read(&dev).unwrap();
    let file_arg = format!("--filename={}", dev.display());
    for engine in ["--engine=log", "--engine=node"] {
        assert_fails(
            &[engine, &file_arg, "--bs=128", "--runtime=1"],
            1,
            "is storage node 3's device (0 segments in its table, 0 records in its log)",
        );
        assert_fails(&[engine, &file_arg, "--bs=128", "--runtime=1"], 1, "--force");
        assert_eq!(
            std::fs::read(&dev).unwrap(),
            before,
            "{engine}: a refused run must not write"
        );
    }
    let out = storbench(&["--engine=log", &file_arg, "--bs=128", "--runtime=1", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Now it also holds records: still refused without --force, and says so.
    let out = storbench(&["--engine=log", &file_arg, "--bs=128", "--runtime=1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains(" 0 records in its log"), "{stderr}");
}

/// `storaged run` from the directory of storbench (built if missing).
fn storaged_bin() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_BIN_EXE_storbench"))
        .parent()
        .unwrap()
        .to_owned();
    if !dir.join("storaged").is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", "-p", "storaged"]).status().unwrap();
        assert!(status.success(), "building storaged");
    }
    dir.join("storaged")
}

/// A child killed by PID when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_device_a_node_serves_is_refused_to_storbench_and_inspected_as_in_use() {
    use std::io::BufRead;
    let dir = scratch_dir();
    let dev = node_device(dir.path());
    let mut node = Killed(
        Command::new(storaged_bin())
            .args(["run", "--device", dev.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = node.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("listening on ") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("storaged run did not start listening");
    let pid = node.0.id();
    let before = std::fs::read(&dev).unwrap();
    let in_use = format!("device {} is in use by pid {pid}", dev.display());
    let file_arg = format!("--filename={}", dev.display());

    // --force overrides the node-device check, never the lock.
    for engine in ["--engine=log", "--engine=node"] {
        assert_fails(&[engine, &file_arg, "--bs=128", "--runtime=1", "--force"], 1, &in_use);
    }
    assert_fails(&[&file_arg, "--rw=randwrite", "--runtime=1"], 1, &in_use);
    // The node itself writes its scrubber's progress (blocks 4 and 5).
    let without_progress = |mut d: Vec<u8>| {
        d[4 * 4096..6 * 4096].fill(0);
        d
    };
    assert!(
        without_progress(std::fs::read(&dev).unwrap()) == without_progress(before.clone()),
        "a refused run must not write"
    );

    // Reading is harmless: it runs, and says whose device it reads.
    let out = storbench(&[&file_arg, "--rw=randread", "--size=1m", "--runtime=1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("in use by pid {pid}")), "{stderr}");

    // storctl inspect reads it too, and says first that a writer has it.
    let inspect = |json: bool| {
        let mut args = vec!["inspect", "--device", dev.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        Command::new(env!("CARGO_BIN_EXE_storctl"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = inspect(true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["in_use_by"]["pid"], pid, "{v}");
    let text = String::from_utf8_lossy(&inspect(false).stdout).into_owned();
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.starts_with("in use") && l.contains(&format!("pid {pid}"))),
        "{text}"
    );
    drop(node);
    let v: serde_json::Value = serde_json::from_slice(&inspect(true).stdout).expect("JSON");
    assert!(v["in_use_by"].is_null(), "{v}");
}
