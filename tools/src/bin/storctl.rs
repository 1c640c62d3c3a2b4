//! storctl: the operator's tool. Exit codes follow fsck: 0 clean, 1 problems
//! found and corrected, 4 problems left uncorrected, 8 operational error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use storaged::inspect::inspect;
use storaged::io::uring::{UringConfig, UringDevice};
use tools::devcluster::{self, UpOptions};
use tools::status;

const EXIT_CLEAN: u8 = 0;
const EXIT_UNCORRECTED: u8 = 4;
const EXIT_OPERATIONAL: u8 = 8;

#[derive(Parser)]
#[command(
    name = "storctl",
    version,
    about = "Operate the storage service: inspect devices, show a cluster's status, run a local dev cluster"
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
    /// could not be read or is not a storaged device. Never writes: opens
    /// the device read-only under a shared lock, so no writer can start
    /// while it reads. A device a writer (`storaged run`) already has open
    /// is still read, and the report says so first ("in use by pid N";
    /// JSON `in_use_by`): it is then a snapshot of a device being written.
    Inspect {
        /// Block device or file formatted by `storaged format`.
        #[arg(long)]
        device: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Online view of a cluster: per node up/down and epoch; per PG each
    /// segment's SCL and lag behind the PGCL; the volume's VCL and VDL.
    ///
    /// Each node is asked GetSegmentStatus (epoch 0, read-only) for every
    /// segment the placement puts on it; a node that does not answer within
    /// 3 s is down. PGCL is the 4th-highest SCL of a PG's 6 (a down segment
    /// counts as 0). The VDL comes from computed; the VCL from computed's
    /// metrics endpoint when the cluster file names one (`vcl_source`
    /// "computed"), else it is derived from the SCLs as a lower bound
    /// ("derived").
    ///
    /// Exit status: 0 healthy; 4 problems (a node down, a PG below its write
    /// quorum of 4); 8 operational error (unreadable cluster file, computed
    /// unreachable).
    ///
    /// --json keys (stable): status ("healthy"|"problems"), problems [text],
    /// volume, vdl, vcl, vcl_source ("computed"|"derived"),
    /// computed {address, up, epoch, vdl, error},
    /// nodes [{id, address, az, up, epoch, error}],
    /// pgs [{pg, pgcl, segments_up, write_quorum,
    /// segments [{node, up, scl, lag, epoch, highest_lsn}]}].
    /// Unknown values (a node down) are null.
    #[command(verbatim_doc_comment)]
    Status {
        /// The cluster file (TOML).
        #[arg(long)]
        cluster: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a local cluster on 127.0.0.1 for development: `up` or `down`.
    #[command(name = "dev-cluster", subcommand)]
    DevCluster(DevClusterCommand),
}

#[derive(Subcommand)]
enum DevClusterCommand {
    /// Start N storaged and one computed in the background, on file devices
    /// under DIR; return once the cluster has acknowledged a commit.
    ///
    /// Writes DIR/cluster.toml, DIR/devN (one device per node), DIR/logs/NAME.log
    /// (each daemon's output) and DIR/pids/storaged-N.pid, DIR/pids/computed.pid.
    /// The daemons run detached (their own session) and outlive storctl.
    ///
    /// The devices are always formatted afresh: computed does not recover a
    /// volume yet, so an `up` on a DIR used before starts a new, empty volume
    /// (the old devices are deleted). `up` refuses a DIR whose daemons are
    /// still running. The volume's PG size is chosen so every node's page
    /// store holds its segments; a --device-size too small is refused.
    ///
    /// Needs `storaged` and `computed` next to storctl (`cargo build --release`).
    /// On failure (a port taken, a daemon exiting, no commit within 30 s) it
    /// stops what it started and names the daemon's log. Exit status: 0 up, 8 failed.
    #[command(verbatim_doc_comment)]
    Up {
        /// Directory for the cluster's devices, logs, pid files and cluster.toml.
        #[arg(long)]
        dir: PathBuf,
        /// Storage nodes (at least 6), in AZs az1..az3 round-robin.
        #[arg(long, default_value_t = devcluster::NODES_DEFAULT)]
        nodes: usize,
        /// Size of each node's file device, e.g. 128m (a quarter is log).
        #[arg(long = "device-size", value_parser = storaged::units::parse_bytes, default_value = "128m")]
        device_size: u64,
        /// Protection groups in the volume.
        #[arg(long, default_value_t = devcluster::PGS_DEFAULT)]
        pgs: u32,
        /// Use consecutive ports from this one (nodes, computed, computed's
        /// metrics) instead of free ports the kernel picks.
        #[arg(long = "base-port")]
        base_port: Option<u16>,
    },
    /// Stop the cluster in DIR: SIGTERM every process of its pid files, wait
    /// up to 10 s, SIGKILL the rest, remove the pid files. Running it again,
    /// or on a DIR with no cluster, does nothing. Exit status: 0, or 8 if a
    /// process could not be stopped.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { device, json } => run_inspect(&device, json),
        Command::Status { cluster, json } => run_status(&cluster, json),
        Command::DevCluster(DevClusterCommand::Up {
            dir,
            nodes,
            device_size,
            pgs,
            base_port,
        }) => run_up(UpOptions {
            dir,
            nodes,
            device_bytes: device_size,
            pgs,
            base_port,
        }),
        Command::DevCluster(DevClusterCommand::Down { dir }) => run_down(&dir),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("storctl: error: {e:#}");
            ExitCode::from(EXIT_OPERATIONAL)
        }
    }
}

