//! storaged: the storage node daemon and its device tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};

use storaged::io::device::{self, DeviceKind};
use storaged::io::uring::{RingPlacement, UringConfig, UringDevice};

/// Where `storaged run` drives the device's io_uring from unless its config says.
const RUN_RING_DEFAULT: RingPlacement = RingPlacement::Runtime;
use storaged::gossip::GossipConfig;
use storaged::log::format::Superblock;
use storaged::log::layout::{DEVICE_BYTES_MIN, LayoutError};
use storaged::log::mkfs::{self, FormatOptions, SCRATCH_NODE_ID};
use storaged::node::server::{bind, serve};
use storaged::node::{Node, NodeConfig};
use storaged::scrub::shell::ScrubConfig;
use storaged::units::parse_bytes;
use storaged::{errln, outln};

#[derive(Parser)]
#[command(
    name = "storaged",
    version,
    about = "Storage node of the log-is-the-database service",
    after_help = "Exit status: 0 done (`run`: stopped by SIGTERM or SIGINT); 1 failed (the message says why); \
                  2 usage error (a bad flag). Logs go to stderr, coloured only on a terminal without NO_COLOR."
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
    /// --size, so later writes are pure overwrites; if the format then fails,
    /// the file is removed again (a file that existed is never removed). A
    /// device that already holds data (a superblock, or anything in its first
    /// MiB) is refused unless --force; a device another process has open
    /// (a running `storaged run`, say) is refused even with --force.
    Format {
        /// Block device or file to format.
        #[arg(long)]
        device: PathBuf,
        /// This node's id in the cluster file (1 or more).
        #[arg(long, value_parser = parse_node_id)]
        node_id: u64,
        /// Size of a file device to create, e.g. 1g (fio-style suffixes), at
        /// least 4m. Not for block devices.
        #[arg(long, value_parser = parse_bytes)]
        size: Option<u64>,
        /// Size of the log region; default a quarter of the device, from 1 MiB to 1 GiB.
        #[arg(long, value_parser = parse_bytes)]
        log_size: Option<u64>,
        /// Erase a device that holds data or is already formatted.
        #[arg(long)]
        force: bool,
    },
    /// Serve a formatted device: recover its log and segments, then take
    /// appends and answer requests on --listen.
    ///
    /// Prints "storaged: node N listening on ADDR" on stdout and tells systemd it is ready
    /// (sd_notify READY=1), pinging the watchdog when WatchdogSec is set.
    /// SIGTERM or SIGINT: stop accepting, finish the requests and writes in
    /// flight, exit 0. The device is locked while it runs: a second
    /// `storaged run`, a `storaged format` or a writing `storbench` on it is
    /// refused ("device PATH is in use by pid N").
    Run {
        /// The device `storaged format` prepared.
        #[arg(long)]
        device: PathBuf,
        /// Address to serve on, e.g. 127.0.0.1:7100 (port 0 picks a free one).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Serve Prometheus metrics (OpenMetrics text) on GET /metrics at
        /// this address, e.g. 127.0.0.1:9101 (port 0 picks a free one).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// TOML file with limits (see docs/operations.md); defaults otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `storaged run --config FILE`: every field optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    log_write_blocks: Option<usize>,
    log_writes_inflight: Option<usize>,
    log_queue_bytes: Option<usize>,
    gap_records_max: Option<usize>,
    requests_per_connection_max: Option<usize>,
    connections_max: Option<usize>,
    frame_bytes_max: Option<usize>,
    hot_bytes_max: Option<usize>,
    coalesce_round_pages_max: Option<usize>,
    coalesce_pages_per_sec_max: Option<u64>,
    /// "runtime" (the default) or "thread": where the device's io_uring is driven from.
    ring: Option<String>,
    gossip_interval_ms: Option<u64>,
    repair_rate_bytes_per_s: Option<u64>,
    repair_pull_bytes_max: Option<u32>,
    repair_inflight_bytes_max: Option<u64>,
    repair_inflight_per_peer_max: Option<usize>,
    repair_timeout_max_ms: Option<u64>,
    repair_io_inflight: Option<usize>,
    scrub_pass_period_s: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    scrub_rate_bytes_per_s: Option<u64>,
    scrub_enabled: Option<bool>,
}

