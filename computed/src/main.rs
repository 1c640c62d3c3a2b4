//! computed: the single writer of a volume (see the crate docs and
//! docs/computed.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use computed::cluster::Cluster;
use computed::core::WriterConfig;

const EXIT_HELP: &str = "Exit status: 0 stopped by SIGTERM or SIGINT; 1 error (cluster file, listening, \
                         recovery); 2 usage error (a bad flag); 3 fenced: another computed recovered the volume \
                         (this one closed its clients and stopped). Logs go to stderr, coloured only on a \
                         terminal without NO_COLOR.";

#[derive(Parser)]
#[command(
    name = "computed",
    version,
    about = "The single writer of a volume: LSNs, per-PG batching, quorum-durable commits",
    after_help = EXIT_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Be the writer of the volume the cluster file describes.
    #[command(after_help = EXIT_HELP)]
    Run {
        /// The cluster file (TOML): volume, storage nodes, placement.
        #[arg(long)]
        cluster: PathBuf,
        /// Where clients connect [default: the file's computed.address].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve metrics (Prometheus text) here [default: the file's computed.metrics, if any].
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    storaged::cli::init_logging("info");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            cluster,
            listen,
            metrics,
        } => run(cluster, listen, metrics),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            storaged::errln!("computed: {e:#}");
            if e.downcast_ref::<computed::server::Fenced>().is_some() {
                ExitCode::from(computed::server::EXIT_FENCED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cluster: PathBuf, listen: Option<SocketAddr>, metrics: Option<SocketAddr>) -> anyhow::Result<()> {
    let cluster = Cluster::load(&cluster)?;
    // One runtime thread: the driver, the client and the storage
    // connections hand work to each other on every commit, and on a
    // multi-thread runtime each hand-off could wake the other worker (a
    // futex wake and a context switch). computed needs far less than a
    // core (measured: ~8 us of CPU per commit at 64 committers); one
    // thread cut its CPU by ~20% and raised commits/s (docs/performance.md).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listen = listen.unwrap_or(cluster.computed_address);
        let listener = computed::server::bind(listen).with_context(|| format!("listening on {listen}"))?;
        let metrics = match metrics.or(cluster.metrics_address) {
            Some(m) => Some(computed::server::bind(m).with_context(|| format!("metrics on {m}"))?),
            None => None,
        };
        let local = listener.local_addr().context("reading the listening address")?;
        // The epoch here is a placeholder: recovery picks the writer's
        // epoch (docs/computed.md, "Recovery at start-up").
        let config = WriterConfig::from_cluster(&cluster, 1);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = stop_tx.send(true);
        });
        // Scripts wait for this line. A daemon keeps serving if nobody reads
        // it (a closed stdout is not a reason to stop the writer).
        if let Err(e) = storaged::outln!("computed: listening on {local}") {
            tracing::debug!(error = %e, "the ready line was not printed");
        }
        computed::server::run(cluster, config, listener, metrics, stop_rx).await
    })
}
