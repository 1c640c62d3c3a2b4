//! `storctl inspect`: fsck-style exit codes and JSON, on devices made by
//! `storbench --engine log` (created, formatted and filled with records).

use std::path::Path;
use std::process::{Command, Output};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("storctl-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn inspect(dev: &Path, json: bool) -> Output {
    let mut args = vec!["inspect", "--device", dev.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    run(env!("CARGO_BIN_EXE_storctl"), &args)
}

/// An 8 MiB device (2 MiB of log) after 8 MiB of 128-byte records: the log
/// has wrapped several times and holds the newest records.
fn filled_device(dir: &Path) -> std::path::PathBuf {
    let dev = dir.join("dev");
    let filename = format!("--filename={}", dev.display());
    let out = run(
        env!("CARGO_BIN_EXE_storbench"),
        &["--engine=log", &filename, "--size=8m", "--bs=128", "--iodepth=4"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dev
}

#[test]
fn clean_device_exits_0_with_its_figures() {
    let dir = tempdir();
    let dev = filled_device(dir.path());
    let out = inspect(&dev, true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "clean");
    let records = v["log"]["records"].as_u64().unwrap();
    assert!(records > 0 && records <= 65536, "{records} records live");
    assert_eq!(v["superblock"]["copies"][0], "ok");
    assert!(v["log"]["head_seq"].as_u64().unwrap() > v["log"]["tail_seq"].as_u64().unwrap());
    let human = inspect(&dev, false);
    assert_eq!(human.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&human.stdout).contains("status         clean"));
}

#[test]
fn corruption_exits_4_and_is_left_alone() {
    let dir = tempdir();
    let dev = filled_device(dir.path());
    // A bit flip in superblock copy 1 (block 128): still usable, but corrupt.
    let mut bytes = std::fs::read(&dev).unwrap();
    bytes[128 * 4096 + 100] ^= 0x40;
    std::fs::write(&dev, &bytes).unwrap();
    let out = inspect(&dev, true);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "corrupt");
    assert!(v["superblock"]["copies"][1].as_str().unwrap().contains("CRC"), "{v}");
    assert_eq!(std::fs::read(&dev).unwrap(), bytes, "inspect never writes");
}

#[test]
fn unreadable_or_foreign_devices_exit_8() {
    let dir = tempdir();
    let out = inspect(&dir.path().join("missing"), false);
    assert_eq!(out.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));

    let blank = dir.path().join("blank");
    std::fs::write(&blank, vec![0u8; 8 << 20]).unwrap();
    let out = inspect(&blank, false);
    assert_eq!(out.status.code(), Some(8));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not formatted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let junk = dir.path().join("junk");
    std::fs::write(
        &junk,
        (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = inspect(&junk, false);
    assert_eq!(out.status.code(), Some(8));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no valid superblock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
