//! storbench's command line: fio's flag names and meanings, and fio's size and
//! time syntax, so a fio command line carries over by changing the binary name.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "storbench",
    version,
    about = "fio-style benchmark for storaged's devices, log and cluster",
    long_about = "fio-style benchmark. Flags have fio's names and meanings; both `--flag value` \
                  and `--flag=value` work. `--output-format=json` prints fio's JSON shape so fio's \
                  parsers read it.",
    after_help = EXIT_STATUS_HELP
)]
pub struct BenchArgs {
    /// Job name, reported as `jobname`.
    #[arg(long, default_value = "storbench")]
    pub name: String,

    /// File or block device to run on (engines uring, log and node). A
    /// missing file is created first, --size bytes (default 1g): zero-filled
    /// for uring; zero-filled and formatted as a scratch device (node id 0,
    /// which `storaged run` refuses) for log and node.
    #[arg(long)]
    pub filename: Option<PathBuf>,

    /// I/O pattern: read, write, randread, randwrite; `commit` is for the
    /// cluster engine. Default: read for uring, write for log, commit for cluster.
    #[arg(long, value_enum)]
    pub rw: Option<Rw>,

    /// Block size of each I/O, e.g. 4k, 64k, 1m. uring: a multiple of 4096
    /// (O_DIRECT), at most 64m. log and node: the log space one record takes,
    /// framing included, 64 bytes to 64k (node: at most 8k; with --rw
    /// randread, the page size, a power of two from 512 to 64k). cluster:
    /// bytes a commit writes into each of its pages, any size up to the
    /// volume's page (at least 16 with --verify).
    #[arg(long, value_parser = parse_size_nonzero, default_value = "4k")]
    pub bs: u64,

    /// I/Os kept in flight per job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub iodepth: u32,

    /// Submit as soon as this many I/Os are queued (fio's default, 1, submits
    /// each at once; larger values save syscalls on fast devices, but on
    /// some — virtio among them — batching delays dispatch and costs IOPS).
    #[arg(long = "iodepth_batch_submit", alias = "iodepth_batch", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub iodepth_batch_submit: u32,

    /// Number of jobs (threads), each with its own ring, all on the same file.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub numjobs: u32,

    /// Region of the file to use, and, unless time-based, bytes per job
    /// (default: the whole file or device). Suffixes k, m, g, t (powers of 1024).
    #[arg(long, value_parser = parse_size_nonzero)]
    pub size: Option<u64>,

    /// Run for this long (`5`, `5s`, `500ms`, `1m`); implies --time_based.
    /// The cluster engine defaults to 5s when neither this nor --size is given.
    #[arg(long, value_parser = parse_duration)]
    pub runtime: Option<Duration>,

    /// Run for --runtime even if --size bytes are done (repeating the region).
    #[arg(long = "time_based", num_args = 0..=1, default_missing_value = "1", value_parser = parse_bool, default_value = "0")]
    pub time_based: bool,

    /// Write durability of --engine uring: none, or dsync (every write is
    /// durable on completion, like O_DSYNC). The other engines always write
    /// durably and refuse it (the log and node engines: --log-durability).
    #[arg(long, value_enum, default_value_t = SyncMode::None)]
    pub sync: SyncMode,

    /// Engine uring: issue an fdatasync after every N writes (0: never). Only 0 and 1 are
    /// supported: with 1, each write is followed by IORING_OP_FSYNC(DATASYNC)
    /// once it completes, and counts as done when the fsync completes.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1))]
    pub fdatasync: u32,

    /// normal (human) or json (fio's JSON shape).
    #[arg(long = "output-format", value_enum, default_value_t = OutputFormat::Normal)]
    pub output_format: OutputFormat,

    /// Report all jobs merged into one.
    #[arg(long = "group_reporting", num_args = 0..=1, default_missing_value = "1", value_parser = parse_bool, default_value = "0")]
    pub group_reporting: bool,

    /// What to drive: uring (raw device through io_uring + O_DIRECT), log (the log engine in-process), node (a storage node over TCP on 127.0.0.1), cluster (commits through computed: --cluster FILE or --local-cluster N).
    #[arg(long, value_enum, default_value_t = EngineKind::Uring)]
    pub engine: EngineKind,

    /// Log and node engines: write to a device `storaged format` made for a
    /// storage node, whose log would then hold records of segments the node
    /// never had. A device another process has open is refused even so.
    #[arg(long)]
    pub force: bool,

    /// Node engine: connections the appenders share (requests pipeline on
    /// each, as computed's do).
    #[arg(long = "node-connections", default_value_t = 1, value_parser = parse_count_1_to_64)]
    pub node_connections: usize,

    /// Node engine: append to a running `storaged run` at this address
    /// instead of starting a node in-process on --filename.
    #[arg(long = "node-addr")]
    pub node_addr: Option<std::net::SocketAddr>,

    /// Node engine with --rw randread: pages read at random (each first
    /// written as an image, coalesced into a page version, then changed by
    /// --chain-deltas deltas held in memory above it).
    #[arg(long = "node-pages", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub node_pages: u64,

