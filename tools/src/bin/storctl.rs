//! storctl: the operator's tool. Exit codes follow fsck: 0 clean, 1 problems
//! found and corrected, 4 problems left uncorrected, 8 operational error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use storaged::inspect::inspect;
use storaged::io::uring::{UringConfig, UringDevice};

const EXIT_CLEAN: u8 = 0;
const EXIT_UNCORRECTED: u8 = 4;
const EXIT_OPERATIONAL: u8 = 8;

#[derive(Parser)]
#[command(
    name = "storctl",
    version,
    about = "Operate the storage service: inspect devices, and more to come"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline check of a device: superblocks, log anchor, log head and tail,
    /// record count, and a CRC check of every written block.
    ///
    /// Exit status: 0 clean, 4 corruption found (left as is), 8 the device
    /// could not be read or is not a storaged device. Never writes.
    Inspect {
        /// Block device or file formatted by `storaged format`.
        #[arg(long)]
        device: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { device, json } => match run_inspect(&device, json) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("storctl: error: {e:#}");
                ExitCode::from(EXIT_OPERATIONAL)
            }
        },
    }
}

fn run_inspect(path: &Path, json: bool) -> Result<u8> {
    let dev =
        UringDevice::open(path, &UringConfig::default()).with_context(|| format!("opening {}", path.display()))?;
    let dev = Arc::new(dev);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = rt
        .block_on(inspect(&dev))
        .with_context(|| format!("inspecting {}", path.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        print!("{}", report.render());
    }
    Ok(if report.check.problems_found == 0 {
        EXIT_CLEAN
    } else {
        EXIT_UNCORRECTED
    })
}
