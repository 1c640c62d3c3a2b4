//! What the tests of `storaged` as a real process share: a scratch
//! directory where O_DIRECT works, a formatted file device, `storaged run`
//! listening on a free port of 127.0.0.1, and a bounded runtime to drive a
//! client from a test.

// Each test binary uses its own share of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::Daemon;

/// Every test's whole run under [`run`] is bounded by this.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch directory under the target directory. Not /tmp: it may be a
/// tmpfs, where O_DIRECT is refused.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// `storaged format` of a file device `dir/dev` of `size`, as node 5.
pub fn format_device(dir: &Path, size: &str) -> PathBuf {
    let dev = dir.join("dev");
    let out = Command::new(env!("CARGO_BIN_EXE_storaged"))
        .args([
            "format",
            "--device",
            dev.to_str().unwrap(),
            "--node-id",
            "5",
            "--size",
            size,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dev
}

/// `storaged run` on `device`, listening on a free port of 127.0.0.1, with
/// `extra` arguments.
pub fn start_daemon(device: &Path, extra: &[&str]) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_storaged"));
    cmd.args(["run", "--device", device.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(extra);
    Daemon::start(cmd)
}

/// `f` on a current-thread runtime, failing the test past [`TEST_TIMEOUT`].
pub fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { tokio::time::timeout(TEST_TIMEOUT, f).await.expect("test timed out") });
}