/// A size key: a number of bytes, or a string with a suffix ("256m").
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Size;
    impl serde::de::Visitor<'_> for Size {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size: a number of bytes, or a string such as \"256m\"")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("{v} is not a size: a size is not negative")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            parse_bytes(v).map(Some).map_err(E::custom)
        }
    }
    d.deserialize_any(Size)
}

impl RunConfig {
    fn load(path: &Path) -> Result<(NodeConfig, UringConfig, GossipConfig, ScrubConfig)> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<(NodeConfig, UringConfig, GossipConfig, ScrubConfig)> {
        let rc: RunConfig = toml::from_str(text).with_context(|| format!("parsing {}", path.display()))?;
        let ring = match rc.ring.as_deref() {
            Some(name) => name
                .parse::<RingPlacement>()
                .map_err(|e| anyhow::anyhow!("{}: ring: {e}", path.display()))?,
            None => RUN_RING_DEFAULT,
        };
        let mut uring = UringConfig {
            placement: ring,
            ..UringConfig::default()
        };
        uring.background_inflight = rc.repair_io_inflight.unwrap_or(uring.background_inflight);
        if uring.background_inflight == 0 || uring.background_inflight > uring.max_inflight {
            bail!(
                "{}: repair_io_inflight must be between 1 and {}",
                path.display(),
                uring.max_inflight
            );
        }
        let mut c = NodeConfig::default();
        c.log.write_blocks_max = rc.log_write_blocks.unwrap_or(c.log.write_blocks_max);
        c.log.writes_inflight_max = rc.log_writes_inflight.unwrap_or(c.log.writes_inflight_max);
        c.log.queue_bytes_max = rc.log_queue_bytes.unwrap_or(c.log.queue_bytes_max);
        c.gap_records_max = rc.gap_records_max.unwrap_or(c.gap_records_max);
        c.requests_per_connection_max = rc.requests_per_connection_max.unwrap_or(c.requests_per_connection_max);
        c.connections_max = rc.connections_max.unwrap_or(c.connections_max);
        c.frame_bytes_max = rc.frame_bytes_max.unwrap_or(c.frame_bytes_max);
        c.hot_bytes_max = rc.hot_bytes_max.unwrap_or(c.hot_bytes_max);
        c.coalesce_round_pages_max = rc.coalesce_round_pages_max.unwrap_or(c.coalesce_round_pages_max);
        c.coalesce_pages_per_sec_max = rc.coalesce_pages_per_sec_max.unwrap_or(c.coalesce_pages_per_sec_max);
        if c.coalesce_round_pages_max == 0 {
            bail!("{}: coalesce_round_pages_max must be at least 1", path.display());
        }
        c.log
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if c.requests_per_connection_max == 0 || c.connections_max == 0 || c.gap_records_max == 0 {
            bail!("{}: limits must be at least 1", path.display());
        }
        if c.frame_bytes_max < 4096 {
            bail!("{}: frame_bytes_max must be at least 4096", path.display());
        }
        let mut g = GossipConfig::default();
        g.digest_interval_ms = rc.gossip_interval_ms.unwrap_or(g.digest_interval_ms);
        g.rate_bytes_per_s = rc.repair_rate_bytes_per_s.unwrap_or(g.rate_bytes_per_s);
        g.pull_bytes_max = rc.repair_pull_bytes_max.unwrap_or(g.pull_bytes_max);
        g.inflight_bytes_max = rc.repair_inflight_bytes_max.unwrap_or(g.inflight_bytes_max);
        g.inflight_per_peer_max = rc.repair_inflight_per_peer_max.unwrap_or(g.inflight_per_peer_max);
        g.timeout_max_ms = rc.repair_timeout_max_ms.unwrap_or(g.timeout_max_ms);
        g.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut scrub = ScrubConfig::default();
        if let Some(s) = rc.scrub_pass_period_s {
            scrub.pass_period = std::time::Duration::from_secs(s);
        }
        scrub.rate_bytes_per_s_max = rc.scrub_rate_bytes_per_s.unwrap_or(scrub.rate_bytes_per_s_max);
        scrub.enabled = rc.scrub_enabled.unwrap_or(scrub.enabled);
        scrub
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((c, uring, g, scrub))
    }
}