    /// Node engine with --rw randread: deltas each page's chain holds above
    /// its stored version, applied by every GetPage.
    #[arg(long = "chain-deltas", default_value_t = 8, value_parser = clap::value_parser!(u64).range(0..=64))]
    pub chain_deltas: u64,

    /// Log engine: most 4 KiB blocks packed into one write.
    #[arg(long = "log-write-blocks", default_value_t = storaged::log::LogConfig::default().write_blocks_max,
          value_parser = parse_count_nonzero)]
    pub log_write_blocks: usize,

    /// Log engine: most writes in flight at once; appends that arrive
    /// while they are all busy ride in the next write (group commit).
    #[arg(long = "log-writes-inflight", default_value_t = storaged::log::LogConfig::default().writes_inflight_max,
          value_parser = parse_count_nonzero)]
    pub log_writes_inflight: usize,

    /// Log and node engines: drive the device's io_uring from the runtime
    /// thread (runtime, as `storaged run` does by default) or from a thread
    /// of its own (thread).
    #[arg(long, default_value_t = storaged::io::uring::RingPlacement::Runtime)]
    pub ring: storaged::io::uring::RingPlacement,

    /// Log engine: make writes durable with RWF_DSYNC on each (dsync), or
    /// with a flush after they complete (flush).
    #[arg(long = "log-durability", value_enum, default_value_t = LogDurability::Dsync)]
    pub log_durability: LogDurability,

    /// Cluster engine: the cluster file of a running cluster (e.g. DIR/cluster.toml
    /// of `storctl dev-cluster up`).
    #[arg(long, conflicts_with = "local_cluster")]
    pub cluster: Option<PathBuf>,

    /// Cluster engine: start a dev cluster of N storage nodes (and computed)
    /// for the run, in a temp dir under /var/tmp (or --dir), and stop it
    /// after, also on SIGINT, SIGTERM or SIGHUP. Needs `storaged` and `computed` next to
    /// storbench (`cargo build --release`).
    #[arg(long = "local-cluster", value_name = "N", value_parser = parse_local_cluster_nodes)]
    pub local_cluster: Option<usize>,

    /// Cluster engine with --local-cluster: the dev cluster's directory
    /// (devices, logs, cluster.toml; formatted afresh) instead of a temp dir.
    #[arg(long, requires = "local_cluster")]
    pub dir: Option<PathBuf>,

    /// Cluster engine with --local-cluster: each node's device size.
    #[arg(long = "device-size", value_parser = parse_size_nonzero, default_value = "128m")]
    pub device_size: u64,

    /// Cluster engine: pages each transaction writes (--bs bytes in each).
    #[arg(long = "pages-per-txn", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub pages_per_txn: u32,

    /// Cluster engine: after --runtime, how long commits still out may take
    /// before the run ends without them (they count as not committed, and as
    /// `drop_ios` in the JSON, and the run fails: exit status 1).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub grace: Duration,

    /// Cluster engine, --rw commit: write unique payloads, read every
    /// acknowledged one back after the run (the latest write of each byte
    /// range), list missing or wrong ones and exit 1 if there are any.
    #[arg(long)]
    pub verify: bool,

    /// Cluster engine with --verify: also append every acknowledged commit
    /// (its byte ranges and payload seed) to FILE as it is acknowledged, and
    /// fsync FILE before the run reports; a journal of the same volume is
    /// appended to. With --verify-only: the journal to check. The format is
    /// a text file, one checksummed line per commit (see
    /// tools/src/bench/verify_journal.rs).
    #[arg(long = "verify-journal", value_name = "FILE")]
    pub verify_journal: Option<PathBuf>,

    /// Cluster engine: run no commits; read back from the running cluster
    /// (--cluster FILE) the latest journaled write of every byte range of
    /// --verify-journal FILE, list missing and wrong ones, exit 1 if any.
    /// A range may also hold a later write of the same committer that was
    /// sent but not acknowledged (it may have landed). Use it after crashes,
    /// restarts and repairs.
    #[arg(long = "verify-only")]
    pub verify_only: bool,

    /// Cluster engine: connections to computed the committers share
    /// (requests pipeline on each).
    #[arg(long = "cluster-connections", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cluster_connections: u32,
}

/// storbench's exit statuses, shown by --help.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    the run completed (with --verify or --verify-only: nothing missing or wrong)
  1    the run failed: an I/O or connection error; with --engine cluster --rw commit,
       nothing was acknowledged or commits were dropped (not acknowledged within
       --grace: drop_ios in the JSON); with --rw randread, nothing was read;
       --verify or --verify-only found missing or
       wrong data. The report of what ran is still printed.
  2    usage error: a bad flag, or flags that do not fit the engine
  Stopped by SIGINT, SIGTERM or SIGHUP, --engine cluster stops its --local-cluster,
  prints what ran, and ends by the same signal (a shell shows 128+N: 130, 143, 129).
  Output into a closed pipe ends storbench quietly, as it ends cat: by SIGPIPE
  (a shell shows 141), after stopping its --local-cluster.";

/// The cluster engine's run time when neither --runtime nor --size bounds it.
pub const CLUSTER_RUNTIME_DEFAULT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogDurability {
    Dsync,
    Flush,
}

