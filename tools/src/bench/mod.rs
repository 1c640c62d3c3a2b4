//! storbench's parts, shared by its engines.
//!
//! An engine runs the jobs an argument set describes and returns, per job,
//! what happened in each direction ([`JobStats`]); [`report`] turns that into
//! fio's normal or JSON output. Engines: [`uring_engine`] (raw device),
//! [`log_engine`] (storaged's log, in-process), [`node_engine`] (a storage
//! node over TCP), [`cluster_engine`] (commits through computed).
//! [`validate`] refuses flags that do not fit the engine before any runs.

pub mod appenders;
pub mod args;
pub mod cluster_engine;
pub mod log_engine;
pub mod node_engine;
pub mod report;
pub mod stats;
pub mod uring_engine;
pub mod validate;
pub mod verify_journal;

pub use args::{BenchArgs, EngineKind, OutputFormat, Rw, SyncMode};
pub use stats::{DirStats, JobStats};
pub use validate::UsageError;

/// An engine: runs every job of `args` and returns one [`JobStats`] per job.
pub trait Engine {
    fn run(&self, args: &BenchArgs) -> anyhow::Result<Vec<JobStats>>;
}

/// Why a run did not succeed: the caller maps these to exit codes.
#[derive(Debug)]
pub enum BenchError {
    /// A flag out of range or flags that do not fit together (exit code 2,
    /// as for a flag clap refuses). Nothing was run.
    Usage(String),
    /// The run measured something but did not succeed (nothing acknowledged,
    /// commits dropped, --verify found damage, or a signal stopped it): the
    /// report is still printed, then the process ends as [`Ending`] says.
    Ended(Ended),
    /// An I/O failure, or a check that failed before any figures (exit code 1).
    Failed(anyhow::Error),
}

/// A run that has figures but did not succeed.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct Ended {
    pub jobs: Vec<JobStats>,
    pub why: Ending,
}

#[derive(Debug, thiserror::Error)]
pub enum Ending {
    /// Exit code 1, with this message.
    #[error("{0}")]
    Failed(String),
    /// Stopped by this signal (SIGINT, SIGTERM, SIGHUP) after cleaning up:
    /// the process ends by the same signal.
    #[error("stopped by signal {0}")]
    Signal(i32),
}

impl From<anyhow::Error> for BenchError {
    fn from(e: anyhow::Error) -> Self {
        let e = match e.downcast::<Ended>() {
            Ok(ended) => return BenchError::Ended(ended),
            Err(e) => e,
        };
        match e.downcast::<UsageError>() {
            Ok(usage) => BenchError::Usage(usage.to_string()),
            Err(e) => BenchError::Failed(e),
        }
    }
}

/// Runs `args` on its engine, once [`validate::check`] has accepted them.
pub fn run(args: &BenchArgs) -> Result<Vec<JobStats>, BenchError> {
    validate::check(args).map_err(|e| BenchError::Usage(e.to_string()))?;
    let engine: &dyn Engine = match args.engine {
        EngineKind::Uring => &uring_engine::UringEngine,
        EngineKind::Log => &log_engine::LogBench,
        EngineKind::Node => &node_engine::NodeBench,
        EngineKind::Cluster => &cluster_engine::ClusterBench,
    };
    Ok(engine.run(args)?)
}
