//! `storctl status`: a live view of a cluster from its cluster file.
//!
//! Each storage node is asked `GetSegmentStatus` (epoch 0: an operator's
//! read, never refused for its epoch and adopting nothing) for every segment
//! the placement puts on it; a node that does not answer is down, and one
//! whose `HelloOk` names another node than the file puts at that address is
//! not asked anything (a problem: wrong identity; its segments count as
//! down, as computed counts them). From the
//! SCLs: each PG's PGCL (the 4th-highest of its 6 SCLs, a down segment
//! counting as 0) and each segment's lag behind it. computed is asked for the
//! VDL (`VolumeInfo`), and, when the cluster file names its metrics endpoint,
//! for the VCL (`computed_vcl`); otherwise the VCL is derived from storage
//! (see [`derive_vcl`]) and marked so. computed unreachable is a problem
//! too (and `storctl status` exits 8 for it).
//!
//! The VCL may stand far above the VDL after a recovery: the recovery
//! annulled the LSNs from VDL+1 up to a million above (no record there
//! will ever count), and the writer allocates above them, so every LSN
//! of the range is complete without a record. The report shows the
//! annulled ranges the segments hold and says so (see [`vcl_note`]).
//!
//! The SCLs are read one node at a time while commits may go on, so a
//! figure can be a few milliseconds older than the next.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use computed::client::Client;
use computed::cluster::{Cluster, SEGMENTS_PER_PG, WRITE_QUORUM};
use computed::membership::{self, Membership};
use storaged::client::{ClientError, NodeClient};
use storaged::proto::{Damage, ErrorCode, Message, Role};

use crate::scrub::ScrubSummary;

/// One node or computed answering, at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize)]
pub struct Status {
    pub volume: u64,
    /// "healthy" or "problems".
    pub status: &'static str,
    pub problems: Vec<String>,
    pub computed: ComputedStatus,
    /// Volume complete LSN; `None` when neither computed nor storage could say.
    pub vcl: Option<u64>,
    /// "computed" (its metrics endpoint) or "derived" (a lower bound from the segments' SCLs).
    pub vcl_source: &'static str,
    pub vdl: Option<u64>,
    /// The LSN ranges the last recovery annulled (as the segments at the
    /// newest installed epoch hold them): no record there counts.
    pub annulled: Vec<LsnRange>,
    pub nodes: Vec<NodeStatus>,
    pub pgs: Vec<PgStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LsnRange {
    pub first: u64,
    pub last: u64,
}

#[derive(Debug, Serialize)]
pub struct ComputedStatus {
    pub address: SocketAddr,
    pub up: bool,
    pub epoch: Option<u64>,
    pub vdl: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub address: SocketAddr,
    pub az: String,
    pub up: bool,
    /// Highest epoch among its segments (0 before any was written).
    pub epoch: Option<u64>,
    /// The node id the node at `address` gave, when it is not `id`: that
    /// node is refused (not asked, its segments count as down).
    pub wrong_identity: Option<u64>,
    pub error: Option<String>,
    /// Its scrubbing (`ScrubStatus`); null when unknown: the node is down,
    /// or did not answer it (`scrub_error` says why).
    pub scrub: Option<ScrubSummary>,
    pub scrub_error: Option<String>,
    /// Its device's room (`NodeStatus`); null when unknown (down, or a
    /// node that does not answer it).
    pub room: Option<Room>,
}

/// A node's device: its page store, where each segment takes an extent
/// for good (a new segment must fit in what is free), and its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Room {
    pub page_store_bytes: u64,
    pub page_store_free_bytes: u64,
    pub log_bytes: u64,
    pub log_free_bytes: u64,
}

impl Room {
    fn of(n: &storaged::proto::NodeStatus) -> Room {
        let bytes = |blocks: u64| blocks.saturating_mul(storaged::io::BLOCK_SIZE as u64);
        Room {
            page_store_bytes: bytes(n.page_store_blocks),
            page_store_free_bytes: bytes(n.page_store_free_blocks),
            log_bytes: bytes(n.log_blocks),
            log_free_bytes: bytes(n.log_free_blocks),
        }
    }

