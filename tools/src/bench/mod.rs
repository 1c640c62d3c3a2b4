//! storbench's parts, shared by its engines.
//!
//! An engine runs the jobs an argument set describes and returns, per job,
//! what happened in each direction ([`JobStats`]); [`report`] turns that into
//! fio's normal or JSON output. Engines: [`uring_engine`] (raw device),
//! [`log_engine`] (storaged's log, in-process), [`node_engine`] (a storage
//! node over TCP), [`cluster_engine`] (commits through computed).

pub mod appenders;
pub mod args;
pub mod cluster_engine;
pub mod log_engine;
pub mod node_engine;
pub mod report;
pub mod stats;
pub mod uring_engine;

pub use args::{BenchArgs, EngineKind, OutputFormat, Rw, SyncMode};
pub use stats::{DirStats, JobStats};

/// An engine: runs every job of `args` and returns one [`JobStats`] per job.
pub trait Engine {
    fn run(&self, args: &BenchArgs) -> anyhow::Result<Vec<JobStats>>;
}

/// Why a run did not produce figures: the caller maps these to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The engine exists in the interface but not in this build (exit code 2).
    #[error("--engine {0} is not built yet")]
    NotBuilt(&'static str),
    /// Bad arguments or an I/O failure (exit code 1).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Runs `args` on its engine.
pub fn run(args: &BenchArgs) -> Result<Vec<JobStats>, BenchError> {
    let engine: &dyn Engine = match args.engine {
        EngineKind::Uring => &uring_engine::UringEngine,
        EngineKind::Log => &log_engine::LogBench,
        EngineKind::Node => &node_engine::NodeBench,
        EngineKind::Cluster => &cluster_engine::ClusterBench,
    };
    Ok(engine.run(args)?)
}
