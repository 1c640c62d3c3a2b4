use super::*;

/// A scratch directory on a disk-backed filesystem: /tmp may be tmpfs, where
/// `O_DIRECT` opens fail.
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("storaged-io-test-")
        .tempdir_in("/var/tmp")
        .expect("create a scratch dir in /var/tmp")
}

#[test]
fn zero_filled_file_opens_with_its_geometry() {
    let dir = scratch_dir();
    let path = dir.path().join("dev.dat");
    create_zero_filled(&path, (4 << 20) + 100).expect("create");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 4 << 20);
    let dev = open_device(&path, &OpenOptions::default()).expect("open");
    assert_eq!(dev.kind, DeviceKind::RegularFile);
    assert_eq!(dev.geometry.size_bytes, 4 << 20);
    let lbs = dev.geometry.logical_block_bytes;
    assert!(lbs > 0 && 4096 % lbs == 0, "logical block {lbs}");
    // Zero-filled by real writes: the contents read back as zeros.
    let mut buf = AlignedBuf::zeroed_blocks(1);
    buf.fill(0xAA);
    dev.file.read_exact_at(&mut buf, 4096 * 7).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn zero_fill_refuses_small_sizes_and_non_files() {
    let dir = scratch_dir();
    let err = create_zero_filled(&dir.path().join("tiny"), 4096).expect_err("too small");
    assert!(matches!(err, DeviceError::TooSmall { .. }), "{err}");
    let err = create_zero_filled(dir.path(), 4 << 20).expect_err("a directory");
    assert!(matches!(err, DeviceError::NotADevice { .. }), "{err}");
}

#[test]
fn open_errors_name_the_cause() {
    let dir = scratch_dir();
    let missing = dir.path().join("missing");
    let err = open_device(&missing, &OpenOptions::default()).expect_err("missing");
    assert!(matches!(err, DeviceError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing"));

    let err = open_device(dir.path(), &OpenOptions::default()).expect_err("dir");
    assert!(matches!(err, DeviceError::NotADevice { .. }), "{err}");

    let path = dir.path().join("small.dat");
    create_zero_filled(&path, 1 << 20).expect("create");
    let opts = OpenOptions {
        min_size_bytes: 2 << 20,
    };
    let err = open_device(&path, &opts).expect_err("too small");
    assert!(
        matches!(err, DeviceError::TooSmall { size, min, .. } if size == 1 << 20 && min == 2 << 20),
        "{err}"
    );
}

#[test]
fn tmpfs_refusal_is_clear() {
    // /dev/shm is tmpfs on Linux: open(O_DIRECT) fails there with EINVAL.
    let Ok(dir) = tempfile::Builder::new().tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 1 << 20]).expect("write");
    match open_device(&path, &OpenOptions::default()) {
        Err(DeviceError::DirectIoUnsupported { .. }) => {}
        // Newer kernels may support O_DIRECT on tmpfs; then the open works.
        Ok(_) => eprintln!("note: this kernel supports O_DIRECT on tmpfs"),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn block_sizes_that_do_not_divide_4096_are_refused() {
    let p = Path::new("/dev/example");
    for ok in [512, 1024, 2048, 4096] {
        assert!(check_logical_block_size(p, ok).is_ok(), "{ok}");
    }
    for bad in [0, 520, 3000, 8192, 65536] {
        let err = check_logical_block_size(p, bad).unwrap_err();
        assert!(
            matches!(err, DeviceError::UnsupportedBlockSize { bytes, .. } if bytes == bad),
            "{bad}"
        );
        assert!(err.to_string().contains("/dev/example"), "{err}");
    }
}
