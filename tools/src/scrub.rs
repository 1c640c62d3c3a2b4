//! `storctl scrub`: a priority scrub pass, now, on the chosen nodes, and its
//! report.
//!
//! Each chosen node (every node of the cluster file by default) is asked
//! for a priority pass (`Scrub`) over the chosen segments: all it holds, or
//! with `--pg N` the segment of that PG, on each node the placement puts
//! one (the others are skipped). The log is always read. storctl then asks
//! each node `ScrubStatus` every [`POLL_EVERY`] until the node's pass has
//! completed, and shows the bytes read over all nodes as a progress bar on
//! a terminal. The report is per node and per area (the log, each
//! segment): blocks and page versions checked, damage found, repaired, and
//! what is left, with where it lies.
//!
//! A node that cannot be asked, refuses, or stops answering is an
//! operational error: it is named with the reason, and the others are still
//! waited for and reported.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use computed::cluster::{Cluster, StorageNode};
use storaged::client::NodeClient;
use storaged::proto::Role;
use storaged::record::SegmentId;
use storaged::scrub::{self, Area, Damaged, Filter, PassReport};

/// One request to a node (connect, Scrub, one ScrubStatus), at most: a
/// node that does not answer within it has stopped answering.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a node is asked how its pass stands.
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// A node that shows neither our pass running, nor any pass running before
/// it, nor our pass completed, for this long has lost it (it restarted).
pub const LOST_PASS_AFTER: Duration = Duration::from_secs(10);

/// fsck's exit statuses, as `storctl scrub` uses them.
pub const EXIT_CLEAN: u8 = 0;
pub const EXIT_REPAIRED: u8 = 1;
pub const EXIT_DAMAGE_LEFT: u8 = 4;
pub const EXIT_OPERATIONAL: u8 = 8;

/// What one scrub covers: the nodes asked, each with its filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub volume: u64,
    /// `--pg`, when given.
    pub pg: Option<u32>,
    pub nodes: Vec<(u64, SocketAddr, Filter)>,
}

/// The nodes and segments `--node` and `--pg` choose, or why the flags do
/// not fit the cluster file (a usage error). `members`: the nodes the PG's
/// membership names as its segments hold it (a membership change moves
/// segments off the file's placement); the placement when None.
pub fn plan(cluster: &Cluster, node: Option<u64>, pg: Option<u32>, members: Option<&[u64]>) -> Result<Plan, String> {
    if let Some(id) = node
        && cluster.node(id).is_none()
    {
        let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.to_string()).collect();
        return Err(format!(
            "--node {id}: the cluster file has no node {id} (its nodes: {})",
            ids.join(", ")
        ));
    }
    let chosen = |n: &&StorageNode| node.is_none_or(|id| id == n.id);
    let nodes = match pg {
        None => cluster
            .nodes
            .iter()
            .filter(chosen)
            .map(|n| (n.id, n.address, Filter::All))
            .collect(),
        Some(pg) => {
            let Some(placed) = cluster.placement.get(pg as usize) else {
                return Err(format!(
                    "--pg {pg}: the volume has PGs 0 to {}",
                    cluster.pgs.saturating_sub(1)
                ));
            };
            let slots = members.unwrap_or(placed);
            let segment = SegmentId {
                volume: cluster.volume_id,
                pg,
            };
            let holding: Vec<(u64, SocketAddr, Filter)> = cluster
                .nodes
                .iter()
                .filter(chosen)
                .filter(|n| slots.contains(&n.id))
                .map(|n| (n.id, n.address, Filter::Segments(vec![segment])))
                .collect();
            if holding.is_empty()
                && let Some(id) = node
            {
                let on: Vec<String> = slots.iter().map(u64::to_string).collect();
                return Err(format!(
                    "--node {id} --pg {pg}: node {id} holds no segment of PG {pg} (its segments are on nodes {})",
                    on.join(", ")
                ));
            }
            holding
        }
    };
    Ok(Plan {
        volume: cluster.volume_id,
        pg,
        nodes,
    })
}

/// The report `storctl scrub` prints (as text or JSON).
#[derive(Debug, Serialize)]
pub struct Report {
    /// "clean", "repaired" (damage found, all of it repaired),
    /// "damage_left", or "error" (a node could not be scrubbed).
    pub status: &'static str,
    pub volume: u64,
    /// The PG scrubbed (`--pg`), or null for every segment.
    pub pg: Option<u32>,
    /// Over every node that answered.
    pub found: u64,
    pub repaired: u64,
    pub left: u64,
    pub nodes: Vec<NodeReport>,
}

