//! What a job measured: per direction, I/O count, bytes, runtime and a latency histogram.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency the histograms track exactly; slower I/Os are recorded at this value.
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// Significant digits kept by the histograms: 0.1% error, as fio's bins roughly.
const LATENCY_SIGFIG: u8 = 3;

/// One direction (read or write) of one job.
#[derive(Debug, Clone)]
pub struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    /// Wall time of the job that did these I/Os (zero if it did none).
    pub runtime: Duration,
    /// Submission to completion of each I/O, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// I/Os issued that never completed: commits not acknowledged when the
    /// grace after the run ran out (fio's `drop_ios`). Not in `ios`.
    pub dropped: u64,
}

impl Default for DirStats {
    fn default() -> Self {
        DirStats {
            ios: 0,
            bytes: 0,
            runtime: Duration::ZERO,
            latency_ns: new_latency_histogram(),
            dropped: 0,
        }
    }
}

impl DirStats {
    /// Adds another job's figures, as fio's group_reporting does: sums of I/Os
    /// and bytes, the longest runtime, the union of latencies.
    pub fn merge(&mut self, other: &DirStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.dropped += other.dropped;
        self.runtime = self.runtime.max(other.runtime);
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_ns.add(&other.latency_ns);
    }

    pub fn iops(&self) -> f64 {
        per_second(self.ios, self.runtime)
    }

    pub fn bytes_per_second(&self) -> f64 {
        per_second(self.bytes, self.runtime)
    }
}

fn per_second(count: u64, runtime: Duration) -> f64 {
    let secs = runtime.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// One job: both directions (the unused one stays at zero).
#[derive(Debug, Clone, Default)]
pub struct JobStats {
    pub read: DirStats,
    pub write: DirStats,
}

impl JobStats {
    pub fn merge(&mut self, other: &JobStats) {
        self.read.merge(&other.read);
        self.write.merge(&other.write);
    }
}

pub fn new_latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failure is a bug here.
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, LATENCY_SIGFIG).expect("constant histogram bounds are valid")
}
