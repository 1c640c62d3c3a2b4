//! `storctl repair`: fill a PG's gaps now, move a segment to another node,
//! or roll a move back; and move every segment of a node.
//!
//! Nothing is kept here between runs: where a repair stands lives in the
//! segments (their SCLs) and in computed (the PG's membership), so a run
//! after a crash of storctl, computed or a node picks up from what they
//! say, and a run with nothing left to do exits 0.
//!
//! - Gap fill (`--pg N`): only the storage nodes are asked (it works with
//!   computed down). The target is the PG's PGCL when the run starts; each
//!   segment behind it is asked to fill its gaps now (`FillGaps`: its node
//!   asks its peers for their digests at once rather than at its next
//!   gossip round, and pulls or hydrates what it lacks), and storctl
//!   watches every up member's SCL reach the target.
//! - Replace (`--pg N --replace F --with G`): computed is asked to start
//!   the change (dual membership, G hydrates from its peers, then the new
//!   set alone); storctl waits until the PG's membership has G and not F.
//!   A change to G already under way is only waited for.
//! - Abort (`--pg N --abort`): the change under way is rolled back to its
//!   old set.
//! - `--node F --with G`: a replace of F by G in every PG whose membership
//!   has F, all at once.
//!
//! Each wait is bounded (`--timeout`); past it the run exits 4 saying where
//! each PG stands and what to run next.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use computed::client::Client;
use computed::cluster::{Cluster, WRITE_QUORUM};
use storaged::client::NodeClient;
use storaged::proto::Role;
use storaged::record::SegmentId;

use crate::status::{self, MembershipStatus, PgStatus};

/// How long a run waits for the repair to finish, by default.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(300);
/// One request to computed (connecting included), at most.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often storctl asks how a repair stands.
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// A gap fill whose segments moved no closer to the target for this long
/// asks their nodes to fill now again (a node backs off a peer that failed
/// it; the operator may have just mended that peer).
pub const FILL_ASK_AGAIN_AFTER: Duration = Duration::from_secs(5);

pub const EXIT_NOTHING_NEEDED: u8 = 0;
pub const EXIT_REPAIRED: u8 = 1;
pub const EXIT_NOT_FINISHED: u8 = 4;
pub const EXIT_OPERATIONAL: u8 = 8;

/// What the flags ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    GapFill { pg: u32 },
    Replace { pg: u32, old: u64, new: u64 },
    Abort { pg: u32 },
    Node { old: u64, new: u64 },
}

/// Checks `action` against the cluster file: every node named must be in
/// it, every PG in the volume. The message says what to fix.
pub fn check(cluster: &Cluster, action: &Action) -> Result<(), String> {
    let pg_ok = |pg: u32| {
        if (pg as usize) < cluster.placement.len() {
            Ok(())
        } else {
            Err(format!(
                "--pg {pg}: the volume of the cluster file has PGs 0..{}",
                cluster.placement.len()
            ))
        }
    };
    let node_ok = |flag: &str, id: u64| {
        if cluster.node(id).is_some() {
            Ok(())
        } else {
            Err(format!(
                "{flag} {id}: node {id} is not in the cluster file; add node {id} to the cluster file \
                 (a [[nodes]] entry with its id, address and az) and run again"
            ))
        }
    };
    match *action {
        Action::GapFill { pg } | Action::Abort { pg } => pg_ok(pg),
        Action::Replace { pg, old, new } => {
            pg_ok(pg)?;
            node_ok("--replace", old)?;
            node_ok("--with", new)?;
            same(old, new)
        }
        Action::Node { old, new } => {
            node_ok("--node", old)?;
            node_ok("--with", new)?;
            same(old, new)
        }
    }
}

fn same(old: u64, new: u64) -> Result<(), String> {
    if old == new {
        Err(format!("--with {new}: a node cannot replace itself"))
    } else {
        Ok(())
    }
}

/// The report of one run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "nothing_needed", "repaired", "not_finished" or "error".
    pub status: &'static str,
    /// "gap_fill", "replace", "abort" or "node".
    pub action: &'static str,
    pub pgs: Vec<PgReport>,
    /// Why the run failed before any PG could be looked at.
    pub error: Option<String>,
}