#[derive(Debug, Serialize)]
pub struct NodeReport {
    pub id: u64,
    pub address: SocketAddr,
    /// Why the node could not be scrubbed; null when it was.
    pub error: Option<String>,
    /// The completed pass; null on an error.
    pub pass: Option<PassOut>,
}

/// A completed pass, as storctl shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PassOut {
    pub pass: u64,
    pub priority: bool,
    pub started_unix_secs: u64,
    pub ended_unix_secs: u64,
    pub bytes_read: u64,
    pub found: u64,
    pub repaired: u64,
    pub left: u64,
    pub areas: Vec<AreaOut>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AreaOut {
    /// "log" or "segment".
    pub area: &'static str,
    /// The segment's volume and PG; null for the log.
    pub volume: Option<u64>,
    pub pg: Option<u32>,
    pub blocks_checked: u64,
    pub pages_checked: u64,
    pub found: u64,
    pub repaired: u64,
    /// Damage left: found − repaired.
    pub left: u64,
    /// Where (the lowest, at most 64 an area).
    pub left_listed: Vec<FindingOut>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FindingOut {
    /// Byte offset on the node's device of the first block concerned.
    pub offset: u64,
    /// "log_block", "page_version", "older_slot" or "page_map".
    pub what: &'static str,
    /// The page (for a page map block: the first page it covers); null for a log block.
    pub page: Option<u64>,
    /// The LSN of the damaged page version; null for the others.
    pub lsn: Option<u64>,
    pub error: String,
}

impl PassOut {
    pub fn of(p: &PassReport) -> PassOut {
        let areas: Vec<AreaOut> = p.areas.iter().map(|(area, a)| AreaOut::of(*area, a)).collect();
        PassOut {
            pass: p.pass,
            priority: p.priority,
            started_unix_secs: p.started_unix_secs,
            ended_unix_secs: p.ended_unix_secs,
            bytes_read: p.bytes_read,
            found: areas.iter().map(|a| a.found).sum(),
            repaired: areas.iter().map(|a| a.repaired).sum(),
            left: areas.iter().map(|a| a.left).sum(),
            areas,
        }
    }
}

impl AreaOut {
    fn of(area: Area, a: &scrub::AreaReport) -> AreaOut {
        let (kind, volume, pg) = match area {
            Area::Log => ("log", None, None),
            Area::Segment(id) => ("segment", Some(id.volume), Some(id.pg)),
        };
        AreaOut {
            area: kind,
            volume,
            pg,
            blocks_checked: a.blocks_checked,
            pages_checked: a.pages_checked,
            found: a.found,
            repaired: a.repaired,
            left: a.found.saturating_sub(a.repaired),
            left_listed: a.left.iter().map(FindingOut::of).collect(),
        }
    }
}

impl FindingOut {
    fn of(f: &scrub::Finding) -> FindingOut {
        let (what, page, lsn) = match f.what {
            Damaged::LogBlock => ("log_block", None, None),
            Damaged::PageVersion { page, lsn } => ("page_version", Some(page), Some(lsn)),
            Damaged::OlderSlot { page } => ("older_slot", Some(page), None),
            Damaged::PageMap { first_page } => ("page_map", Some(first_page), None),
        };
        FindingOut {
            offset: f.offset,
            what,
            page,
            lsn,
            error: f.error.clone(),
        }
    }

    /// "page version of page 70 at LSN 1234" and the like.
    fn describe(&self) -> String {
        match (self.what, self.page, self.lsn) {
            ("page_version", Some(page), Some(lsn)) => format!("current version of page {page} (LSN {lsn})"),
            ("older_slot", Some(page), _) => format!("older slot of page {page}"),
            ("page_map", Some(page), _) => format!("page-version index block from page {page}"),
            _ => "log block".to_string(),
        }
    }
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        match self.status {
            "error" => EXIT_OPERATIONAL,
            "damage_left" => EXIT_DAMAGE_LEFT,
            "repaired" => EXIT_REPAIRED,
            _ => EXIT_CLEAN,
        }
    }

    /// The report of `plan`'s nodes from what each said.
    pub fn new(plan: &Plan, results: Vec<Result<PassReport, String>>) -> Report {
        let mut nodes = Vec::new();
        for ((id, address, _), result) in plan.nodes.iter().zip(results) {
            let (error, pass) = match result {
                Ok(p) => (None, Some(PassOut::of(&p))),
                Err(e) => (Some(e), None),
            };
            nodes.push(NodeReport {
                id: *id,
                address: *address,
                error,
                pass,
            });
        }
        let passes = || nodes.iter().filter_map(|n| n.pass.as_ref());
        let (found, repaired, left) = (
            passes().map(|p| p.found).sum::<u64>(),
            passes().map(|p| p.repaired).sum::<u64>(),
            passes().map(|p| p.left).sum::<u64>(),
        );
        // One status, the worst: an operational error hides nothing (the
        // nodes that answered are still reported), but it is what a script
        // must act on first.
        let status = if nodes.iter().any(|n| n.error.is_some()) {
            "error"
        } else if left > 0 {
            "damage_left"
        } else if found > 0 {
            "repaired"
        } else {
            "clean"
        };
        Report {
            status,
            volume: plan.volume,
            pg: plan.pg,
            found,
            repaired,
            left,
            nodes,
        }
    }
}

