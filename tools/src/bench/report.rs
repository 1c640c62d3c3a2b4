//! Reporting: fio's JSON shape (so fio's parsers read ours) and a short
//! human summary in the style of fio's normal output.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde::ser::SerializeMap;

use super::stats::{DirStats, JobStats};

/// The percentiles fio reports by default (a subset), in fio's key format.
pub const PERCENTILES: [f64; 8] = [1.0, 5.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.99];

#[derive(Debug, Serialize)]
pub struct FioReport {
    #[serde(rename = "fio version")]
    pub fio_version: String,
    pub timestamp: u64,
    pub jobs: Vec<FioJob>,
}

#[derive(Debug, Serialize)]
pub struct FioJob {
    pub jobname: String,
    pub groupid: u32,
    pub error: i32,
    pub read: FioDir,
    pub write: FioDir,
}

#[derive(Debug, Serialize)]
pub struct FioDir {
    pub io_bytes: u64,
    pub io_kbytes: u64,
    pub bw_bytes: u64,
    /// KiB/s, as fio.
    pub bw: u64,
    pub iops: f64,
    /// Milliseconds, as fio.
    pub runtime: u64,
    pub total_ios: u64,
    pub short_ios: u64,
    pub drop_ios: u64,
    pub clat_ns: FioLat,
    pub lat_ns: FioLat,
}

#[derive(Debug, Serialize)]
pub struct FioLat {
    pub min: u64,
    pub max: u64,
    pub mean: f64,
    pub stddev: f64,
    #[serde(rename = "N")]
    pub n: u64,
    pub percentile: Percentiles,
}

/// fio's `"percentile": {"1.000000": ns, ...}`, in ascending order.
#[derive(Debug, Default)]
pub struct Percentiles(pub Vec<(f64, u64)>);

impl Serialize for Percentiles {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (p, v) in &self.0 {
            map.serialize_entry(&format!("{p:.6}"), v)?;
        }
        map.end()
    }
}

impl FioLat {
    pub fn from_histogram(h: &Histogram<u64>) -> FioLat {
        let n = h.len();
        if n == 0 {
            return FioLat {
                min: 0,
                max: 0,
                mean: 0.0,
                stddev: 0.0,
                n: 0,
                percentile: Percentiles(PERCENTILES.iter().map(|&p| (p, 0)).collect()),
            };
        }
        FioLat {
            min: h.min(),
            max: h.max(),
            mean: h.mean(),
            stddev: h.stdev(),
            n,
            percentile: Percentiles(PERCENTILES.iter().map(|&p| (p, h.value_at_percentile(p))).collect()),
        }
    }
}

impl FioDir {
    pub fn from_stats(d: &DirStats) -> FioDir {
        // One timestamp pair per I/O: submission to completion is both fio's
        // clat and lat here (storbench has no separate submission latency).
        let lat = || FioLat::from_histogram(&d.latency_ns);
        FioDir {
            io_bytes: d.bytes,
            io_kbytes: d.bytes / 1024,
            bw_bytes: d.bytes_per_second() as u64,
            bw: (d.bytes_per_second() / 1024.0) as u64,
            iops: d.iops(),
            runtime: d.runtime.as_millis() as u64,
            total_ios: d.ios,
            short_ios: 0,
            drop_ios: d.dropped,
            clat_ns: lat(),
            lat_ns: lat(),
        }
    }
}

/// The jobs as reported: one per job, or one merged with `group_reporting`.
pub fn reported_jobs(jobs: &[JobStats], group_reporting: bool) -> Vec<JobStats> {
    if !group_reporting || jobs.len() <= 1 {
        return jobs.to_vec();
    }
    let mut merged = JobStats::default();
    for job in jobs {
        merged.merge(job);
    }
    vec![merged]
}

pub fn fio_report(jobname: &str, jobs: &[JobStats], group_reporting: bool) -> FioReport {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    FioReport {
        fio_version: format!("storbench-{}", env!("CARGO_PKG_VERSION")),
        timestamp,
        jobs: reported_jobs(jobs, group_reporting)
            .iter()
            .map(|j| FioJob {
                jobname: jobname.to_owned(),
                groupid: 0,
                error: 0,
                read: FioDir::from_stats(&j.read),
                write: FioDir::from_stats(&j.write),
            })
            .collect(),
    }
}