/// Where one PG ended up.
#[derive(Debug, Serialize)]
pub struct PgReport {
    pub pg: u32,
    /// "nothing_needed", "repaired", "moved", "aborted", "not_finished" or "error".
    pub result: &'static str,
    pub exit: u8,
    /// What happened, or why not and what to run.
    pub message: String,
    /// The PG's membership as last seen (null when unknown).
    pub membership: Option<MembershipStatus>,
    pub pgcl: Option<u64>,
    /// Gap fill: the PGCL when the run started, which every up member had to reach.
    pub target: Option<u64>,
    /// Gap fill: segments still below the target; replace: the new member.
    pub behind: Vec<Behind>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Behind {
    pub node: u64,
    pub scl: Option<u64>,
    pub up: bool,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        if self.error.is_some() {
            return EXIT_OPERATIONAL;
        }
        let codes = self.pgs.iter().map(|p| p.exit);
        if codes.clone().any(|c| c == EXIT_OPERATIONAL) {
            EXIT_OPERATIONAL
        } else if codes.clone().any(|c| c == EXIT_NOT_FINISHED) {
            EXIT_NOT_FINISHED
        } else if codes.clone().any(|c| c == EXIT_REPAIRED) {
            EXIT_REPAIRED
        } else {
            EXIT_NOTHING_NEEDED
        }
    }
}

/// The human report: one paragraph a PG.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    if let Some(e) = &r.error {
        let _ = writeln!(out, "repair: {e}");
    }
    for p in &r.pgs {
        let _ = writeln!(out, "PG {}: {}", p.pg, p.message);
        if let Some(m) = &p.membership {
            let _ = writeln!(out, "  membership {}", m.line());
        }
        if let Some(pgcl) = p.pgcl {
            let _ = writeln!(out, "  PGCL {pgcl}");
        }
        for b in &p.behind {
            let scl = b.scl.map_or_else(|| "unknown".to_string(), |s| s.to_string());
            let _ = writeln!(out, "  node {}: SCL {scl}{}", b.node, if b.up { "" } else { " (down)" });
        }
    }
    if r.pgs.is_empty() && r.error.is_none() {
        let _ = writeln!(out, "no PG's membership has the node: nothing to move");
    }
    out
}

/// A progress bar on stderr, or a hidden one; `units` follow the counts.
fn bar(show: bool, what: &str, counts: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let template = format!("{what} [{{elapsed_precise}}] [{{wide_bar}}] {counts}, ETA {{eta}} {{msg}}");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// The bar of a gap fill: LSNs filled.
fn lsn_bar(show: bool) -> indicatif::ProgressBar {
    bar(show, "gap fill", "{pos}/{len} LSNs, {per_sec}")
}

/// The bar of a move: the bytes of the PGs' pages their new members'
/// hydrations went through, and the rate.
fn bytes_bar(show: bool) -> indicatif::ProgressBar {
    bar(
        show,
        "hydrate",
        "{binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}",
    )
}

/// Run `action` (checked by [`check`]) on `cluster`, waiting at most
/// `timeout`; `file` names the cluster file in the commands suggested.
pub fn run(cluster: &Cluster, file: &str, action: &Action, timeout: Duration, progress: bool) -> Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ctx = Ctx {
        cluster,
        file,
        deadline: Instant::now() + timeout,
        timeout,
    };
    Ok(rt.block_on(async {
        match *action {
            Action::GapFill { pg } => {
                let bar = lsn_bar(progress);
                let p = gap_fill(&ctx, pg, &bar).await;
                bar.finish_and_clear();
                report("gap_fill", vec![p], None)
            }
            Action::Replace { pg, old, new } => match ctx.computed().await {
                Err(e) => report("replace", Vec::new(), Some(e)),
                Ok(mut client) => {
                    let bar = MoveBar::new(bytes_bar(progress), cluster, 1);
                    let p = run_replace(&ctx, &mut client, pg, (old, new), false, &bar).await;
                    bar.bar.finish_and_clear();
                    report("replace", vec![p], None)
                }
            },
            Action::Abort { pg } => match ctx.computed().await {
                Err(e) => report("abort", Vec::new(), Some(e)),
                Ok(mut client) => report("abort", vec![abort(&ctx, &mut client, pg).await], None),
            },
            Action::Node { old, new } => match ctx.computed().await {
                Err(e) => report("node", Vec::new(), Some(e)),
                Ok(mut client) => {
                    let bar = bytes_bar(progress);
                    let pgs = move_node(&ctx, &mut client, old, new, &bar).await;
                    bar.finish_and_clear();
                    report("node", pgs, None)
                }
            },
        }
    }))
}

fn report(action: &'static str, pgs: Vec<PgReport>, error: Option<String>) -> Report {
    let mut r = Report {
        status: "",
        action,
        pgs,
        error,
    };
    r.status = match r.exit_code() {
        EXIT_NOTHING_NEEDED => "nothing_needed",
        EXIT_REPAIRED => "repaired",
        EXIT_NOT_FINISHED => "not_finished",
        _ => "error",
    };
    r
}