    fn line(&self) -> String {
        use crate::scrub::bytes_human as h;
        format!(
            "page store {} free of {}, log {} free of {}",
            h(self.page_store_free_bytes),
            h(self.page_store_bytes),
            h(self.log_free_bytes),
            h(self.log_bytes)
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PgStatus {
    pub pg: u32,
    /// By every set of the membership: the 4th-highest SCL of each set, the lowest of those.
    pub pgcl: u64,
    pub segments_up: usize,
    /// At least 4 segments of every set answer.
    pub write_quorum: bool,
    /// The newest membership the PG's segments hold; null when none holds
    /// one (the placement of the cluster file is then the members).
    pub membership: Option<MembershipStatus>,
    /// One per member (of either set while changing).
    pub segments: Vec<SegmentStatus>,
}

/// A PG's membership as its segments hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MembershipStatus {
    pub epoch: u64,
    /// A segment is being moved: writes count by both sets.
    pub changing: bool,
    /// The set in force before the change (the only one when not changing).
    pub old: Vec<u64>,
    /// The set being moved to (equal to `old` when not changing).
    pub new: Vec<u64>,
}

impl MembershipStatus {
    pub fn of(m: &Membership) -> MembershipStatus {
        let sets = membership::sets(m);
        let old = sets[0].clone();
        let new = sets.get(1).cloned().unwrap_or_else(|| old.clone());
        MembershipStatus {
            epoch: m.epoch,
            changing: m.is_changing(),
            old,
            new,
        }
    }

    /// `epoch 3: 1 2 3 4 5 7`, or `epoch 2, changing: 1 2 3 4 5 6 -> 1 2 3 4 5 7`.
    pub fn line(&self) -> String {
        if self.changing {
            format!(
                "epoch {}, changing: {} -> {}",
                self.epoch,
                join(&self.old),
                join(&self.new)
            )
        } else {
            format!("epoch {}: {}", self.epoch, join(&self.old))
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentStatus {
    pub node: u64,
    pub up: bool,
    pub scl: Option<u64>,
    /// PGCL − SCL (0 for a segment at or ahead of the PGCL).
    pub lag: Option<u64>,
    pub epoch: Option<u64>,
    pub highest_lsn: Option<u64>,
    /// LSN ranges in which the segment lacks records of its chain (at most
    /// 16, lowest first); `last` 18446744073709551615 (2^64 − 1) is the open
    /// hole a damaged log block leaves: the segment may lack acknowledged
    /// records above what it holds.
    pub holes: Option<Vec<LsnRange>>,
    /// Pages whose current version the node found damaged since it started
    /// (the lowest 16 at most; it does not serve them from this segment).
    pub damaged_pages: Option<Vec<u64>>,
    /// How many there are in all.
    pub damaged_pages_total: Option<u32>,
    /// A slot of the node's segment table was damaged when it last started
    /// (a fact about the node, shown with each of its segments).
    pub table_damaged: Option<bool>,
    /// The segment's hydration under way, or its last since its node
    /// started; None if it has not hydrated since (or is down).
    pub hydration: Option<HydrationStatus>,
}

/// How a segment's hydration from its peers stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HydrationStatus {
    pub under_way: bool,
    /// Bytes of page versions written.
    pub bytes: u64,
    /// Pages of the segment gone through, of `pg_pages`.
    pub pages: u64,
}

impl From<storaged::proto::Hydration> for HydrationStatus {
    fn from(h: storaged::proto::Hydration) -> Self {
        HydrationStatus {
            under_way: h.under_way,
            bytes: h.bytes,
            pages: h.pages,
        }
    }
}

impl Status {
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What one node said about one segment.
#[derive(Debug, Clone)]
struct Seg {
    scl: u64,
    epoch: u64,
    highest_lsn: u64,
    installed_epoch: u64,
    annulled: Vec<(u64, u64)>,
    holes: Vec<(u64, u64)>,
    damage: Damage,
    membership: Option<Membership>,
    hydration: Option<storaged::proto::Hydration>,
}

/// What a node answered: its segments, its scrubbing or why that is
/// unknown, and its device's room when asked.
type NodeAnswer = (Vec<(u32, Seg)>, Result<ScrubSummary, String>, Option<Room>);

/// Asks node `id` for its segments of `pgs`, and with `scrub` for its scrubbing.
async fn ask_node(cluster: &Cluster, id: u64, addr: SocketAddr, pgs: Vec<u32>, scrub: bool) -> Result<NodeAnswer> {
    let client = connect_operator(id, addr).await?;
    let mut out = Vec::new();
    for pg in pgs {
        out.push((pg, ask_segment(cluster, &client, addr, pg).await?));
    }
    if !scrub {
        return Ok((out, Err("not asked".into()), None));
    }
    // Last on the connection: a node that predates ScrubStatus answers it
    // as an unknown frame and closes the connection. Its scrubbing is then
    // unknown; the node is not down for it.
    let scrub = match tokio::time::timeout(REQUEST_TIMEOUT, client.scrub_status()).await {
        Ok(Ok(s)) => Ok(ScrubSummary::of(&s)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
    };
    // After the scrub status, for the same reason (a node that predates
    // one predates the other).
    let room = match tokio::time::timeout(REQUEST_TIMEOUT, client.node_status()).await {
        Ok(Ok(n)) => Some(Room::of(&n)),
        _ => None,
    };
    Ok((out, scrub, room))
}

/// An operator's connection to node `id` at `addr`.
async fn connect_operator(id: u64, addr: SocketAddr) -> Result<NodeClient> {
    let connect = NodeClient::connect_to_node(addr, Role::Operator, 0, id);
    Ok(tokio::time::timeout(REQUEST_TIMEOUT, connect)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {} s", REQUEST_TIMEOUT.as_secs()))??)
}

/// What the node on `client` says of its segment of PG `pg`.
async fn ask_segment(cluster: &Cluster, client: &NodeClient, addr: SocketAddr, pg: u32) -> Result<Seg> {
    let req = Message::GetSegmentStatus {
        volume: cluster.volume_id,
        epoch: 0,
        pg,
    };
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {} s", REQUEST_TIMEOUT.as_secs()))??;
    Ok(match reply {
        Message::SegmentStatus {
            scl,
            epoch,
            highest_lsn,
            installed_epoch,
            annulled,
            holes,
            damage,
            membership,
            hydration,
            ..
        } => Seg {
            scl,
            epoch,
            highest_lsn,
            installed_epoch,
            annulled,
            holes,
            damage,
            membership,
            hydration,
        },
        // Not written yet: the segment is created by its first Append.
        Message::Error {
            code: ErrorCode::UnknownSegment,
            ..
        } => Seg {
            scl: 0,
            epoch: 0,
            highest_lsn: 0,
            installed_epoch: 0,
            annulled: Vec::new(),
            holes: Vec::new(),
            damage: Damage::default(),
            membership: None,
            hydration: None,
        },
        other => anyhow::bail!("PG {pg}: unexpected answer {other:?}"),
    })
}

async fn ask_computed(addr: SocketAddr) -> Result<(u64, u64)> {
    let work = async {
        let client = Client::connect(addr).await?;
        let info = client.volume_info().await?;
        anyhow::Ok((info.epoch, info.vdl))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {} s", REQUEST_TIMEOUT.as_secs()))?
}

/// `computed_vcl` from computed's Prometheus text endpoint.
async fn ask_metrics_vcl(addr: SocketAddr) -> Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("computed_vcl ") {
                return Ok(v.trim().parse::<u64>()?);
            }
        }
        anyhow::bail!("no computed_vcl in the metrics of {addr}")
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {} s", REQUEST_TIMEOUT.as_secs()))?
}

/// The 4th-highest of the 6 SCLs (unknown ones count as 0).
fn pgcl(scls: &[Option<u64>]) -> u64 {
    let mut sorted: Vec<u64> = scls.iter().map(|s| s.unwrap_or(0)).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.get(WRITE_QUORUM - 1).copied().unwrap_or(0)
}

/// A lower bound of the VCL from storage alone: every record of PG `p` at or
/// below its PGCL is at quorum, so the first record not at quorum lies
/// above the PGCL of a PG some of whose segments hold more than its PGCL.
/// The VCL is at least the lowest such PGCL (at least the highest LSN seen
/// when no PG has records above its PGCL), and at least the VDL.
pub fn derive_vcl(pgs: &[(u64, u64)], vdl: Option<u64>) -> u64 {
    // (pgcl, highest LSN any segment of the PG holds)
    let lagging = pgs.iter().filter(|(p, h)| h > p).map(|(p, _)| *p).min();
    let bound = lagging.unwrap_or_else(|| pgs.iter().map(|(p, _)| *p).max().unwrap_or(0));
    bound.max(vdl.unwrap_or(0))
}

/// The ranges in force: those of the segments at the newest installed
/// epoch (a truncation replaces a segment's whole set, so older sets are
/// superseded), merged.
fn annulled_in_force<'a>(segs: impl IntoIterator<Item = &'a Seg>) -> Vec<LsnRange> {
    let segs: Vec<&Seg> = segs.into_iter().collect();
    let newest = segs.iter().map(|s| s.installed_epoch).max().unwrap_or(0);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for s in segs.iter().filter(|s| s.installed_epoch == newest) {
        for &r in &s.annulled {
            if !ranges.contains(&r) {
                ranges.push(r);
            }
        }
    }
    ranges.sort_unstable();
    ranges
        .into_iter()
        .map(|(first, last)| LsnRange { first, last })
        .collect()
}

/// Why the VCL is above the VDL, when it is: LSNs a recovery annulled
/// (complete without a record), or records at quorum whose transaction is
/// not complete yet.
pub fn vcl_note(s: &Status) -> Option<String> {
    let (vcl, vdl) = (s.vcl?, s.vdl.unwrap_or(0));
    if vcl <= vdl {
        return None;
    }
    let gap: Vec<String> = s
        .annulled
        .iter()
        .filter(|r| r.last > vdl && r.first <= vcl)
        .map(|r| format!("{}..={}", r.first, r.last))
        .collect();
    if gap.is_empty() {
        Some(format!(
            "the records in {}..={vcl} are at quorum, but not every record of their transactions yet",
            vdl + 1
        ))
    } else {
        Some(format!(
            "LSNs {} were annulled by a recovery: complete without a record, and the writer allocates above them",
            gap.join(", ")
        ))
    }
}

pub fn collect(cluster: &Cluster) -> Result<Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    Ok(rt.block_on(collect_async(cluster)))
}

/// The nodes PG `pg`'s newest membership names, as its segments hold it
/// (both sets while a change is under way); None when no segment of the PG
/// answered.
pub fn pg_members(cluster: &Cluster, pg: u32) -> Result<Option<Vec<u64>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let answers = rt.block_on(ask_nodes(cluster, Some(pg), false));
    Ok(newest_membership(&answers, pg).map(|m| m.members.iter().map(|x| x.id).collect()))
}

/// The newest membership the answers hold for PG `pg`.
fn newest_membership(answers: &[Result<NodeAnswer>], pg: u32) -> Option<Membership> {
    answers
        .iter()
        .flatten()
        .flat_map(|(segs, ..)| segs)
        .filter(|(p, _)| *p == pg)
        .filter_map(|(_, s)| s.membership.as_ref())
        .max_by_key(|m| m.epoch)
        .cloned()
}

/// Every node of the cluster file asked for its segments of the PGs the
/// placement puts on it (all, or only `only_pg`), and then for those of
/// the PGs whose membership (as the segments hold it) has moved onto it.
/// One answer per node of the file, in its order.
async fn ask_nodes(cluster: &Cluster, only_pg: Option<u32>, scrub: bool) -> Vec<Result<NodeAnswer>> {
    let chosen = |pg: u32| only_pg.is_none_or(|p| p == pg);
    let mut asks = Vec::new();
    for n in &cluster.nodes {
        let pgs = (0..cluster.placement.len() as u32)
            .filter(|&pg| chosen(pg) && cluster.placement[pg as usize].contains(&n.id))
            .collect();
        asks.push(ask_node(cluster, n.id, n.address, pgs, scrub));
    }
    let mut answers = futures_util::future::join_all(asks).await;
    // A membership change moves segments onto nodes the file's placement
    // does not name: ask the members not asked yet.
    let mut more: Vec<(usize, Vec<u32>)> = Vec::new();
    for pg in (0..cluster.placement.len() as u32).filter(|&pg| chosen(pg)) {
        let Some(m) = newest_membership(&answers, pg) else {
            continue;
        };
        for member in &m.members {
            let Some(i) = cluster.nodes.iter().position(|n| n.id == member.id) else {
                continue;
            };
            let Ok((segs, ..)) = &answers[i] else {
                continue;
            };
            if segs.iter().any(|(p, _)| *p == pg) {
                continue;
            }
            match more.iter_mut().find(|(j, _)| *j == i) {
                Some((_, pgs)) => pgs.push(pg),
                None => more.push((i, vec![pg])),
            }
        }
    }
    let asks = more.iter().map(|(i, pgs)| {
        let n = &cluster.nodes[*i];
        ask_node(cluster, n.id, n.address, pgs.clone(), false)
    });
    let extra = futures_util::future::join_all(asks).await;
    for ((i, _), e) in more.iter().zip(extra) {
        match (&mut answers[*i], e) {
            (Ok((segs, ..)), Ok((found, ..))) => segs.extend(found),
            (slot, Err(e)) => *slot = Err(e),
            _ => {}
        }
    }
    answers
}

/// PG `pg` as its segments answered (no computed asked), for `storctl repair`.
/// Asks a node how its segments' hydrations stand, on one connection kept
/// from ask to ask (a move's progress bar asks every 200 ms), opened again
/// after one fails.
#[derive(Default)]
pub struct HydrationWatch {
    client: Option<NodeClient>,
}

impl HydrationWatch {
    /// How the hydration of node `node`'s segment of PG `pg` stands; None if
    /// the node does not answer or the segment has not hydrated since its
    /// node started.
    pub async fn ask(&mut self, cluster: &Cluster, node: u64, pg: u32) -> Option<HydrationStatus> {
        let addr = cluster.node(node)?.address;
        if self.client.is_none() {
            self.client = connect_operator(node, addr).await.ok();
        }
        match ask_segment(cluster, self.client.as_ref()?, addr, pg).await {
            Ok(seg) => seg.hydration.map(HydrationStatus::from),
            Err(_) => {
                self.client = None;
                None
            }
        }
    }
}

pub async fn pg_survey(cluster: &Cluster, pg: u32) -> PgStatus {
    let answers = ask_nodes(cluster, Some(pg), false).await;
    pg_status(cluster, &answers, pg, &mut Vec::new(), &mut Vec::new()).0
}

/// Where PG `pg` stands by `answers`, and its problems. Returns the PG and
/// (its PGCL, the highest LSN any of its segments holds).
fn pg_status(
    cluster: &Cluster,
    answers: &[Result<NodeAnswer>],
    pg: u32,
    table_damaged: &mut Vec<u64>,
    problems: &mut Vec<String>,
) -> (PgStatus, (u64, u64)) {
    let seg_of = |node: u64, pg: u32| -> Option<Seg> {
        let i = cluster.nodes.iter().position(|n| n.id == node)?;
        let (segs, ..) = answers[i].as_ref().ok()?;
        segs.iter().find(|(p, _)| *p == pg).map(|(_, s)| s.clone())
    };
    let m = newest_membership(answers, pg);
    let slots: Vec<u64> = match &m {
        Some(m) => m.members.iter().map(|x| x.id).collect(),
        None => cluster.placement[pg as usize].to_vec(),
    };
    let segs: Vec<Option<Seg>> = slots.iter().map(|&id| seg_of(id, pg)).collect();
    let scls: Vec<Option<u64>> = segs.iter().map(|s| s.as_ref().map(|s| s.scl)).collect();
    let up = |id: u64| slots.iter().zip(&segs).any(|(&n, s)| n == id && s.is_some());
    let (pgcl, write_quorum) = match &m {
        Some(m) => {
            let scl_of = |id: u64| {
                slots
                    .iter()
                    .zip(&scls)
                    .find(|(n, _)| **n == id)
                    .and_then(|(_, s)| *s)
                    .unwrap_or(0)
            };
            (membership::pgcl([m], scl_of), membership::on_write_quorum(m, up))
        }
        None => (pgcl(&scls), segs.iter().flatten().count() >= WRITE_QUORUM),
    };
    let highest = segs.iter().flatten().map(|s| s.highest_lsn).max().unwrap_or(0);
    let segments_up = segs.iter().flatten().count();
    for (&node, s) in slots.iter().zip(&segs) {
        // Holes come and go as batches arrive; the open one stays until
        // the segment is given what a damaged log block took.
        if s.as_ref().is_some_and(|s| s.holes.iter().any(|h| h.1 == u64::MAX)) {
            problems.push(format!(
                "PG {pg} on node {node}: a damaged log block took records; the segment may lack \
                 acknowledged records (its holes say which LSNs)"
            ));
        }
        if let Some(s) = s {
            damage_problems(pg, node, &s.damage, table_damaged, problems);
        }
    }
    if !write_quorum {
        problems.push(match &m {
            Some(m) if m.is_changing() => format!(
                "PG {pg} has fewer than {WRITE_QUORUM} of {SEGMENTS_PER_PG} segments up in a set of its \
                 membership (epoch {}): below its write quorum",
                m.epoch
            ),
            _ => format!(
                "PG {pg} has {segments_up} of {SEGMENTS_PER_PG} segments up: below its write quorum of {WRITE_QUORUM}"
            ),
        });
    }
    let status = PgStatus {
        pg,
        pgcl,
        segments_up,
        write_quorum,
        membership: m.as_ref().map(MembershipStatus::of),
        segments: slots
            .iter()
            .zip(&segs)
            .map(|(&node, s)| SegmentStatus {
                node,
                up: s.is_some(),
                scl: s.as_ref().map(|s| s.scl),
                lag: s.as_ref().map(|s| pgcl.saturating_sub(s.scl)),
                epoch: s.as_ref().map(|s| s.epoch),
                highest_lsn: s.as_ref().map(|s| s.highest_lsn),
                holes: s
                    .as_ref()
                    .map(|s| s.holes.iter().map(|&(first, last)| LsnRange { first, last }).collect()),
                damaged_pages: s.as_ref().map(|s| s.damage.pages.clone()),
                damaged_pages_total: s.as_ref().map(|s| s.damage.pages_total),
                table_damaged: s.as_ref().map(|s| s.damage.table_slot),
                hydration: s.as_ref().and_then(|s| s.hydration).map(HydrationStatus::from),
            })
            .collect(),
    };
    (status, (pgcl, highest))
}

async fn collect_async(cluster: &Cluster) -> Status {
    let answers = ask_nodes(cluster, None, true).await;
    let computed = ask_computed(cluster.computed_address).await;
    let metrics_vcl = match cluster.metrics_address {
        Some(m) => ask_metrics_vcl(m).await.ok(),
        None => None,
    };

    let mut problems = Vec::new();
    let mut nodes = Vec::new();
    for (n, answer) in cluster.nodes.iter().zip(&answers) {
        let (up, epoch, error) = match answer {
            Ok((segs, ..)) => (true, Some(segs.iter().map(|(_, s)| s.epoch).max().unwrap_or(0)), None),
            Err(e) => (false, None, Some(e.to_string())),
        };
        let (scrub, scrub_error) = match answer {
            Ok((_, Ok(s), _)) => (Some(s.clone()), None),
            Ok((_, Err(e), _)) => (None, Some(e.clone())),
            Err(_) => (None, None),
        };
        if let Some(s) = &scrub
            && s.left_now > 0
        {
            problems.push(format!(
                "node {}: scrubbing left {} damaged block(s) or page version(s) unrepaired \
                 (`storctl scrub --cluster FILE --node {}` scrubs it again and lists where)",
                n.id, s.left_now, n.id
            ));
        }
        let wrong_identity = match answer.as_ref().err().and_then(|e| e.downcast_ref::<ClientError>()) {
            Some(ClientError::WrongNode { found, .. }) => Some(*found),
            _ => None,
        };
        match (wrong_identity, &error) {
            (Some(found), _) => problems.push(format!(
                "node {} ({}) has the wrong identity: the node at that address is node {found}; \
                 its segments are counted down (are two address lines of the cluster file swapped?)",
                n.id, n.address
            )),
            (None, Some(e)) => problems.push(format!("node {} ({}) is down: {e}", n.id, n.address)),
            (None, None) => {}
        }
        nodes.push(NodeStatus {
            id: n.id,
            address: n.address,
            az: n.az.clone(),
            up,
            epoch,
            wrong_identity,
            error,
            scrub,
            scrub_error,
            room: answer.as_ref().ok().and_then(|(_, _, room)| *room),
        });
    }
    let mut pgs = Vec::new();
    let mut pg_marks = Vec::new();
    // The table is the node's: its damage is listed once per node.
    let mut table_damaged: Vec<u64> = Vec::new();
    for pg in 0..cluster.placement.len() as u32 {
        let (p, marks) = pg_status(cluster, &answers, pg, &mut table_damaged, &mut problems);
        pgs.push(p);
        pg_marks.push(marks);
    }
    let computed = match computed {
        Ok((epoch, vdl)) => ComputedStatus {
            address: cluster.computed_address,
            up: true,
            epoch: Some(epoch),
            vdl: Some(vdl),
            error: None,
        },
        Err(e) => {
            problems.insert(
                0,
                format!("computed at {} is unreachable: {e:#}", cluster.computed_address),
            );
            ComputedStatus {
                address: cluster.computed_address,
                up: false,
                epoch: None,
                vdl: None,
                error: Some(format!("{e:#}")),
            }
        }
    };
    let vdl = computed.vdl;
    let (vcl, vcl_source) = match metrics_vcl {
        // The metrics are computed's figures as of its last tick, the VDL
        // is asked first but live: never show a VCL below the VDL (the
        // VCL is at least the VDL at every moment).
        Some(v) => (Some(v.max(vdl.unwrap_or(0))), "computed"),
        None => (Some(derive_vcl(&pg_marks, vdl)), "derived"),
    };
    let annulled = annulled_in_force(answers.iter().flatten().flat_map(|(segs, ..)| segs).map(|(_, s)| s));
    Status {
        volume: cluster.volume_id,
        status: if problems.is_empty() { "healthy" } else { "problems" },
        problems,
        computed,
        vcl,
        vcl_source,
        vdl,
        annulled,
        nodes,
        pgs,
    }
}

/// What a segment's damage report makes a problem: damaged pages (the
/// segment serves fewer pages than its peers), and a damaged table slot
/// (once per node: the table is the node's).
fn damage_problems(pg: u32, node: u64, d: &Damage, table_listed: &mut Vec<u64>, problems: &mut Vec<String>) {
    if d.pages_total > 0 {
        problems.push(format!(
            "PG {pg} on node {node}: {} damaged page version(s) (pages {}{}); the segment does not \
             serve them or coalesce past their records",
            d.pages_total,
            join(&d.pages),
            if d.pages.len() < d.pages_total as usize {
                " ..."
            } else {
                ""
            }
        ));
    }
    if d.table_slot && !table_listed.contains(&node) {
        table_listed.push(node);
        problems.push(format!(
            "node {node}: a slot of its segment table was damaged when it started \
             (it kept the other and wrote both again)"
        ));
    }
}

fn join(pages: &[u64]) -> String {
    pages.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The human report: nodes, then PGs with one column per segment.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "volume {}: {}", s.volume, s.status);
    let c = &s.computed;
    let _ = writeln!(
        out,
        "computed {}  {}  epoch {}",
        c.address,
        if c.up { "up" } else { "DOWN" },
        opt(c.epoch)
    );
    let _ = writeln!(
        out,
        "VDL {:<12} commits at or below it are durable (on their PGs' write quorums) and acknowledged{}",
        opt(s.vdl),
        if c.up { "" } else { " (unknown: computed is down)" }
    );
    let _ = writeln!(
        out,
        "VCL {:<12} every LSN at or below it is at its PG's write quorum or annulled ({})",
        opt(s.vcl),
        if s.vcl_source == "derived" {
            "derived from the SCLs: a lower bound"
        } else {
            "computed's"
        }
    );
    if let Some(note) = vcl_note(s) {
        let _ = writeln!(out, "    VCL > VDL: {note}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>5}  {:<21}  {:<5}  {:<8}  {:>6}",
        "node", "address", "az", "up", "epoch"
    );
    for n in &s.nodes {
        let up = match (n.up, n.wrong_identity) {
            (true, _) => "up".to_string(),
            (false, Some(_)) => "WRONG ID".to_string(),
            (false, None) => "DOWN".to_string(),
        };
        let _ = writeln!(
            out,
            "{:>5}  {:<21}  {:<5}  {:<8}  {:>6}",
            n.id,
            n.address.to_string(),
            n.az,
            up,
            opt(n.epoch)
        );
        let scrub = match (&n.scrub, &n.scrub_error) {
            (Some(s), _) => s.line(),
            (None, Some(e)) => format!("unknown ({e})"),
            (None, None) => "unknown (the node is not up)".to_string(),
        };
        let _ = writeln!(out, "{:>5}  scrub: {scrub}", "");
        if let Some(room) = &n.room {
            let _ = writeln!(out, "{:>5}  room: {}", "", room.line());
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>3}  {:>10}  {:>5}  {:>5}  {:<5}  {:<4}  {:>10}  {:>8}",
        "pg", "PGCL", "up", "node", "az", "seg", "SCL", "lag"
    );
    for p in &s.pgs {
        for (i, g) in p.segments.iter().enumerate() {
            let (pg, pgcl, up) = if i == 0 {
                (p.pg.to_string(), p.pgcl.to_string(), format!("{}/6", p.segments_up))
            } else {
                (String::new(), String::new(), String::new())
            };
            let az = s.nodes.iter().find(|n| n.id == g.node).map_or("", |n| n.az.as_str());
            let holes = match g.holes.as_deref() {
                Some([]) | None => String::new(),
                Some(hs) => {
                    let shown: Vec<String> = hs
                        .iter()
                        .map(|h| match h.last {
                            u64::MAX => format!("{}..", h.first),
                            last => format!("{}..={last}", h.first),
                        })
                        .collect();
                    format!("  holes {}", shown.join(" "))
                }
            };
            let damaged = match (g.damaged_pages.as_deref(), g.damaged_pages_total) {
                (Some(pages), Some(total)) if total > 0 => {
                    let more = if pages.len() < total as usize {
                        format!(" (+{} more)", total as usize - pages.len())
                    } else {
                        String::new()
                    };
                    format!("  damaged pages {}{more}", join(pages))
                }
                _ => String::new(),
            };
            let table = if g.table_damaged == Some(true) {
                "  table slot damaged"
            } else {
                ""
            };
            let hydrating = match g.hydration {
                Some(h) if h.under_way => format!(
                    "  hydrating: {:.1} MiB written, {} pages gone through",
                    h.bytes as f64 / f64::from(1 << 20),
                    h.pages
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{pg:>3}  {pgcl:>10}  {up:>5}  {:>5}  {az:<5}  {:<4}  {:>10}  {:>8}{holes}{damaged}{table}{hydrating}",
                g.node,
                if g.up { "up" } else { "DOWN" },
                opt(g.scl),
                opt(g.lag)
            );
        }
        if let Some(m) = &p.membership {
            let _ = writeln!(out, "{:>3}  membership {}", "", m.line());
        }
    }
    if !s.problems.is_empty() {
        let _ = writeln!(out);
        for p in &s.problems {
            let _ = writeln!(out, "problem: {p}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgcl_counts_down_segments_as_zero() {
        assert_eq!(pgcl(&[Some(9), Some(8), Some(7), Some(6), Some(5), Some(4)]), 6);
        assert_eq!(pgcl(&[Some(9), Some(9), Some(9), None, None, None]), 0);
        assert_eq!(pgcl(&[Some(9), Some(9), Some(9), Some(9), None, None]), 9);
    }

    fn status(vdl: Option<u64>, vcl: u64, annulled: &[(u64, u64)]) -> Status {
        Status {
            volume: 1,
            status: "healthy",
            problems: Vec::new(),
            computed: ComputedStatus {
                address: "127.0.0.1:1".parse().unwrap(),
                up: vdl.is_some(),
                epoch: vdl.map(|_| 2),
                vdl,
                error: None,
            },
            vcl: Some(vcl),
            vcl_source: "computed",
            vdl,
            annulled: annulled.iter().map(|&(first, last)| LsnRange { first, last }).collect(),
            nodes: Vec::new(),
            pgs: Vec::new(),
        }
    }

    #[test]
    fn a_vcl_above_the_vdl_is_explained() {
        // After a recovery: the range above the VDL was annulled.
        let s = status(Some(1), 1_000_001, &[(2, 1_000_001)]);
        let note = vcl_note(&s).expect("a note");
        assert!(
            note.contains("2..=1000001") && note.contains("annulled by a recovery"),
            "{note}"
        );
        let text = render(&s);
        assert!(
            text.contains("VCL 1000001 ") && text.contains("VCL > VDL: LSNs 2..=1000001"),
            "{text}"
        );
        // Records at quorum whose transaction is not complete.
        let note = vcl_note(&status(Some(1_000_010), 1_000_012, &[(2, 1_000_001)])).unwrap();
        assert!(
            note.contains("1000011..=1000012") && note.contains("not every record"),
            "{note}"
        );
        // Equal: nothing to explain.
        assert_eq!(vcl_note(&status(Some(7), 7, &[(2, 1_000_001)])), None);
    }

    #[test]
    fn a_segments_holes_are_shown_and_the_open_one_reads_as_unbounded() {
        let mut s = status(Some(7), 7, &[]);
        s.pgs.push(PgStatus {
            pg: 0,
            pgcl: 9,
            segments_up: 1,
            write_quorum: false,
            membership: None,
            segments: vec![SegmentStatus {
                node: 1,
                up: true,
                scl: Some(4),
                lag: Some(5),
                epoch: Some(1),
                highest_lsn: Some(300),
                holes: Some(vec![
                    LsnRange { first: 5, last: 9 },
                    LsnRange {
                        first: 301,
                        last: u64::MAX,
                    },
                ]),
                damaged_pages: Some(Vec::new()),
                damaged_pages_total: Some(0),
                table_damaged: Some(false),
                hydration: None,
            }],
        });
        let text = render(&s);
        assert!(text.contains("holes 5..=9 301.."), "{text}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""holes":[{"first":5,"last":9}"#), "{json}");
    }

    #[test]
    fn a_segments_damage_is_shown_after_its_row() {
        let mut s = status(Some(7), 7, &[]);
        s.pgs.push(PgStatus {
            pg: 0,
            pgcl: 9,
            segments_up: 1,
            write_quorum: false,
            membership: None,
            segments: vec![SegmentStatus {
                node: 1,
                up: true,
                scl: Some(9),
                lag: Some(0),
                epoch: Some(1),
                highest_lsn: Some(9),
                holes: Some(Vec::new()),
                damaged_pages: Some(vec![70, 75]),
                damaged_pages_total: Some(3),
                table_damaged: Some(true),
                hydration: Some(HydrationStatus {
                    under_way: true,
                    bytes: 3 << 20,
                    pages: 384,
                }),
            }],
        });
        let text = render(&s);
        assert!(
            text.contains(
                "damaged pages 70 75 (+1 more)  table slot damaged  hydrating: 3.0 MiB written, 384 pages gone through"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        let seg = &json["pgs"][0]["segments"][0];
        let (mut listed, mut problems) = (Vec::new(), Vec::new());
        let d = Damage {
            pages_total: 3,
            pages: vec![70, 75],
            table_slot: true,
        };
        damage_problems(0, 1, &d, &mut listed, &mut problems);
        damage_problems(
            1,
            1,
            &Damage {
                table_slot: true,
                ..Damage::default()
            },
            &mut listed,
            &mut problems,
        );
        damage_problems(2, 2, &Damage::default(), &mut listed, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("PG 0 on node 1: 3 damaged") && problems[0].contains("pages 70 75 ..."));
        assert!(problems[1].starts_with("node 1: a slot of its segment table was damaged"));
        assert_eq!(seg["damaged_pages"], serde_json::json!([70, 75]));
        assert_eq!(seg["damaged_pages_total"], 3);
        assert_eq!(seg["table_damaged"], true);
    }

    #[test]
    fn each_nodes_scrubbing_is_shown_and_unknown_when_it_does_not_answer() {
        use crate::scrub::{LastPass, RunningPass};
        let mut s = status(Some(7), 7, &[]);
        let node = |id: u64, up: bool, scrub: Option<ScrubSummary>, scrub_error: Option<&str>| NodeStatus {
            id,
            address: "127.0.0.1:7001".parse().unwrap(),
            az: "az1".into(),
            up,
            epoch: up.then_some(1),
            wrong_identity: None,
            error: (!up).then(|| "refused".to_string()),
            scrub,
            scrub_error: scrub_error.map(str::to_string),
            room: None,
        };
        let summary = ScrubSummary {
            last_pass: Some(LastPass {
                pass: 12,
                priority: true,
                started_unix_secs: 1_796_544_000,
                ended_unix_secs: 1_796_544_062,
                bytes_read: 32 << 20,
                found: 3,
                repaired: 2,
                left: 1,
            }),
            running: Some(RunningPass {
                pass: 13,
                priority: false,
                bytes_done: 1 << 20,
                bytes_total: 4 << 20,
            }),
            found_total: 3,
            repaired_total: 2,
            left_now: 1,
        };
        s.nodes = vec![
            node(1, true, Some(summary), None),
            node(2, true, None, Some("the connection is closed")),
            node(3, false, None, None),
        ];
        s.nodes[0].room = Some(Room {
            page_store_bytes: 2 << 30,
            page_store_free_bytes: 3 << 29,
            log_bytes: 64 << 20,
            log_free_bytes: 60 << 20,
        });
        let text = render(&s);
        assert!(
            text.contains("room: page store 1.5 GiB free of 2.0 GiB, log 60.0 MiB free of 64.0 MiB"),
            "{text}"
        );
        assert_eq!(
            text.matches("room:").count(),
            1,
            "none for a node that did not say: {text}"
        );
        assert!(
            text.contains(
                "scrub: last pass 12 (priority) ended 2026-12-06 08:01:02 UTC, 32.0 MiB read: found 3, repaired 2, \
                 left 1; since start found 3, repaired 2, left now 1; pass 13 running, 25% of 4.0 MiB"
            ),
            "{text}"
        );
        assert!(text.contains("scrub: unknown (the connection is closed)"), "{text}");
        assert!(text.contains("scrub: unknown (the node is not up)"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["nodes"][0]["scrub"]["last_pass"]["pass"], 12);
        assert_eq!(json["nodes"][0]["scrub"]["left_now"], 1);
        assert_eq!(json["nodes"][0]["scrub"]["running"]["bytes_total"], 4 << 20);
        assert_eq!(json["nodes"][1]["scrub"], serde_json::Value::Null);
        assert_eq!(json["nodes"][1]["scrub_error"], "the connection is closed");
        // The fields that were there keep their names.
        assert_eq!(json["nodes"][0]["up"], true);
        assert_eq!(json["nodes"][2]["error"], "refused");
    }

    #[test]
    fn the_ranges_in_force_are_the_newest_installed_epochs() {
        let seg = |installed_epoch, annulled: &[(u64, u64)]| Seg {
            scl: 0,
            epoch: installed_epoch,
            highest_lsn: 0,
            installed_epoch,
            annulled: annulled.to_vec(),
            holes: Vec::new(),
            damage: Damage::default(),
            membership: None,
            hydration: None,
        };
        let segs = [
            seg(2, &[(5, 100)]),
            seg(3, &[(5, 100), (120, 200)]),
            seg(3, &[(120, 200), (5, 100)]),
        ];
        assert_eq!(
            annulled_in_force(&segs),
            vec![LsnRange { first: 5, last: 100 }, LsnRange { first: 120, last: 200 }]
        );
        assert!(annulled_in_force(&[]).is_empty());
    }

    /// Six nodes holding no segment yet: one whose scrubbing left damage
    /// (a problem), one that answers ScrubStatus as a node that predates it
    /// does (unknown, the node still up), four with nothing found.
    #[tokio::test]
    async fn scrub_damage_left_is_a_problem_and_an_old_node_is_up_with_scrub_unknown() {
        use storaged::scrub;
        let mut addrs = Vec::new();
        for id in 1..=6u64 {
            let addr = crate::scrub::fake::node(id, move |m| match m {
                Message::GetSegmentStatus { volume, pg, .. } => Some(Message::error(
                    ErrorCode::UnknownSegment,
                    0,
                    format!("unknown segment (volume {volume}, pg {pg})"),
                )),
                Message::ScrubStatus if id == 2 => {
                    Some(Message::error(ErrorCode::BadFrame, 0, "unknown message type 27"))
                }
                Message::ScrubStatus => Some(Message::ScrubStatusOk {
                    status: scrub::Status {
                        found_total: if id == 1 { 3 } else { 0 },
                        repaired_total: if id == 1 { 1 } else { 0 },
                        left_now: if id == 1 { 2 } else { 0 },
                        ..scrub::Status::default()
                    },
                }),
                // A node older than NodeStatus: its room is unknown.
                Message::NodeStatus => Some(Message::error(ErrorCode::BadFrame, 0, "unknown message type 33")),
                other => panic!("unexpected {other:?}"),
            })
            .await;
            addrs.push(addr);
        }
        let s = collect_with_computed_down(2, addrs).await;
        assert!(s.nodes.iter().all(|n| n.up), "{:?}", s.nodes);
        let left: Vec<&String> = s.problems.iter().filter(|p| p.contains("scrubbing left")).collect();
        assert_eq!(left.len(), 1, "{:?}", s.problems);
        assert!(left[0].starts_with("node 1: scrubbing left 2 damaged"), "{}", left[0]);
        assert_eq!(s.nodes[0].scrub.as_ref().map(|x| x.left_now), Some(2));
        assert_eq!(s.nodes[1].scrub, None);
        assert!(
            s.nodes[1]
                .scrub_error
                .as_deref()
                .unwrap()
                .contains("unknown message type 27")
        );
        assert!(
            s.nodes[2..]
                .iter()
                .all(|n| n.scrub.as_ref().is_some_and(|x| x.left_now == 0))
        );
        let text = render(&s);
        assert!(
            text.contains("scrub: unknown (unknown message type 27 (BadFrame))"),
            "{text}"
        );
    }

    /// `collect` over a cluster of `pgs` PGs on the nodes at `addrs`, with
    /// computed's address one nothing listens on (off the runtime thread,
    /// which serves the fake nodes).
    async fn collect_with_computed_down(pgs: u32, addrs: Vec<SocketAddr>) -> Status {
        tokio::task::spawn_blocking(move || {
            let closed = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let text = computed::cluster::local_cluster_toml(1, pgs, 64, closed, &addrs);
            collect(&Cluster::parse(&text).unwrap()).unwrap()
        })
        .await
        .unwrap()
    }

    /// A segment status as a node holding PG 0 at `scl` answers it.
    fn seg_status(scl: u64, membership: Option<Membership>) -> Message {
        Message::SegmentStatus {
            volume: 1,
            pg: 0,
            epoch: 1,
            scl,
            highest_lsn: scl,
            lowest_lsn: 0,
            pgmrpl: 0,
            records: 0,
            log_bytes: 0,
            page_store_bytes: 0,
            installed_epoch: 1,
            incarnation: 1,
            annulled: Vec::new(),
            holes: Vec::new(),
            damage: Damage::default(),
            membership,
            hydration: None,
        }
    }

    /// Eight nodes, PG 0 placed on 1..6 and being moved from 6 to 7: the
    /// PG's rows are its members by the membership the segments hold (7
    /// included, asked although the placement does not put it there), and
    /// the change is shown with both sets.
    #[tokio::test]
    async fn a_pg_being_moved_shows_both_sets_and_the_new_member() {
        use computed::membership::{Change, Member, plan};
        let mut addrs = Vec::new();
        let member = |id: u64| Member {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        };
        let placed = Membership::single(1, (1..=6).map(member).collect());
        let dual = plan(0, &placed, &Change::Replace { old: 6, new: member(7) }).unwrap();
        for id in 1..=8u64 {
            let (placed, dual) = (placed.clone(), dual.clone());
            let addr = crate::scrub::fake::node(id, move |m| match m {
                Message::GetSegmentStatus { .. } if id == 8 => {
                    Some(Message::error(ErrorCode::UnknownSegment, 0, "unknown segment"))
                }
                // One segment has not been told of the change yet.
                Message::GetSegmentStatus { .. } if id == 1 => Some(seg_status(40, Some(placed.clone()))),
                Message::GetSegmentStatus { .. } => Some(seg_status(if id == 7 { 25 } else { 40 }, Some(dual.clone()))),
                Message::ScrubStatus => Some(Message::ScrubStatusOk {
                    status: storaged::scrub::Status::default(),
                }),
                // A node older than NodeStatus: its room is unknown.
                Message::NodeStatus => Some(Message::error(ErrorCode::BadFrame, 0, "unknown message type 33")),
                other => panic!("unexpected {other:?}"),
            })
            .await;
            addrs.push(addr);
        }
        let s = collect_with_computed_down(1, addrs).await;
        let pg = &s.pgs[0];
        let m = pg.membership.as_ref().expect("a membership");
        assert_eq!(
            (m.epoch, m.changing, m.old.clone(), m.new.clone()),
            (2, true, vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 4, 5, 7])
        );
        let nodes: Vec<u64> = pg.segments.iter().map(|g| g.node).collect();
        assert_eq!(nodes, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(pg.segments[6].scl, Some(25));
        assert_eq!(pg.segments[6].lag, Some(15));
        assert_eq!(pg.pgcl, 40);
        assert!(pg.write_quorum);
        let text = render(&s);
        assert!(
            text.contains("membership epoch 2, changing: 1 2 3 4 5 6 -> 1 2 3 4 5 7"),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["pgs"][0]["membership"]["new"],
            serde_json::json!([1, 2, 3, 4, 5, 7])
        );
        assert_eq!(json["pgs"][0]["membership"]["changing"], true);
    }

    /// Nothing listening anywhere: computed unreachable is reported as a
    /// problem (not "healthy"), as is every node.
    #[test]
    fn computed_unreachable_is_a_problem() {
        let mut addrs = crate::closed_ports(7);
        let computed = addrs.pop().unwrap();
        let text = computed::cluster::local_cluster_toml(1, 2, 64, computed, &addrs);
        let cluster = Cluster::parse(&text).unwrap();
        let s = collect(&cluster).unwrap();
        assert_eq!(s.status, "problems");
        assert!(!s.healthy());
        assert!(
            s.problems[0].contains("computed at") && s.problems[0].contains("unreachable"),
            "{:?}",
            s.problems
        );
        // The cause once, not repeated by the error chain.
        assert_eq!(
            s.problems[0].matches("Connection refused").count(),
            1,
            "{}",
            s.problems[0]
        );
        let text = render(&s);
        assert!(text.starts_with("volume 1: problems"), "{text}");
        assert!(text.contains("problem: computed at"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["status"], "problems");
        assert_eq!(json["vcl"], serde_json::json!(s.vcl));
    }

    #[test]
    fn derived_vcl_is_a_lower_bound() {
        // PG 0 fully at quorum through 10; PG 1 has records above its PGCL 7.
        assert_eq!(derive_vcl(&[(10, 10), (7, 12)], None), 7);
        // Nothing outstanding: the highest PGCL.
        assert_eq!(derive_vcl(&[(10, 10), (7, 7)], None), 10);
        // Never below what computed says is durable.
        assert_eq!(derive_vcl(&[(10, 10), (7, 12)], Some(9)), 9);
    }
}