/// fio-like human lines: IOPS, bandwidth, completion latency and percentiles.
pub fn normal_report(jobname: &str, jobs: &[JobStats], group_reporting: bool) -> String {
    let reported = reported_jobs(jobs, group_reporting);
    let mut out = String::new();
    for job in &reported {
        let n = if group_reporting { jobs.len() } else { 1 };
        let _ = writeln!(out, "{jobname}: (groupid=0, jobs={n}): err= 0");
        for (label, d) in [("read", &job.read), ("write", &job.write)] {
            if d.ios == 0 {
                continue;
            }
            let bw = d.bytes_per_second();
            let _ = writeln!(
                out,
                "  {label}: IOPS={}, BW={:.1}MiB/s ({:.1}MB/s)({:.1}MiB/{}msec)",
                human_count(d.iops()),
                bw / (1024.0 * 1024.0),
                bw / 1e6,
                d.bytes as f64 / (1024.0 * 1024.0),
                d.runtime.as_millis()
            );
            let h = &d.latency_ns;
            let _ = writeln!(
                out,
                "    clat (nsec): min={}, max={}, avg={:.0}, stdev={:.0}",
                h.min(),
                h.max(),
                h.mean(),
                h.stdev()
            );
            let pcts: Vec<String> = PERCENTILES
                .iter()
                .map(|&p| format!("{p:.2}th=[{}]", h.value_at_percentile(p)))
                .collect();
            let _ = writeln!(out, "     clat percentiles (nsec): {}", pcts.join(", "));
        }
    }
    out
}

fn human_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn job(ios: u64) -> JobStats {
        let mut j = JobStats::default();
        j.write.ios = ios;
        j.write.bytes = ios * 4096;
        j.write.runtime = Duration::from_secs(2);
        for i in 1..=ios {
            j.write.latency_ns.saturating_record(i * 1000);
        }
        j
    }

    #[test]
    fn json_has_the_keys_fio_parsers_read() {
        let jobs = vec![job(100), job(300)];
        let text = serde_json::to_string(&fio_report("t", &jobs, false)).expect("serialize");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parse");
        assert!(v["fio version"].as_str().is_some_and(|s| s.starts_with("storbench-")));
        let jobs_json = v["jobs"].as_array().expect("jobs");
        assert_eq!(jobs_json.len(), 2);
        let j = &jobs_json[0];
        assert_eq!(j["jobname"], "t");
        assert_eq!(j["groupid"], 0);
        assert_eq!(j["error"], 0);
        let w = &j["write"];
        for key in [
            "io_bytes",
            "io_kbytes",
            "bw_bytes",
            "bw",
            "iops",
            "runtime",
            "total_ios",
        ] {
            assert!(w[key].is_number(), "write.{key} missing in {w}");
        }
        assert_eq!(w["total_ios"], 100);
        assert_eq!(w["io_bytes"], 409600);
        assert_eq!(w["runtime"], 2000);
        assert_eq!(w["iops"].as_f64(), Some(50.0));
        for lat in ["clat_ns", "lat_ns"] {
            for key in ["min", "max", "mean", "stddev", "N"] {
                assert!(w[lat][key].is_number(), "{lat}.{key} missing");
            }
            for p in [
                "1.000000",
                "5.000000",
                "10.000000",
                "50.000000",
                "90.000000",
                "99.000000",
                "99.900000",
                "99.990000",
            ] {
                assert!(w[lat]["percentile"][p].is_number(), "{lat} percentile {p}");
            }
        }
        let p50 = w["clat_ns"]["percentile"]["50.000000"].as_u64().expect("p50");
        assert!((49_000..=51_000).contains(&p50), "p50 {p50}");
        // The unused direction is all zeros, in the same shape.
        assert_eq!(j["read"]["total_ios"], 0);
        assert_eq!(j["read"]["clat_ns"]["percentile"]["99.000000"], 0);
    }

    #[test]
    fn group_reporting_merges() {
        let jobs = vec![job(100), job(300)];
        let r = fio_report("t", &jobs, true);
        assert_eq!(r.jobs.len(), 1);
        assert_eq!(r.jobs[0].write.total_ios, 400);
        assert_eq!(r.jobs[0].write.clat_ns.n, 400);
        assert!(normal_report("t", &jobs, true).contains("jobs=2"));
    }
}