fn run_status(path: &Path, json: bool) -> Result<u8> {
    let cluster = computed::cluster::Cluster::load(path)?;
    let s = status::collect(&cluster)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s).context("encoding the report")?);
    } else {
        print!("{}", status::render(&s));
    }
    if let Some(e) = &s.computed.error {
        eprintln!("storctl: error: computed at {} is unreachable: {e}", s.computed.address);
        return Ok(EXIT_OPERATIONAL);
    }
    Ok(if s.healthy() { EXIT_CLEAN } else { EXIT_UNCORRECTED })
}

fn run_up(opts: UpOptions) -> Result<u8> {
    let c = devcluster::up(&opts)?;
    println!(
        "dev cluster up in {}: {} storage nodes, computed on {}, {} PGs of {} pages",
        c.dir.display(),
        opts.nodes,
        c.computed,
        c.geometry.pgs,
        c.geometry.pg_pages
    );
    println!("  cluster file  {}", c.cluster_file.display());
    println!("  logs          {}/logs/", c.dir.display());
    println!("  status        storctl status --cluster {}", c.cluster_file.display());
    println!("  stop          storctl dev-cluster down --dir {}", c.dir.display());
    Ok(EXIT_CLEAN)
}

fn run_down(dir: &Path) -> Result<u8> {
    let r = devcluster::down(dir)?;
    if r.stopped.is_empty() && r.killed.is_empty() {
        println!("no dev cluster running in {}", dir.display());
    } else {
        println!("stopped: {}", r.stopped.join(", "));
        if !r.killed.is_empty() {
            println!("killed after {} s: {}", 10, r.killed.join(", "));
        }
    }
    Ok(EXIT_CLEAN)
}

fn run_inspect(path: &Path, json: bool) -> Result<u8> {
    // Read-only under a shared lock: no writer starts while it reads, and one
    // already running is named in the report.
    let config = UringConfig {
        open: storaged::io::device::OpenOptions {
            access: storaged::io::device::Access::Read,
            ..Default::default()
        },
        ..UringConfig::default()
    };
    let dev = Arc::new(UringDevice::open(path, &config)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut report = rt
        .block_on(inspect(&dev))
        .with_context(|| format!("inspecting {}", path.display()))?;
    report.in_use_by = dev.info().in_use_by.as_ref().map(Into::into);
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