/// Bytes for people: 1.5 MiB.
pub fn bytes_human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A Unix time as UTC, `2026-12-06 08:01:02 UTC`.
pub fn utc(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// "pg 3", or "volume 9 pg 3" for a segment of another volume than the file's.
fn area_name(a: &AreaOut, volume: u64) -> String {
    match (a.volume, a.pg) {
        (Some(v), Some(pg)) if v == volume => format!("pg {pg}"),
        (Some(v), Some(pg)) => format!("volume {v} pg {pg}"),
        _ => "log".to_string(),
    }
}

/// The pass's figures on one line: "pass 4 (priority), 32.0 MiB read in 3 s, ended ...".
pub fn pass_line(p: &PassOut) -> String {
    format!(
        "pass {}{}, {} read in {} s, ended {}",
        p.pass,
        if p.priority { " (priority)" } else { "" },
        bytes_human(p.bytes_read),
        p.ended_unix_secs.saturating_sub(p.started_unix_secs),
        utc(p.ended_unix_secs)
    )
}

/// The human report: per node its pass and a row per area, the damage left
/// under its area, then the totals.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let what = match r.pg {
        Some(pg) => format!("PG {pg}"),
        None => "every segment".to_string(),
    };
    let verdict = match r.status {
        "clean" => "clean",
        "repaired" => "damage found, all of it repaired",
        "damage_left" => "DAMAGE LEFT",
        _ => "a node could not be scrubbed",
    };
    let _ = writeln!(out, "scrub of volume {} ({what}): {verdict}", r.volume);
    for n in &r.nodes {
        let _ = writeln!(out);
        match (&n.pass, &n.error) {
            (_, Some(e)) => {
                let _ = writeln!(out, "node {} ({}): FAILED: {e}", n.id, n.address);
            }
            (Some(p), None) => {
                let _ = writeln!(out, "node {} ({}): {}", n.id, n.address, pass_line(p));
                let _ = writeln!(
                    out,
                    "  {:<18}  {:>10}  {:>10}  {:>7}  {:>8}  {:>6}",
                    "area", "blocks", "pages", "found", "repaired", "left"
                );
                for a in &p.areas {
                    let _ = writeln!(
                        out,
                        "  {:<18}  {:>10}  {:>10}  {:>7}  {:>8}  {:>6}",
                        area_name(a, r.volume),
                        a.blocks_checked,
                        a.pages_checked,
                        a.found,
                        a.repaired,
                        a.left
                    );
                    for f in &a.left_listed {
                        let _ = writeln!(out, "    left: offset {}: {}: {}", f.offset, f.describe(), f.error);
                    }
                    let unlisted = a.left.saturating_sub(a.left_listed.len() as u64);
                    if unlisted > 0 {
                        let _ = writeln!(out, "    left: {unlisted} more not listed");
                    }
                }
            }
            (None, None) => {}
        }
    }
    let answered = r.nodes.iter().filter(|n| n.pass.is_some()).count();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "total: {answered} of {} node(s) scrubbed; damage found {}, repaired {}, left {}",
        r.nodes.len(),
        r.found,
        r.repaired,
        r.left
    );
    out
}

