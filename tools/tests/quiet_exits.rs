//! What every binary does at its edges, as a script sees it: output into a
//! closed pipe ends it quietly (by SIGPIPE, as it ends `cat`), logs carry no
//! colour codes when stderr is not a terminal, and --help lists the exit
//! statuses. Each run is short and bounded.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::{STORBENCH, STORCTL, assert_quiet_sigpipe, run, run_into_closed_pipe, text};

fn daemon(name: &str) -> std::path::PathBuf {
    support::ensure_daemons();
    Path::new(STORCTL).parent().unwrap().join(name)
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("quiet-exits-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// A formatted device (an empty node).
fn device(dir: &Path) -> String {
    let dev = dir.join("dev").to_string_lossy().into_owned();
    let out = Command::new(daemon("storaged"))
        .args(["format", "--device", &dev, "--node-id", "1", "--size", "32m"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    dev
}

#[test]
fn storctl_into_a_closed_pipe_exits_quietly() {
    let dir = scratch();
    let dev = device(dir.path());
    for json in [true, false] {
        let mut args = vec!["inspect", "--device", &dev];
        if json {
            args.push("--json");
        }
        let out = run_into_closed_pipe(STORCTL, &args);
        assert_quiet_sigpipe(&format!("storctl {args:?}"), &out);
    }
    // status of a cluster that is not running: the report (every node down)
    // still goes to stdout first.
    let file = dir.path().join("cluster.toml");
    let mut toml = String::from(
        "[volume]\nid = 1\npage_bytes = 8192\npg_pages = 16\npgs = 1\n\n[computed]\naddress = \"127.0.0.1:1\"\n",
    );
    for i in 1..=6 {
        toml.push_str(&format!(
            "\n[[nodes]]\nid = {i}\naddress = \"127.0.0.1:{}\"\naz = \"az{}\"\n",
            i + 1,
            (i - 1) % 3 + 1
        ));
    }
    std::fs::write(&file, toml).unwrap();
    let file_arg = file.to_string_lossy().into_owned();
    let shown = run(STORCTL, &["status", "--cluster", &file_arg]);
    assert!(
        !shown.stdout.is_empty(),
        "status prints a report: {}",
        text(&shown.stderr)
    );
    for json in [true, false] {
        let mut args = vec!["status", "--cluster", &file_arg];
        if json {
            args.push("--json");
        }
        let out = run_into_closed_pipe(STORCTL, &args);
        assert_quiet_sigpipe(&format!("storctl {args:?}"), &out);
    }
}

#[test]
fn storbench_and_storaged_into_a_closed_pipe_exit_quietly() {
    let dir = scratch();
    let file = dir.path().join("bench.dat");
    let file_arg = format!("--filename={}", file.display());
    for format in ["normal", "json"] {
        let out = run_into_closed_pipe(
            STORBENCH,
            &[
                &file_arg,
                "--size=4m",
                "--bs=4k",
                "--runtime=200ms",
                &format!("--output-format={format}"),
            ],
        );
        assert_quiet_sigpipe(&format!("storbench --output-format={format}"), &out);
    }
    let dev = dir.path().join("node.dev");
    let out = Command::new(daemon("storaged"))
        .args([
            "format",
            "--device",
            dev.to_str().unwrap(),
            "--node-id",
            "1",
            "--size",
            "32m",
        ])
        .stdout(support::closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_quiet_sigpipe("storaged format", &out);
    // The format itself was done before the line that could not be printed.
    let inspect = run(STORCTL, &["inspect", "--device", dev.to_str().unwrap()]);
    assert_eq!(inspect.status.code(), Some(0), "{}", text(&inspect.stderr));
}

#[test]
fn logs_on_a_pipe_have_no_colour_codes() {
    let dir = scratch();
    let dev = dir.path().join("dev");
    // storaged logs the device it opens at info, its default level.
    let out = Command::new(daemon("storaged"))
        .args([
            "format",
            "--device",
            dev.to_str().unwrap(),
            "--node-id",
            "1",
            "--size",
            "32m",
        ])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = text(&out.stderr);
    assert!(logs.contains("INFO"), "expected log lines: {logs}");
    assert!(!out.stderr.contains(&0x1b), "ESC in logs on a pipe: {logs:?}");
    // The same for a tool at a chattier level.
    let out = Command::new(STORCTL)
        .args(["inspect", "--device", dev.to_str().unwrap()])
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(text(&out.stderr).contains("INFO"), "{}", text(&out.stderr));
    assert!(!out.stderr.contains(&0x1b), "{:?}", text(&out.stderr));
}

#[test]
fn every_binary_lists_its_exit_statuses_and_usage_errors_exit_2() {
    for (bin, args) in [
        (daemon("storaged"), vec!["--help"]),
        (daemon("computed"), vec!["--help"]),
        (STORCTL.into(), vec!["--help"]),
        (STORBENCH.into(), vec!["--help"]),
    ] {
        let out = Command::new(&bin).args(&args).output().unwrap();
        assert!(out.status.success());
        let help = text(&out.stdout);
        assert!(help.contains("Exit status"), "{}: {help}", bin.display());
        assert!(
            help.contains("2 usage error") || help.contains("2    usage error"),
            "{}: {help}",
            bin.display()
        );
        let bad = Command::new(&bin).arg("--no-such-flag").output().unwrap();
        assert_eq!(bad.status.code(), Some(2), "{}", bin.display());
    }
    let down = run(STORCTL, &["dev-cluster", "down", "--help"]);
    assert!(
        text(&down.stdout).contains("The directory `dev-cluster up --dir` was given"),
        "{}",
        text(&down.stdout)
    );
}

#[test]
fn a_daemon_keeps_serving_when_nobody_reads_its_stdout() {
    let dir = scratch();
    let dev = device(dir.path());
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(daemon("storaged"))
        .args(["run", "--device", &dev, "--listen", &listen])
        .env("RUST_LOG", "warn")
        .stdout(support::closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let serving = support::wait_until(std::time::Duration::from_secs(30), || {
        std::net::TcpStream::connect(&listen).is_ok()
    });
    // SAFETY: our own child, by PID.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = support::wait_bounded(child, support::COMMAND_TIMEOUT);
    let stderr = text(&out.stderr);
    assert!(serving, "storaged stopped serving: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
