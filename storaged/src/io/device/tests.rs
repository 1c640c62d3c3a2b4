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
        ..OpenOptions::default()
    };
    let err = open_device(&path, &opts).expect_err("too small");
    assert!(
        matches!(err, DeviceError::TooSmall { size, min, .. } if size == 1 << 20 && min == 2 << 20),
        "{err}"
    );
}

#[test]
fn tmpfs_opens_or_is_refused_clearly() {
    // /dev/shm is tmpfs on Linux. Since Linux 6.6 tmpfs takes O_DIRECT (the
    // open works, with a warning that the medium is RAM); before, open
    // fails with EINVAL, reported as DirectIoUnsupported.
    let Ok(dir) = tempfile::Builder::new().tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 1 << 20]).expect("write");
    match open_device(&path, &OpenOptions::default()) {
        Ok(dev) => assert!(on_tmpfs(&dev.file), "/dev/shm is not a tmpfs here"),
        Err(e @ DeviceError::DirectIoUnsupported { .. }) => {
            assert!(!e.to_string().contains("tmpfs does not"), "{e}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    let disk = scratch_dir();
    let path = disk.path().join("f");
    create_zero_filled(&path, 1 << 20).expect("create");
    let dev = open_device(&path, &OpenOptions::default()).expect("open");
    assert!(!on_tmpfs(&dev.file));
}

#[test]
fn a_device_has_one_writer_even_within_one_process() {
    let dir = scratch_dir();
    let path = dir.path().join("dev.dat");
    create_zero_filled(&path, 1 << 20).expect("create");
    let first = open_device(&path, &OpenOptions::default()).expect("open");
    assert!(first.in_use_by.is_none());

    let err = open_device(&path, &OpenOptions::default()).expect_err("a second writer");
    let DeviceError::InUse { holder, .. } = &err else {
        panic!("not InUse: {err}");
    };
    assert_eq!(holder.pid, Some(std::process::id()));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "device {} is in use by pid {}",
            path.display(),
            std::process::id()
        )),
        "{msg}"
    );
    // Resizing it under its writer is refused too, and leaves it as it was.
    let err = create_zero_filled(&path, 2 << 20).expect_err("zero-fill under a writer");
    assert!(matches!(err, DeviceError::InUse { .. }), "{err}");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1 << 20);

    // A reader still opens it, read-only, and learns who writes it.
    let read = OpenOptions {
        access: Access::Read,
        ..OpenOptions::default()
    };
    let reader = open_device(&path, &read).expect("a reader beside the writer");
    assert_eq!(reader.in_use_by.as_ref().and_then(|h| h.pid), Some(std::process::id()));
    drop(reader);

    // Gone with the writer's descriptor.
    drop(first);
    let reader = open_device(&path, &read).expect("a reader alone");
    assert!(reader.in_use_by.is_none());
    // ... and a reader keeps writers out while it reads.
    let err = open_device(&path, &OpenOptions::default()).expect_err("a writer beside a reader");
    assert!(matches!(err, DeviceError::InUse { .. }), "{err}");
    drop(reader);
    open_device(&path, &OpenOptions::default()).expect("a writer alone");
}

#[test]
fn a_failed_zero_fill_removes_only_a_file_it_created() {
    let dir = scratch_dir();
    // Fails after creating the file: the file system refuses the size.
    let huge = u64::MAX - u64::MAX % BLOCK_SIZE as u64;
    let path = dir.path().join("new.dat");
    create_zero_filled(&path, huge).expect_err("no file system takes 16 EiB");
    assert!(!path.exists(), "a file it created was left behind");

    let path = dir.path().join("old.dat");
    std::fs::write(&path, b"someone's data").expect("write");
    create_zero_filled(&path, huge).expect_err("no file system takes 16 EiB");
    assert!(path.exists(), "a file that existed before was removed");
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
