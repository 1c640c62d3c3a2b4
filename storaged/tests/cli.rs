//! `storaged format` as an operator runs it.

use std::path::Path;
use std::process::{Command, Output};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("storaged-cli-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
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
    assert_eq!(out.status.code(), Some(1));
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