struct Ctx<'a> {
    cluster: &'a Cluster,
    file: &'a str,
    deadline: Instant,
    timeout: Duration,
}

impl Ctx<'_> {
    fn timed_out(&self) -> bool {
        Instant::now() >= self.deadline
    }

    async fn computed(&self) -> Result<Client, String> {
        let addr = self.cluster.computed_address;
        match tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(addr)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(computed_unreachable(addr, &e.to_string())),
            Err(_) => Err(computed_unreachable(
                addr,
                &format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            )),
        }
    }

    fn again(&self, pg: u32, change: &str) -> String {
        format!("storctl repair --cluster {} --pg {pg}{change}", self.file)
    }
}

fn computed_unreachable(addr: SocketAddr, why: &str) -> String {
    format!(
        "computed at {addr} is unreachable ({why}); moving a segment and aborting a move need the writer \
         (start it, then run this again; a gap fill, --pg N alone, needs only the storage nodes)"
    )
}

fn pg_report(pg: u32, result: &'static str, exit: u8, message: String) -> PgReport {
    PgReport {
        pg,
        result,
        exit,
        message,
        membership: None,
        pgcl: None,
        target: None,
        behind: Vec::new(),
    }
}

// ---- gap fill ----

/// Up members below `target`.
fn behind(p: &PgStatus, target: u64) -> Vec<Behind> {
    p.segments
        .iter()
        .filter(|g| g.up && g.scl.unwrap_or(0) < target)
        .map(|g| Behind {
            node: g.node,
            scl: g.scl,
            up: true,
        })
        .collect()
}

async fn gap_fill(ctx: &Ctx<'_>, pg: u32, bar: &indicatif::ProgressBar) -> PgReport {
    let first = status::pg_survey(ctx.cluster, pg).await;
    let down: Vec<u64> = first.segments.iter().filter(|g| !g.up).map(|g| g.node).collect();
    let finish = |mut r: PgReport, p: &PgStatus| {
        r.membership = p.membership.clone();
        r.pgcl = Some(p.pgcl);
        r.target = Some(first.pgcl);
        r
    };
    if first.segments_up == 0 {
        let r = pg_report(
            pg,
            "error",
            EXIT_OPERATIONAL,
            format!("no storage node of PG {pg} answers (nodes {}): start them", join(&down)),
        );
        return finish(r, &first);
    }
    if !first.write_quorum {
        let mut r = pg_report(
            pg,
            "not_finished",
            EXIT_NOT_FINISHED,
            format!(
                "fewer than {WRITE_QUORUM} segments of PG {pg} answer (down: nodes {}): its PGCL is not known; \
                 start them, or move their segments (`{}`), and run this again",
                join(&down),
                ctx.again(pg, " --replace ID --with ID")
            ),
        );
        r.behind = behind(&first, u64::MAX);
        return finish(r, &first);
    }
    let target = first.pgcl;
    let start = behind(&first, target);
    if start.is_empty() {
        let r = pg_report(
            pg,
            "nothing_needed",
            EXIT_NOTHING_NEEDED,
            format!(
                "every segment up is at the PGCL {target}{}",
                if down.is_empty() {
                    String::new()
                } else {
                    format!(" (down, not looked at: nodes {})", join(&down))
                }
            ),
        );
        return finish(r, &first);
    }
    // Progress: the LSNs the behind segments still lack, as they fill.
    let from: Vec<(u64, u64)> = start.iter().map(|b| (b.node, b.scl.unwrap_or(0))).collect();
    bar.set_length(from.iter().map(|&(_, s)| target - s).sum());
    ask_to_fill(ctx.cluster, pg, &start).await;
    let (mut moved_at, mut done_then) = (Instant::now(), 0);
    let mut last = first.clone();
    loop {
        let mut now_behind = behind(&last, target);
        // One that was behind and is down now has not been filled.
        for &(node, s0) in &from {
            if last.segments.iter().any(|g| g.node == node && !g.up) {
                now_behind.push(Behind {
                    node,
                    scl: Some(s0),
                    up: false,
                });
            }
        }
        let done: u64 = from
            .iter()
            .map(|&(node, s0)| {
                let scl = last
                    .segments
                    .iter()
                    .find(|g| g.node == node)
                    .and_then(|g| g.scl)
                    .unwrap_or(s0);
                scl.clamp(s0, target) - s0
            })
            .sum();
        bar.set_position(done);
        if done > done_then {
            (moved_at, done_then) = (Instant::now(), done);
        } else if moved_at.elapsed() >= FILL_ASK_AGAIN_AFTER {
            ask_to_fill(ctx.cluster, pg, &now_behind).await;
            moved_at = Instant::now();
        }
        if now_behind.is_empty() {
            let r = pg_report(
                pg,
                "repaired",
                EXIT_REPAIRED,
                format!(
                    "filled: nodes {} reached the PGCL {target} of the start",
                    join(&from.iter().map(|f| f.0).collect::<Vec<_>>())
                ),
            );
            return finish(r, &last);
        }
        if ctx.timed_out() {
            let names: Vec<String> = now_behind
                .iter()
                .map(|b| {
                    format!(
                        "node {} at SCL {}{}",
                        b.node,
                        b.scl.unwrap_or(0),
                        if b.up { "" } else { " (down now)" }
                    )
                })
                .collect();
            let mut r = pg_report(
                pg,
                "not_finished",
                EXIT_NOT_FINISHED,
                format!(
                    "after {} s, segments still below the PGCL {target}: {}; the nodes fill gaps from their \
                     peers by themselves (see their logs and `storctl status --cluster {}`): run this again \
                     (`{}`), or move a segment that stays behind (`{}`)",
                    ctx.timeout.as_secs(),
                    names.join(", "),
                    ctx.file,
                    ctx.again(pg, ""),
                    ctx.again(pg, &format!(" --replace {} --with ID", now_behind[0].node)),
                ),
            );
            r.behind = now_behind;
            return finish(r, &last);
        }
        tokio::time::sleep(POLL_EVERY).await;
        last = status::pg_survey(ctx.cluster, pg).await;
    }
}

