//! What the appending engines (log, node) share: ending a run on time and
//! turning per-appender figures into per-job write stats.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use super::stats::{DirStats, JobStats};

/// How long appends still out after --runtime may take before the run ends
/// without them (they count as not done).
pub const GRACE: Duration = Duration::from_secs(5);

/// Each appender task returns its job number and its figures.
pub type Appenders = JoinSet<Result<(u64, DirStats)>>;

/// Raise `stop` after `duration` (if time-based), wait for the appenders
/// (at most `duration` + [`GRACE`]), and report every job's appends as
/// writes of `bs` bytes over the run's wall time.
pub async fn finish(
    mut tasks: Appenders,
    stop: Arc<AtomicBool>,
    duration: Option<Duration>,
    numjobs: u32,
    bs: u64,
    start: Instant,
) -> Result<Vec<JobStats>> {
    if let Some(d) = duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let deadline = duration.map(|d| tokio::time::Instant::from_std(start) + d + GRACE);
    let mut per_job: Vec<DirStats> = (0..numjobs).map(|_| DirStats::default()).collect();
    loop {
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at, tasks.join_next()).await {
                Ok(next) => next,
                Err(_) => {
                    storaged::errln!(
                        "storbench: {} appenders still waiting after the grace; stopping them",
                        tasks.len()
                    );
                    tasks.abort_all();
                    break;
                }
            },
            None => tasks.join_next().await,
        };
        let Some(joined) = next else { break };
        let (job, s) = joined.context("appender task")??;
        per_job[job as usize].merge(&s);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    Ok(per_job
        .into_iter()
        .map(|mut w| {
            w.bytes = w.ios * bs;
            w.runtime = elapsed;
            JobStats {
                read: DirStats::default(),
                write: w,
            }
        })
        .collect())
}