/// A node's scrubbing as `storctl status` shows it: the last completed
/// pass in figures, the pass under way, the damage counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScrubSummary {
    pub last_pass: Option<LastPass>,
    pub running: Option<RunningPass>,
    /// Since the node started: damage found, repaired, and left now.
    pub found_total: u64,
    pub repaired_total: u64,
    pub left_now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastPass {
    pub pass: u64,
    pub priority: bool,
    pub started_unix_secs: u64,
    pub ended_unix_secs: u64,
    pub bytes_read: u64,
    pub found: u64,
    pub repaired: u64,
    pub left: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunningPass {
    pub pass: u64,
    pub priority: bool,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl ScrubSummary {
    pub fn of(s: &scrub::Status) -> ScrubSummary {
        ScrubSummary {
            last_pass: s.last.as_ref().map(|p| {
                let p = PassOut::of(p);
                LastPass {
                    pass: p.pass,
                    priority: p.priority,
                    started_unix_secs: p.started_unix_secs,
                    ended_unix_secs: p.ended_unix_secs,
                    bytes_read: p.bytes_read,
                    found: p.found,
                    repaired: p.repaired,
                    left: p.left,
                }
            }),
            running: s.running.map(|r| RunningPass {
                pass: r.pass,
                priority: r.priority,
                bytes_done: r.bytes_done,
                bytes_total: r.bytes_total,
            }),
            found_total: s.found_total,
            repaired_total: s.repaired_total,
            left_now: s.left_now,
        }
    }

    /// One line: the last pass, the counters since start, a pass under way.
    pub fn line(&self) -> String {
        let mut out = match &self.last_pass {
            Some(p) => format!(
                "last pass {}{} ended {}, {} read: found {}, repaired {}, left {}",
                p.pass,
                if p.priority { " (priority)" } else { "" },
                utc(p.ended_unix_secs),
                bytes_human(p.bytes_read),
                p.found,
                p.repaired,
                p.left
            ),
            None => "no pass completed yet".to_string(),
        };
        let _ = write!(
            out,
            "; since start found {}, repaired {}, left now {}",
            self.found_total, self.repaired_total, self.left_now
        );
        if let Some(r) = &self.running {
            let percent = (r.bytes_done as f64 * 100.0 / r.bytes_total.max(1) as f64).min(100.0);
            let _ = write!(
                out,
                "; pass {}{} running, {percent:.0}% of {}",
                r.pass,
                if r.priority { " (priority)" } else { "" },
                bytes_human(r.bytes_total)
            );
        }
        out
    }
}

/// Bytes done and in all of each node's pass, for the progress bar.
type Progress = Arc<Mutex<Vec<(u64, u64)>>>;

fn show(progress: &Progress, bar: &indicatif::ProgressBar, node: usize, done: u64, total: u64) {
    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(slot) = p.get_mut(node) {
        *slot = (done, total);
    }
    let (done, total) = p.iter().fold((0, 0), |(d, t), &(nd, nt)| (d + nd, t + nt));
    bar.set_length(total.max(done));
    bar.set_position(done);
}

/// Asks node `id` at `addr` for a pass over `filter` and waits until it
/// completed; its report, or why not.
async fn scrub_node(
    id: u64,
    addr: SocketAddr,
    filter: Filter,
    progress: (Progress, indicatif::ProgressBar, usize),
) -> Result<PassReport, String> {
    let no_answer = |what: &str| format!("no answer to {what} within {} s", REQUEST_TIMEOUT.as_secs());
    let client = tokio::time::timeout(
        REQUEST_TIMEOUT,
        NodeClient::connect_to_node(addr, Role::Operator, 0, id),
    )
    .await
    .map_err(|_| no_answer("connecting"))?
    .map_err(|e| e.to_string())?;
    let pass = tokio::time::timeout(REQUEST_TIMEOUT, client.scrub(filter))
        .await
        .map_err(|_| no_answer("Scrub"))?
        .map_err(|e| format!("the node did not start a pass: {e}"))?;
    let (progress, bar, slot) = progress;
    let mut seen_working = Instant::now();
    loop {
        let status = tokio::time::timeout(REQUEST_TIMEOUT, client.scrub_status())
            .await
            .map_err(|_| no_answer("ScrubStatus"))?
            .map_err(|e| format!("ScrubStatus: {e}"))?;
        if let Some(last) = status.last
            && last.pass >= pass
        {
            // A later pass can only have started after ours ended; its
            // report then stands for ours (it read at least as much again).
            show(&progress, &bar, slot, last.bytes_read, last.bytes_read);
            return Ok(last);
        }
        match status.running {
            Some(r) if r.pass == pass => {
                show(&progress, &bar, slot, r.bytes_done, r.bytes_total);
                seen_working = Instant::now();
            }
            // Another pass first (one already under way): ours waits for it.
            Some(r) if r.pass < pass => seen_working = Instant::now(),
            _ => {
                if seen_working.elapsed() > LOST_PASS_AFTER {
                    return Err(format!(
                        "pass {pass} is neither running nor completed after {} s (did the node restart?)",
                        LOST_PASS_AFTER.as_secs()
                    ));
                }
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Run `plan`: every node at once, each until its pass completed or it
/// failed. `progress_bar`: draw one on stderr (a terminal, no `--json`).
pub fn run(plan: &Plan, progress_bar: bool) -> Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let bar = if progress_bar {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "scrub [{elapsed_precise}] [{wide_bar}] {binary_bytes}/{binary_total_bytes}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress: Progress = Arc::new(Mutex::new(vec![(0, 0); plan.nodes.len()]));
    let results = rt.block_on(async {
        let mut asks = Vec::new();
        for (i, (id, addr, filter)) in plan.nodes.iter().enumerate() {
            asks.push(scrub_node(
                *id,
                *addr,
                filter.clone(),
                (progress.clone(), bar.clone(), i),
            ));
        }
        futures_util::future::join_all(asks).await
    });
    bar.finish_and_clear();
    Ok(Report::new(plan, results))
}

/// A fake storage node for the tests of storctl's commands.
#[cfg(test)]
pub(crate) mod fake {
    use std::net::SocketAddr;

    use storaged::proto::{FRAME_BYTES_MAX, FrameDecoder, Message, PROTOCOL_VERSION, encode_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Node `id` on a free port of 127.0.0.1: answers Hello, and every
    /// other request with what `answer` makes of it (`None`: no answer), on
    /// every connection. Runs on the caller's runtime.
    pub(crate) async fn node(id: u64, answer: impl FnMut(Message) -> Option<Message> + Send + 'static) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = std::sync::Arc::new(std::sync::Mutex::new(answer));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(id, s, answer.clone()));
            }
        });
        addr
    }

    async fn serve(
        id: u64,
        mut s: tokio::net::TcpStream,
        answer: std::sync::Arc<std::sync::Mutex<impl FnMut(Message) -> Option<Message> + Send + 'static>>,
    ) {
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            decoder.push(&buf[..n]);
            while let Ok(Some(frame)) = decoder.next() {
                let reply = match frame.message {
                    Message::Hello { .. } => Message::HelloOk {
                        node_id: id,
                        protocol_version: u16::from(PROTOCOL_VERSION),
                    },
                    other => match (answer.lock().unwrap())(other) {
                        Some(reply) => reply,
                        None => continue,
                    },
                };
                let mut out = Vec::new();
                encode_frame(frame.request_id, &reply, &mut out).unwrap();
                if s.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storaged::proto::Message;
    use storaged::scrub::{AreaReport, Finding, Running, Status};

    fn cluster(nodes: &[SocketAddr], pgs: u32) -> Cluster {
        let computed: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Cluster::parse(&computed::cluster::local_cluster_toml(1, pgs, 64, computed, nodes)).unwrap()
    }

    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[test]
    fn flags_that_do_not_fit_the_cluster_file_are_refused_by_name() {
        let addrs = crate::closed_ports(6);
        let c = cluster(&addrs, 2);
        let all = plan(&c, None, None, None).unwrap();
        assert_eq!(all.nodes.len(), 6);
        assert!(all.nodes.iter().all(|(_, _, f)| *f == Filter::All));
        let one = plan(&c, Some(3), None, None).unwrap();
        assert_eq!(one.nodes, vec![(3, addrs[2], Filter::All)]);
        let pg1 = plan(&c, None, Some(1), None).unwrap();
        assert_eq!(pg1.nodes.len(), 6, "six nodes, each a segment of PG 1");
        let seg = Filter::Segments(vec![SegmentId { volume: 1, pg: 1 }]);
        assert!(pg1.nodes.iter().all(|(_, _, f)| *f == seg));
        let e = plan(&c, Some(9), None, None).unwrap_err();
        assert!(e.contains("--node 9") && e.contains("1, 2, 3, 4, 5, 6"), "{e}");
        let e = plan(&c, None, Some(2), None).unwrap_err();
        assert!(e.contains("--pg 2") && e.contains("PGs 0 to 1"), "{e}");
    }

    #[test]
    fn a_node_without_the_pg_is_skipped_and_naming_it_is_refused() {
        // Seven nodes: each PG has six, so one node holds none of PG 0.
        let addrs = crate::closed_ports(7);
        let c = cluster(&addrs, 1);
        let p = plan(&c, None, Some(0), None).unwrap();
        assert_eq!(p.nodes.len(), 6);
        let outside = c.nodes.iter().find(|n| !c.placement[0].contains(&n.id)).unwrap().id;
        assert!(p.nodes.iter().all(|(id, _, _)| *id != outside));
        let e = plan(&c, Some(outside), Some(0), None).unwrap_err();
        assert!(e.contains("holds no segment of PG 0"), "{e}");
    }

    #[test]
    fn a_pg_is_scrubbed_where_its_membership_has_moved_it_not_where_the_file_placed_it() {
        let addrs = crate::closed_ports(7);
        let c = cluster(&addrs, 1);
        let outside = c.nodes.iter().find(|n| !c.placement[0].contains(&n.id)).unwrap().id;
        let replaced = c.placement[0][0];
        let mut moved: Vec<u64> = c.placement[0].iter().copied().filter(|&id| id != replaced).collect();
        moved.push(outside);
        let p = plan(&c, None, Some(0), Some(&moved)).unwrap();
        let ids: Vec<u64> = p.nodes.iter().map(|(id, _, _)| *id).collect();
        assert!(ids.contains(&outside), "the new member is scrubbed: {ids:?}");
        assert!(!ids.contains(&replaced), "the member replaced is not: {ids:?}");
        assert_eq!(ids.len(), 6);
        assert!(plan(&c, Some(outside), Some(0), Some(&moved)).is_ok());
    }

    #[test]
    fn times_and_sizes_read_as_people_write_them() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_544_062), "2026-12-06 08:01:02 UTC");
        assert_eq!(bytes_human(512), "512 B");
        assert_eq!(bytes_human(3 << 19), "1.5 MiB");
    }

    fn finding(page: u64, lsn: u64) -> Finding {
        Finding {
            offset: 40960,
            what: Damaged::PageVersion { page, lsn },
            error: "CRC32C mismatch".into(),
            repaired: false,
        }
    }

    /// A pass over the log and segment 1/0: `found` damage, `repaired` of
    /// it repaired, the rest listed.
    fn report(pass: u64, found: u64, repaired: u64) -> PassReport {
        PassReport {
            pass,
            priority: true,
            started_unix_secs: 1_796_544_060,
            ended_unix_secs: 1_796_544_062,
            bytes_read: 3 << 20,
            areas: vec![
                (
                    Area::Log,
                    AreaReport {
                        blocks_checked: 512,
                        ..AreaReport::default()
                    },
                ),
                (
                    Area::Segment(SegmentId { volume: 1, pg: 0 }),
                    AreaReport {
                        blocks_checked: 0,
                        pages_checked: 64,
                        found,
                        repaired,
                        left: (repaired..found).map(|i| finding(70 + i, 1234)).collect(),
                    },
                ),
            ],
        }
    }

    /// A fake storage node `id`: answers Hello, `Scrub` with pass 5, and each
    /// `ScrubStatus` with the next of `statuses` (the last again when they
    /// run out). `None` in `statuses`: never answer that one.
    async fn fake_node(id: u64, statuses: Vec<Option<Status>>) -> SocketAddr {
        let mut asked = 0;
        fake::node(id, move |m| match m {
            Message::Scrub { .. } => Some(Message::ScrubStarted { pass: 5 }),
            Message::ScrubStatus => {
                let i = asked.min(statuses.len() - 1);
                asked += 1;
                statuses[i].clone().map(|status| Message::ScrubStatusOk { status })
            }
            other => panic!("unexpected {other:?}"),
        })
        .await
    }

    fn running(done: u64) -> Option<Status> {
        Some(Status {
            running: Some(Running {
                pass: 5,
                priority: true,
                bytes_done: done,
                bytes_total: 3 << 20,
            }),
            last: Some(report(4, 0, 0)),
            ..Status::default()
        })
    }

    fn done(found: u64, repaired: u64) -> Option<Status> {
        Some(Status {
            last: Some(report(5, found, repaired)),
            found_total: found,
            repaired_total: repaired,
            left_now: found - repaired,
            ..Status::default()
        })
    }

    /// Scrub the nodes at `addrs` (a cluster of them, every segment), in a
    /// thread of its own (`run` makes its own runtime).
    async fn scrub_of(addrs: Vec<SocketAddr>) -> Report {
        tokio::task::spawn_blocking(move || {
            let c = cluster(&addrs, 1);
            run(&plan(&c, None, None, None).unwrap(), false).unwrap()
        })
        .await
        .unwrap()
    }

    async fn six(statuses: Vec<Option<Status>>, first: Option<SocketAddr>) -> Vec<SocketAddr> {
        let mut addrs = Vec::new();
        for id in 1..=6 {
            match (id, first) {
                (1, Some(a)) => addrs.push(a),
                _ => addrs.push(fake_node(id, statuses.clone()).await),
            }
        }
        addrs
    }

    #[tokio::test]
    async fn a_clean_pass_on_every_node_exits_0() {
        let addrs = six(vec![running(0), running(1 << 20), done(0, 0)], None).await;
        let r = scrub_of(addrs).await;
        assert_eq!((r.status, r.exit_code()), ("clean", EXIT_CLEAN), "{r:?}");
        assert_eq!(r.nodes.len(), 6);
        let p = r.nodes[0].pass.as_ref().unwrap();
        assert_eq!((p.pass, p.bytes_read, p.areas.len()), (5, 3 << 20, 2));
        let text = render(&r);
        assert!(text.starts_with("scrub of volume 1 (every segment): clean"), "{text}");
        assert!(text.contains("pass 5 (priority), 3.0 MiB read in 2 s"), "{text}");
        assert!(
            text.contains("total: 6 of 6 node(s) scrubbed; damage found 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn damage_all_repaired_exits_1_and_damage_left_exits_4_with_its_location() {
        let r = scrub_of(six(vec![running(0), done(2, 2)], None).await).await;
        assert_eq!((r.status, r.exit_code()), ("repaired", EXIT_REPAIRED));
        assert_eq!((r.found, r.repaired, r.left), (12, 12, 0));

        let r = scrub_of(six(vec![done(3, 1)], None).await).await;
        assert_eq!((r.status, r.exit_code()), ("damage_left", EXIT_DAMAGE_LEFT));
        assert_eq!((r.found, r.repaired, r.left), (18, 6, 12));
        let text = render(&r);
        assert!(
            text.contains("left: offset 40960: current version of page 71 (LSN 1234): CRC32C mismatch"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"], "damage_left");
        let seg = &json["nodes"][0]["pass"]["areas"][1];
        assert_eq!(
            (seg["area"].as_str(), seg["pg"].as_u64(), seg["left"].as_u64()),
            (Some("segment"), Some(0), Some(2))
        );
        assert_eq!(
            seg["left_listed"][0],
            serde_json::json!({"offset": 40960, "what": "page_version", "page": 71, "lsn": 1234, "error": "CRC32C mismatch"})
        );
        assert_eq!(json["nodes"][0]["pass"]["areas"][0]["volume"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn a_node_down_or_silent_exits_8_named_and_the_others_are_still_reported() {
        let r = scrub_of(six(vec![done(1, 1)], Some(closed_port())).await).await;
        assert_eq!((r.status, r.exit_code()), ("error", EXIT_OPERATIONAL));
        let e = r.nodes[0].error.as_deref().unwrap();
        assert!(e.contains("Connection refused"), "{e}");
        assert!(r.nodes[1..].iter().all(|n| n.pass.is_some()));
        assert_eq!(r.found, 5, "the five that answered");
        let text = render(&r);
        assert!(
            text.contains("node 1 (") && text.contains("): FAILED: connecting to"),
            "{text}"
        );
        assert!(text.contains("total: 5 of 6 node(s) scrubbed"), "{text}");

        // A node that stops answering mid-pass.
        let silent = fake_node(1, vec![running(0), None]).await;
        let r = scrub_of(six(vec![done(0, 0)], Some(silent)).await).await;
        assert_eq!(r.exit_code(), EXIT_OPERATIONAL);
        let e = r.nodes[0].error.as_deref().unwrap();
        assert!(e.contains("no answer to ScrubStatus within 3 s"), "{e}");
    }
}
