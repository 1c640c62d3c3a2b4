//! storaged: the storage node daemon and its device tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use storaged::io::device::{self, DeviceKind};
use storaged::io::uring::{UringConfig, UringDevice};
use storaged::log::mkfs::{self, FormatOptions};
use storaged::units::parse_bytes;

#[derive(Parser)]
#[command(
    name = "storaged",
    version,
    about = "Storage node of the log-is-the-database service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a device ready: write the superblocks and an empty log.
    ///
    /// The device is a raw block device (/dev/nvme0n1, /dev/loopN) or a
    /// regular file. A file that does not exist is created and zero-filled to
    /// --size, so later writes are pure overwrites. A device that already
    /// holds data (a superblock, or anything in its first MiB) is refused
    /// unless --force.
    Format {
        /// Block device or file to format.
        #[arg(long)]
        device: PathBuf,
        /// This node's id in the cluster file.
        #[arg(long)]
        node_id: u64,
        /// Size of a file device to create, e.g. 1g (fio-style suffixes). Not for block devices.
        #[arg(long, value_parser = parse_bytes)]
        size: Option<u64>,
        /// Size of the log region; default a quarter of the device, from 1 MiB to 1 GiB.
        #[arg(long, value_parser = parse_bytes)]
        log_size: Option<u64>,
        /// Erase a device that holds data or is already formatted.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,storaged=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Format {
            device,
            node_id,
            size,
            log_size,
            force,
        } => format(&device, node_id, size, log_size, force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storaged: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn format(
    path: &Path,
    node_id: u64,
    size: Option<u64>,
    log_bytes: Option<u64>,
    force: bool,
) -> Result<()> {
    prepare_file(path, size, force)?;
    let dev = UringDevice::open(path, &UringConfig::default())
        .with_context(|| format!("opening {}", path.display()))?;
    if dev.info().kind == DeviceKind::BlockDevice && size.is_some() {
        bail!("--size is for file devices; a block device is used whole");
    }
    let dev = Arc::new(dev);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let sb = rt.block_on(mkfs::format(
        dev.as_ref(),
        FormatOptions {
            node_id,
            log_bytes,
            force,
        },
    ))?;
    println!(
        "formatted {}: node {}, {} MiB, log {} MiB, page store {} MiB",
        path.display(),
        sb.node_id,
        sb.device_bytes >> 20,
        (sb.log_blocks * 4096) >> 20,
        (sb.pages_blocks * 4096) >> 20
    );
    Ok(())
}

/// Create (or, with --force, re-create) a zero-filled file device of `size`.
fn prepare_file(path: &Path, size: Option<u64>, force: bool) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(size) = size else {
                bail!(
                    "{} does not exist; pass --size to create a file device of that size",
                    path.display()
                );
            };
            device::create_zero_filled(path, size)?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(meta) if meta.is_file() => {
            if let Some(size) = size.filter(|&s| s - s % 4096 != meta.len()) {
                if !force {
                    bail!(
                        "{} is {} bytes, not the {size} that --size asks for; pass --force to re-create it",
                        path.display(),
                        meta.len()
                    );
                }
                device::create_zero_filled(path, size)?;
            }
        }
        Ok(_) => {}
    }
    Ok(())
}