fn main() -> ExitCode {
    storaged::cli::init_logging("warn,storaged=info");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Format {
            device,
            node_id,
            size,
            log_size,
            force,
        } => format(&device, node_id, size, log_size, force),
        Command::Run {
            device,
            listen,
            metrics,
            config,
        } => run(&device, listen, metrics, config.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if storaged::cli::is_stdout_closed(&e) => storaged::cli::die_of_sigpipe(),
        Err(e) => {
            errln!("storaged: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--node-id`: ids start at 1; 0 marks storbench's scratch devices.
fn parse_node_id(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(SCRATCH_NODE_ID) => Err(format!(
            "node ids start at 1 ({SCRATCH_NODE_ID} marks storbench's scratch devices)"
        )),
        Ok(id) => Ok(id),
        Err(e) => Err(format!("`{s}` is not a node id: {e}")),
    }
}

fn format(path: &Path, node_id: u64, size: Option<u64>, log_bytes: Option<u64>, force: bool) -> Result<()> {
    // The one minimum, checked before anything is created; a flag out of
    // range is a usage error (exit 2).
    if let Some(size) = size.filter(|&s| s - s % 4096 < DEVICE_BYTES_MIN) {
        Cli::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                format!("--size {size}: {}", LayoutError::DeviceTooSmall(size)),
            )
            .exit()
    }
    let created = prepare_file(path, size, force)?;
    let sb = match format_device(path, node_id, size, log_bytes, force) {
        Ok(sb) => sb,
        Err(e) => {
            if created {
                // Leave nothing of a format that failed on a file it created.
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    };
    // The device is formatted whatever becomes of this line (a closed pipe
    // must not undo the format).
    outln!(
        "formatted {}: node {}, {} MiB, log {} MiB, page store {} MiB",
        path.display(),
        sb.node_id,
        sb.device_bytes >> 20,
        (sb.log_blocks * 4096) >> 20,
        (sb.pages_blocks * 4096) >> 20
    )?;
    Ok(())
}

fn format_device(
    path: &Path,
    node_id: u64,
    size: Option<u64>,
    log_bytes: Option<u64>,
    force: bool,
) -> Result<Superblock> {
    // DeviceError names the path itself.
    let dev = UringDevice::open(path, &UringConfig::default())?;
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
    Ok(sb)
}

/// Create (or, with --force, re-create) a zero-filled file device of `size`.
/// True if it created the file (which did not exist).
fn prepare_file(path: &Path, size: Option<u64>, force: bool) -> Result<bool> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(size) = size else {
                bail!(
                    "{} does not exist; pass --size to create a file device of that size",
                    path.display()
                );
            };
            device::create_zero_filled(path, size)?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
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
            Ok(false)
        }
        Ok(_) => Ok(false),
    }
}

fn run(
    path: &Path,
    listen: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
    config: Option<&Path>,
) -> Result<()> {
    let (config, uring, gossip, scrub) = match config {
        Some(p) => RunConfig::load(p)?,
        None => (
            NodeConfig::default(),
            UringConfig {
                placement: RUN_RING_DEFAULT,
                ..UringConfig::default()
            },
            GossipConfig::default(),
            ScrubConfig::default(),
        ),
    };
    // One runtime thread, which also drives the device's ring: measured on
    // this kind of machine, hand-offs between threads cost more than a
    // second core gives a node (docs/performance.md, "The node").
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // The device stays locked (one writer) for as long as the node has it open.
        let dev = UringDevice::open(path, &uring)?;
        let (node, recovered) = Node::open(Arc::new(dev), config)
            .await
            .with_context(|| format!("recovering {}", path.display()))?;
        if node.node_id == SCRATCH_NODE_ID {
            node.shutdown().await;
            bail!(
                "{} is a storbench scratch device (node id {SCRATCH_NODE_ID}), not a storage node's: \
                 give it a node id with `storaged format --device {} --node-id N --force`",
                path.display(),
                path.display()
            );
        }
        tracing::info!(
            node_id = node.node_id,
            segments = recovered.segments,
            records = recovered.records,
            undecodable = recovered.undecodable,
            "recovered"
        );
        let listener = bind(listen).with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr().context("reading the listening address")?;
        // Bound before the ready line, so a port taken fails the start.
        let metrics = match metrics {
            Some(m) => {
                let l = tokio::net::TcpListener::bind(m)
                    .await
                    .with_context(|| format!("serving metrics on {m}"))?;
                let a = l.local_addr().context("reading the metrics address")?;
                Some((l, a))
            }
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(node.clone(), listener, stop_rx.clone()));
        let metrics = metrics.map(|(l, a)| {
            (
                tokio::spawn(storaged::metrics::serve(node.clone(), l, stop_rx.clone())),
                a,
            )
        });
        let repair = tokio::spawn(storaged::gossip::shell::run(
            node.clone(),
            node.node_id,
            gossip,
            stop_rx,
        ));
        node.start_scrubber(scrub);
        // Scripts and tests wait for this line; systemd for READY=1. A
        // daemon keeps serving if nobody reads it (a closed stdout is not
        // a reason to stop a node), as daemons ignore SIGPIPE.
        if let Some((_, a)) = &metrics
            && let Err(e) = outln!("storaged: node {} metrics on http://{a}/metrics", node.node_id)
        {
            tracing::debug!(error = %e, "the metrics line was not printed");
        }
        if let Err(e) = outln!("storaged: node {} listening on {addr}", node.node_id) {
            tracing::debug!(error = %e, "the ready line was not printed");
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        if let Some(every) = sd_notify::watchdog_enabled() {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every / 2).await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            });
        }
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping: no new requests; finishing those in flight");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = stop_tx.send(true);
        let _ = server.await;
        let _ = repair.await;
        if let Some((task, _)) = metrics {
            let _ = task.await;
        }
        node.stop_scrubber().await;
        node.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::{RunConfig, ScrubConfig};

    fn scrub(text: &str) -> Result<ScrubConfig, String> {
        RunConfig::parse(text, Path::new("node.toml"))
            .map(|(_, _, _, s)| s)
            .map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn scrub_keys_are_read_with_their_defaults() {
        assert_eq!(scrub(""), Ok(ScrubConfig::default()));
        let d = ScrubConfig::default();
        assert_eq!(d.pass_period, Duration::from_secs(86_400));
        assert_eq!(d.rate_bytes_per_s_max, 256 << 20);
        assert!(d.enabled);
        let c = scrub("scrub_pass_period_s = 3600\nscrub_rate_bytes_per_s = \"64m\"\nscrub_enabled = false\n")
            .expect("valid");
        assert_eq!(
            c,
            ScrubConfig {
                pass_period: Duration::from_secs(3600),
                rate_bytes_per_s_max: 64 << 20,
                enabled: false,
                ..ScrubConfig::default()
            }
        );
        assert_eq!(
            scrub("scrub_rate_bytes_per_s = 1048576").map(|c| c.rate_bytes_per_s_max),
            Ok(1 << 20)
        );
    }

    #[test]
    fn bad_scrub_values_are_refused_naming_the_key() {
        for (text, key) in [
            ("scrub_pass_period_s = 0", "scrub_pass_period_s"),
            ("scrub_pass_period_s = -3", "scrub_pass_period_s"),
            ("scrub_pass_period_s = \"1d\"", "scrub_pass_period_s"),
            ("scrub_rate_bytes_per_s = 0", "scrub_rate_bytes_per_s"),
            ("scrub_rate_bytes_per_s = -1", "scrub_rate_bytes_per_s"),
            ("scrub_rate_bytes_per_s = \"fast\"", "scrub_rate_bytes_per_s"),
            ("scrub_rate_bytes_per_s = 1.5", "scrub_rate_bytes_per_s"),
            ("scrub_enabled = \"yes\"", "scrub_enabled"),
        ] {
            let e = scrub(text).expect_err(text);
            assert!(e.contains("node.toml") && e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn repair_io_inflight_bounds_background_io_and_is_checked() {
        let inflight = |text: &str| {
            RunConfig::parse(text, Path::new("node.toml"))
                .map(|(_, u, _, _)| u.background_inflight)
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(inflight(""), Ok(storaged::io::uring::DEFAULT_BACKGROUND_INFLIGHT));
        assert_eq!(inflight("repair_io_inflight = 4"), Ok(4));
        for text in [
            "repair_io_inflight = 0",
            "repair_io_inflight = 100000",
            "repair_io_inflight = -1",
        ] {
            let e = inflight(text).expect_err(text);
            assert!(
                e.contains("node.toml") && e.contains("repair_io_inflight"),
                "{text}: {e}"
            );
        }
    }
}