/// Asks the node of each segment of `behind` that is up to fill its gaps
/// now. One that cannot be asked still fills them at its next gossip
/// round, so a failure is only logged.
async fn ask_to_fill(cluster: &Cluster, pg: u32, behind: &[Behind]) {
    let asks = behind
        .iter()
        .filter(|b| b.up)
        .filter_map(|b| cluster.node(b.node))
        .map(|n| async move {
            let id = SegmentId {
                volume: cluster.volume_id,
                pg,
            };
            let ask = async {
                let c = NodeClient::connect_to_node(n.address, Role::Operator, 0, n.id).await?;
                c.fill_gaps(id).await
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, ask).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(node = n.id, pg, error = %e, "could not ask the node to fill its gaps now")
                }
                Err(_) => tracing::warn!(node = n.id, pg, "no answer asking the node to fill its gaps now"),
            }
        });
    futures_util::future::join_all(asks).await;
}

mod moves;
use moves::{MoveBar, abort, move_node, run_replace};

fn join(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(nodes: usize) -> Cluster {
        let addrs: Vec<SocketAddr> = (1..=nodes as u16)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i)))
            .collect();
        let text = computed::cluster::local_cluster_toml(1, 1, 64, "127.0.0.1:7100".parse().unwrap(), &addrs);
        Cluster::parse(&text).unwrap()
    }

    #[test]
    fn nodes_and_pgs_the_cluster_file_lacks_are_named_with_what_to_do() {
        let c = cluster(8);
        let e = check(&c, &Action::Replace { pg: 0, old: 6, new: 9 }).unwrap_err();
        assert!(
            e.contains("--with 9") && e.contains("add node 9 to the cluster file"),
            "{e}"
        );
        let e = check(&c, &Action::Node { old: 12, new: 7 }).unwrap_err();
        assert!(e.contains("--node 12") && e.contains("add node 12"), "{e}");
        let e = check(&c, &Action::GapFill { pg: 1 }).unwrap_err();
        assert!(e.contains("--pg 1") && e.contains("PGs 0..1"), "{e}");
        let e = check(&c, &Action::Replace { pg: 0, old: 7, new: 7 }).unwrap_err();
        assert!(e.contains("cannot replace itself"), "{e}");
        assert!(check(&c, &Action::Replace { pg: 0, old: 6, new: 7 }).is_ok());
        assert!(check(&c, &Action::Abort { pg: 0 }).is_ok());
    }

    #[test]
    fn the_exit_status_is_the_worst_pgs() {
        let r = |exits: &[u8]| {
            report(
                "node",
                exits.iter().map(|&e| pg_report(0, "x", e, String::new())).collect(),
                None,
            )
        };
        assert_eq!(r(&[]).exit_code(), 0);
        assert_eq!(r(&[0, 1]).exit_code(), 1);
        assert_eq!(r(&[1, 4, 0]).exit_code(), 4);
        assert_eq!(r(&[4, 8, 1]).exit_code(), 8);
        assert_eq!(r(&[1]).status, "repaired");
        assert_eq!(report("replace", Vec::new(), Some("x".into())).exit_code(), 8);
    }
}