impl From<LogDurability> for storaged::log::DurabilityMode {
    fn from(d: LogDurability) -> Self {
        match d {
            LogDurability::Dsync => storaged::log::DurabilityMode::Dsync,
            LogDurability::Flush => storaged::log::DurabilityMode::Flush,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    /// Cluster engine only: commits through computed.
    Commit,
}

impl Rw {
    pub fn is_write(self) -> bool {
        matches!(self, Rw::Write | Rw::Randwrite | Rw::Commit)
    }
    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    #[value(alias = "0")]
    None,
    Dsync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Normal,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    Uring,
    Log,
    /// A storage node in-process, appended to over TCP on 127.0.0.1.
    Node,
    Cluster,
}

impl BenchArgs {
    /// The I/O pattern, or the engine's natural one when --rw is not given.
    pub fn rw(&self) -> Rw {
        self.rw.unwrap_or(match self.engine {
            EngineKind::Uring => Rw::Read,
            EngineKind::Log | EngineKind::Node => Rw::Write,
            EngineKind::Cluster => Rw::Commit,
        })
    }

    /// How long to run, if time-based. The cluster engine runs for
    /// [`CLUSTER_RUNTIME_DEFAULT`] when neither --runtime nor --size is given.
    pub fn duration(&self) -> Option<Duration> {
        match (self.runtime, self.engine, self.size) {
            (None, EngineKind::Cluster, None) => Some(CLUSTER_RUNTIME_DEFAULT),
            (runtime, _, _) => runtime,
        }
    }
}

/// Parses fio's sizes: plain bytes or a number with k/m/g/t (optionally
/// followed by `b` or `ib`, any case), all powers of 1024 as fio's default
/// `kb_base=1024` has it. One parser for every tool: storaged's.
pub fn parse_size(s: &str) -> Result<u64, String> {
    storaged::units::parse_bytes(s)
}

/// [`parse_size`] for flags where zero means nothing useful (--bs, --size).
pub fn parse_size_nonzero(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("must be more than zero".into()),
        n => Ok(n),
    }
}

/// A count of at least 1.
pub fn parse_count_nonzero(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a count")),
    }
}

fn parse_count_1_to_64(s: &str) -> Result<usize, String> {
    match parse_count_nonzero(s)? {
        n if n > 64 => Err("must be at most 64".into()),
        n => Ok(n),
    }
}

/// --local-cluster N: a volume's PG has 6 segments on 6 nodes.
fn parse_local_cluster_nodes(s: &str) -> Result<usize, String> {
    match parse_count_nonzero(s)? {
        n if n < 6 => Err("a volume needs at least 6 storage nodes".into()),
        n => Ok(n),
    }
}

/// Parses fio's times: plain seconds, or a number with us, ms, s, m, h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("`{s}` is not a duration (expected e.g. 5, 5s, 500ms, 1m)"));
    }
    let value: u64 = num.parse().map_err(|_| format!("`{s}`: number too large"))?;
    let d = match suffix.to_ascii_lowercase().as_str() {
        "" | "s" | "sec" => value.checked_mul(1).map(Duration::from_secs),
        "us" | "usec" => Some(Duration::from_micros(value)),
        "ms" | "msec" => Some(Duration::from_millis(value)),
        "m" | "min" => value.checked_mul(60).map(Duration::from_secs),
        "h" => value.checked_mul(3600).map(Duration::from_secs),
        other => {
            return Err(format!("`{s}`: unknown time unit `{other}` (use us, ms, s, m or h)"));
        }
    };
    match d {
        Some(d) if !d.is_zero() => Ok(d),
        Some(_) => Err("must be more than zero".into()),
        None => Err(format!("`{s}`: duration overflows")),
    }
}

/// fio's booleans: `--time_based` alone, or `=1`/`=0`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean (use 1 or 0)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("99999999999t").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn both_flag_forms() {
        let a = BenchArgs::try_parse_from([
            "storbench",
            "--rw=randwrite",
            "--bs",
            "8k",
            "--iodepth=32",
            "--size",
            "1g",
            "--runtime=500ms",
            "--time_based",
            "--sync=dsync",
            "--output-format",
            "json",
            "--group_reporting",
        ])
        .expect("parse");
        assert_eq!(a.rw(), Rw::Randwrite);
        assert_eq!(a.bs, 8192);
        assert_eq!(a.iodepth, 32);
        assert_eq!(a.size, Some(1 << 30));
        assert_eq!(a.runtime, Some(Duration::from_millis(500)));
        assert!(a.time_based);
        assert_eq!(a.sync, SyncMode::Dsync);
        assert_eq!(a.output_format, OutputFormat::Json);
        assert!(a.group_reporting);

        let b = BenchArgs::try_parse_from(["storbench", "--time_based=0", "--bs=4x"]);
        assert!(b.is_err());
        let c = BenchArgs::try_parse_from(["storbench", "--time_based=0"]).expect("parse");
        assert!(!c.time_based);
        assert!(BenchArgs::try_parse_from(["storbench", "--iodepth=0"]).is_err());
    }
}
