//! Moving a PG's segment through computed: replace, abort, and every
//! segment of a node (see the parent module's header).

use computed::api::ClientErrorCode;
use computed::client::{Client, ClientError};
use computed::membership::{Change, Member, PgView};

use storaged::proto::Message;

use crate::status::HydrationStatus;

use super::*;

/// Where a replace of `old` by `new` stands in `v`.
#[derive(Debug, PartialEq, Eq)]
enum Moving {
    /// Not changing, `new` a member and `old` not.
    Done,
    /// A change whose new set has `new` and not `old`, or a step towards one.
    UnderWay,
    /// Nothing of this move yet.
    NotStarted,
}

fn moving(v: &PgView, old: u64, new: u64) -> Moving {
    let heads_to = |m: &computed::membership::Membership| {
        let sets = computed::membership::sets(m);
        let target = sets.last().expect("a membership has a set");
        target.contains(&new) && !target.contains(&old)
    };
    if !v.changing() && heads_to(&v.membership) {
        return Moving::Done;
    }
    // A step proposed says where the PG goes next (a roll-back proposed
    // from a dual membership heading to `new` is no longer this move).
    let next = v.proposed.as_ref().unwrap_or(&v.membership);
    if heads_to(next) {
        return Moving::UnderWay;
    }
    Moving::NotStarted
}

fn view_report(mut r: PgReport, v: &PgView, new: Option<u64>) -> PgReport {
    r.membership = Some(MembershipStatus::of(v.proposed.as_ref().unwrap_or(&v.membership)));
    r.pgcl = Some(v.pgcl);
    if let Some(new) = new {
        r.behind = v
            .members
            .iter()
            .filter(|m| m.id == new)
            .map(|m| Behind {
                node: m.id,
                scl: Some(m.scl),
                up: m.up,
            })
            .collect();
    }
    r
}

/// Where the PG stands, in words: the membership and any step proposed.
fn standing(v: &PgView) -> String {
    let mut s = format!("membership {}", MembershipStatus::of(&v.membership).line());
    if let Some(p) = &v.proposed {
        let _ = write!(s, ", step proposed: {}", MembershipStatus::of(p).line());
    }
    s
}

/// Asks computed where PG `pg` stands, retrying on a lost connection until
/// the deadline (computed restarting); the error text names computed.
async fn pg_state(ctx: &Ctx<'_>, client: &mut Client, pg: u32) -> Result<PgView, (u8, String)> {
    loop {
        match tokio::time::timeout(REQUEST_TIMEOUT, client.pg_state(pg)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(ClientError::Refused { code, message })) if code != ClientErrorCode::ShuttingDown => {
                return Err((EXIT_OPERATIONAL, format!("computed refused PgState: {message}")));
            }
            Ok(Err(e)) if ctx.timed_out() => {
                return Err((
                    EXIT_OPERATIONAL,
                    format!("computed at {}: {e}", ctx.cluster.computed_address),
                ));
            }
            Err(_) if ctx.timed_out() => {
                return Err((
                    EXIT_OPERATIONAL,
                    format!(
                        "computed at {} did not answer within {} s",
                        ctx.cluster.computed_address,
                        REQUEST_TIMEOUT.as_secs()
                    ),
                ));
            }
            _ => {
                // computed went away (restarting): connect again.
                tokio::time::sleep(POLL_EVERY).await;
                if let Ok(c) = ctx.computed().await {
                    *client = c;
                }
            }
        }
    }
}

/// A move's progress: for each PG moved, the bytes of its pages the new
/// member's hydration went through (all of them once it ended), summed on
/// one bar; the message names the PGs whose new member is below the PGCL.
pub(super) struct MoveBar {
    pub(super) bar: indicatif::ProgressBar,
    pg_bytes: u64,
    page_bytes: u64,
    /// Per PG: (bytes gone through, the new member's SCL, the PGCL).
    pgs: std::cell::RefCell<std::collections::BTreeMap<u32, (u64, u64, u64)>>,
}

impl MoveBar {
    pub(super) fn new(bar: indicatif::ProgressBar, cluster: &computed::cluster::Cluster, pgs: usize) -> MoveBar {
        let page_bytes = u64::from(cluster.page_bytes);
        let pg_bytes = cluster.pg_pages * page_bytes;
        bar.set_length(pg_bytes * pgs as u64);
        MoveBar {
            bar,
            pg_bytes,
            page_bytes,
            pgs: Default::default(),
        }
    }

    /// PG `pg` stands so: its new member's hydration `h` (None: none seen
    /// yet), its SCL `scl`, the PGCL; `done` once the move finished.
    fn show(&self, pg: u32, h: Option<HydrationStatus>, scl: u64, pgcl: u64, done: bool) {
        let mut pgs = self.pgs.borrow_mut();
        let had = pgs.get(&pg).map_or(0, |p| p.0);
        let through = match h {
            _ if done => self.pg_bytes,
            Some(h) if !h.under_way => self.pg_bytes,
            Some(h) => (h.pages * self.page_bytes).min(self.pg_bytes),
            None => had,
        };
        pgs.insert(pg, (through, scl, pgcl));
        self.bar.set_position(pgs.values().map(|p| p.0).sum());
        // Short: the bar shrinks to leave room for it.
        let behind: Vec<(&u32, &(u64, u64, u64))> = pgs.iter().filter(|(_, p)| p.1 < p.2).collect();
        self.bar.set_message(match behind[..] {
            [] => String::new(),
            [(pg, p)] => format!("PG {pg}: SCL {} of PGCL {}", p.1, p.2),
            _ => format!(
                "PGs below the PGCL: {}",
                behind
                    .iter()
                    .map(|(pg, _)| pg.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        });
    }
}

/// How long the new member's node may refuse the PG's segment before a
/// move stops waiting for it.
const REFUSED_GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// Move PG `pg`'s segment from node `old` to node `new`, or finish or
/// report the move under way. `room_checked`: the caller has already
/// asked `new` for room for this PG (`--node` asks once for all).
pub(super) async fn run_replace(
    ctx: &Ctx<'_>,
    client: &mut Client,
    pg: u32,
    (old, new): (u64, u64),
    room_checked: bool,
    bar: &MoveBar,
) -> PgReport {
    let fail = |(exit, message): (u8, String)| {
        pg_report(
            pg,
            if exit == EXIT_OPERATIONAL {
                "error"
            } else {
                "not_finished"
            },
            exit,
            message,
        )
    };
    let v = match pg_state(ctx, client, pg).await {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    match moving(&v, old, new) {
        Moving::Done => {
            let r = pg_report(
                pg,
                "nothing_needed",
                EXIT_NOTHING_NEEDED,
                format!("node {new} already holds PG {pg}'s segment in place of node {old}"),
            );
            return view_report(r, &v, Some(new));
        }
        Moving::UnderWay => {}
        Moving::NotStarted => {
            let in_target = |id: u64| {
                let m = v.proposed.as_ref().unwrap_or(&v.membership);
                computed::membership::sets(m).last().is_some_and(|s| s.contains(&id))
            };
            if !in_target(old) {
                let r = pg_report(
                    pg,
                    "error",
                    EXIT_OPERATIONAL,
                    format!(
                        "node {old} is not a member of PG {pg} ({}): nothing of it to move",
                        standing(&v)
                    ),
                );
                return view_report(r, &v, None);
            }
            if v.membership.is_member(new) || v.proposed.as_ref().is_some_and(|p| p.is_member(new)) {
                let r = pg_report(
                    pg,
                    "error",
                    EXIT_OPERATIONAL,
                    format!(
                        "node {new} already holds a segment of PG {pg} ({}): choose another node",
                        standing(&v)
                    ),
                );
                return view_report(r, &v, None);
            }
            let page_bytes = client.info.page_bytes;
            if !room_checked && let Err(e) = check_room(ctx, page_bytes, new, &[pg]).await {
                let again = ctx.again(pg, &format!(" --replace {old} --with ID"));
                return view_report(fail((EXIT_NOT_FINISHED, room_refusal(e, &again))), &v, None);
            }
            let change = Change::Replace {
                old,
                new: Member {
                    id: new,
                    addr: ctx.cluster.node(new).map(|n| n.address).expect("checked"),
                },
            };
            if let Err(r) = send(ctx, client, pg, change, &format!(" --replace {old} --with {new}")).await {
                return r;
            }
        }
    }
    // Wait for the new member to catch up and the writer to switch.
    let mut refused_since: Option<Instant> = None;
    let mut watch = status::HydrationWatch::default();
    loop {
        let v = match pg_state(ctx, client, pg).await {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        let member = v.members.iter().find(|m| m.id == new);
        let scl = member.map_or(0, |m| m.scl);
        let refused = member.and_then(|m| m.refused.clone());
        let state = moving(&v, old, new);
        let hydration = if bar.bar.is_hidden() {
            None
        } else {
            watch.ask(ctx.cluster, new, pg).await
        };
        bar.show(pg, hydration, scl, v.pgcl, state == Moving::Done);
        match state {
            Moving::Done => {
                let r = pg_report(
                    pg,
                    "moved",
                    EXIT_REPAIRED,
                    format!("moved: node {new} holds PG {pg}'s segment in place of node {old}"),
                );
                return view_report(r, &v, Some(new));
            }
            Moving::NotStarted => {
                let r = pg_report(
                    pg,
                    "not_finished",
                    EXIT_NOT_FINISHED,
                    format!(
                        "the move of node {old} to node {new} is no longer under way ({}; aborted, or \
                         another change?): run `{}` to start it again",
                        standing(&v),
                        ctx.again(pg, &format!(" --replace {old} --with {new}"))
                    ),
                );
                return view_report(r, &v, Some(new));
            }
            Moving::UnderWay => {}
        }
        // A refusal that lasts is not a node busy for a moment: a full page
        // store stays full until an operator makes room.
        refused_since = refused.as_ref().map(|_| refused_since.unwrap_or_else(Instant::now));
        if let Some(why) = refused
            .as_ref()
            .filter(|_| refused_since.is_some_and(|t| t.elapsed() >= REFUSED_GIVE_UP_AFTER))
        {
            let r = pg_report(
                pg,
                "not_finished",
                EXIT_NOT_FINISHED,
                format!(
                    "node {new} refuses PG {pg}'s segment ({why}) for {} s now; the move stays under way \
                     ({}): make room on node {new} and run `{}` again, or roll the move back (`{}`) and \
                     move the segment to another node",
                    REFUSED_GIVE_UP_AFTER.as_secs(),
                    standing(&v),
                    ctx.again(pg, &format!(" --replace {old} --with {new}")),
                    ctx.again(pg, " --abort")
                ),
            );
            return view_report(r, &v, Some(new));
        }
        if ctx.timed_out() {
            let scl = member.map_or_else(|| "unknown".to_string(), |m| m.scl.to_string());
            let r = pg_report(
                pg,
                "not_finished",
                EXIT_NOT_FINISHED,
                format!(
                    "after {} s the move of node {old} to node {new} is still under way ({}; node {new} at \
                     SCL {scl}, PGCL {}{}): run `{}` to wait for it again, or `{}` to roll it back",
                    ctx.timeout.as_secs(),
                    standing(&v),
                    v.pgcl,
                    match &refused {
                        Some(why) => format!("; node {new} refuses the segment: {why}"),
                        None => String::new(),
                    },
                    ctx.again(pg, &format!(" --replace {old} --with {new}")),
                    ctx.again(pg, " --abort")
                ),
            );
            return view_report(r, &v, Some(new));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Sends `change`, again while computed answers Busy (a step still being
/// installed), until the deadline.
async fn send(ctx: &Ctx<'_>, client: &mut Client, pg: u32, change: Change, flags: &str) -> Result<PgView, PgReport> {
    loop {
        let sent = tokio::time::timeout(REQUEST_TIMEOUT, client.change_membership(pg, change.clone())).await;
        let why = match sent {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(ClientError::Refused {
                code: ClientErrorCode::Busy,
                message,
            })) => message,
            Ok(Err(ClientError::Refused { message, .. })) => {
                return Err(pg_report(
                    pg,
                    "not_finished",
                    EXIT_NOT_FINISHED,
                    format!(
                        "computed refused the change: {message}; `storctl status --cluster {}` shows where \
                         PG {pg} stands (a change under way can be rolled back: `{}`)",
                        ctx.file,
                        ctx.again(pg, " --abort")
                    ),
                ));
            }
            Ok(Err(e)) => {
                let e = e.to_string();
                if let Ok(c) = ctx.computed().await {
                    *client = c;
                }
                e
            }
            Err(_) => format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
        };
        if ctx.timed_out() {
            return Err(pg_report(
                pg,
                "not_finished",
                EXIT_NOT_FINISHED,
                format!(
                    "after {} s computed has not taken the change ({why}): run `{}` again",
                    ctx.timeout.as_secs(),
                    ctx.again(pg, flags)
                ),
            ));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

pub(super) async fn abort(ctx: &Ctx<'_>, client: &mut Client, pg: u32) -> PgReport {
    let fail = |(exit, message): (u8, String)| pg_report(pg, "error", exit, message);
    let v = match pg_state(ctx, client, pg).await {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if !v.changing() {
        let r = pg_report(
            pg,
            "nothing_needed",
            EXIT_NOTHING_NEEDED,
            format!("no change of PG {pg}'s membership is under way"),
        );
        return view_report(r, &v, None);
    }
    let back_to = computed::membership::sets(&v.membership)[0].clone();
    match send(ctx, client, pg, Change::Abort, " --abort").await {
        Ok(_) => {}
        // The change finished (or was rolled back) meanwhile: say how it stands.
        Err(r) if r.exit == EXIT_NOT_FINISHED && r.message.contains("no membership change under way") => {}
        Err(r) => return r,
    }
    loop {
        let v = match pg_state(ctx, client, pg).await {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        if !v.changing() {
            let mut now = computed::membership::sets(&v.membership)[0].clone();
            now.sort_unstable();
            let mut was = back_to.clone();
            was.sort_unstable();
            let (result, message) = if now == was {
                ("aborted", format!("rolled back to the old set {}", join(&back_to)))
            } else {
                (
                    "moved",
                    format!(
                        "the change finished before the abort took: the membership is {}",
                        join(&now)
                    ),
                )
            };
            return view_report(pg_report(pg, result, EXIT_REPAIRED, message), &v, None);
        }
        if ctx.timed_out() {
            let r = pg_report(
                pg,
                "not_finished",
                EXIT_NOT_FINISHED,
                format!(
                    "after {} s the roll-back is still under way ({}): run `{}` again",
                    ctx.timeout.as_secs(),
                    standing(&v),
                    ctx.again(pg, " --abort")
                ),
            );
            return view_report(r, &v, None);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// ---- a whole node ----

/// Every PG whose membership has `old`, or that is being moved from `old`
/// to `new`, moved to `new` at once.
pub(super) async fn move_node(
    ctx: &Ctx<'_>,
    client: &mut Client,
    old: u64,
    new: u64,
    bar: &indicatif::ProgressBar,
) -> Vec<PgReport> {
    let pgs = client.info.pgs;
    let mut chosen = Vec::new();
    let mut not_started = Vec::new();
    for pg in 0..pgs {
        let v = match pg_state(ctx, client, pg).await {
            Ok(v) => v,
            Err((exit, message)) => return vec![pg_report(pg, "error", exit, message)],
        };
        let has_old = v.membership.is_member(old) || v.proposed.as_ref().is_some_and(|p| p.is_member(old));
        let state = moving(&v, old, new);
        if has_old || state == Moving::UnderWay {
            chosen.push(pg);
            if state == Moving::NotStarted {
                not_started.push(pg);
            }
        }
    }
    if chosen.is_empty() {
        return Vec::new();
    }
    // Room for every segment still to move, before any of them starts: a
    // node with room for some would leave the rest half-way. Moves under
    // way go on either way.
    let mut refused = Vec::new();
    if let Err(e) = check_room(ctx, client.info.page_bytes, new, &not_started).await {
        let again = format!("storctl repair --cluster {} --node {old} --with ID", ctx.file);
        let message = room_refusal(e, &again);
        refused = not_started
            .iter()
            .map(|&pg| pg_report(pg, "not_finished", EXIT_NOT_FINISHED, message.clone()))
            .collect();
        chosen.retain(|pg| !not_started.contains(pg));
    }
    // One connection a PG: each waits on its own.
    let bar = MoveBar::new(bar.clone(), ctx.cluster, chosen.len());
    let mut runs = Vec::new();
    for &pg in &chosen {
        let bar = &bar;
        runs.push(async move {
            match ctx.computed().await {
                Ok(mut c) => run_replace(ctx, &mut c, pg, (old, new), true, bar).await,
                Err(e) => pg_report(pg, "error", EXIT_OPERATIONAL, e),
            }
        });
    }
    let mut reports = futures_util::future::join_all(runs).await;
    reports.extend(refused);
    reports.sort_by_key(|r| r.pg);
    reports
}

/// Why node `new` cannot take the segments of `pgs`, if it cannot: its
/// page store's free room (`NodeStatus`) against what the segments it does
/// not hold yet take (one left by a move rolled back keeps its extent).
/// Asked before a move makes any membership dual, so a node without room
/// is named at once, with nothing to roll back. A node that cannot be
/// asked (down: it may be on its way; or older, not knowing the request)
/// is let through: the move waits for it as before, and the node refuses
/// the segment itself if it has no room.
async fn check_room(ctx: &Ctx<'_>, page_bytes: u32, new: u64, pgs: &[u32]) -> Result<(), String> {
    if pgs.is_empty() {
        return Ok(());
    }
    let Some(node) = ctx.cluster.node(new) else {
        return Err(format!("node {new} is not in {}", ctx.file));
    };
    let volume = ctx.cluster.volume_id;
    let ask = async {
        let c = NodeClient::connect_to_node(node.address, Role::Operator, 0, new).await?;
        let mut segments = 0u64;
        for &pg in pgs {
            let held = c.request(Message::GetSegmentStatus { volume, epoch: 0, pg }).await?;
            segments += u64::from(!matches!(held, Message::SegmentStatus { .. }));
        }
        Ok::<_, storaged::client::ClientError>((segments, c.node_status().await?))
    };
    let (segments, status) = match tokio::time::timeout(REQUEST_TIMEOUT, ask).await {
        Ok(Ok((0, _))) => return Ok(()),
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(node = new, error = %e, "could not ask the node how much room it has; the move goes on");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(
                node = new,
                "no answer asking the node how much room it has; the move goes on"
            );
            return Ok(());
        }
    };
    let per_segment = storaged::pagestore::Extent::blocks_for(page_bytes, ctx.cluster.pg_pages).unwrap_or(u64::MAX);
    let needed = per_segment.saturating_mul(segments);
    if needed <= status.page_store_free_blocks {
        return Ok(());
    }
    let size = |blocks: u64| crate::scrub::bytes_human(blocks.saturating_mul(storaged::io::BLOCK_SIZE as u64));
    Err(format!(
        "node {new} has no room for {segments} more segment{s}: its page store has {} free of {}, \
         and a segment of {} pages of {page_bytes} bytes takes {}",
        size(status.page_store_free_blocks),
        size(status.page_store_blocks),
        ctx.cluster.pg_pages,
        size(per_segment),
        s = if segments == 1 { "" } else { "s" },
    ))
}

/// The report of a move refused before it started: why, that nothing was
/// changed, and what to run instead.
fn room_refusal(why: String, again: &str) -> String {
    format!("{why}; nothing was changed. Give the move a node with room, then run: {again}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use computed::membership::{MemberView, Membership, plan};
    use std::net::SocketAddr;

    fn member(id: u64) -> Member {
        Member {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        }
    }

    fn view(membership: Membership, proposed: Option<Membership>) -> PgView {
        PgView {
            pg: 0,
            members: membership
                .members
                .iter()
                .map(|m| MemberView {
                    id: m.id,
                    addr: m.addr,
                    up: true,
                    scl: 10,
                    told_epoch: membership.epoch,
                    refused: None,
                })
                .collect(),
            membership,
            proposed,
            pgcl: 10,
        }
    }

    #[test]
    fn a_move_is_told_done_under_way_or_not_started_from_the_writers_view() {
        let placed = Membership::single(1, (1..=6).map(member).collect());
        let replace = |old, new| Change::Replace { old, new: member(new) };
        let dual = plan(0, &placed, &replace(6, 7)).unwrap();
        let done = computed::membership::finish(&dual);
        assert_eq!(moving(&view(placed.clone(), None), 6, 7), Moving::NotStarted);
        assert_eq!(
            moving(&view(placed.clone(), Some(dual.clone())), 6, 7),
            Moving::UnderWay
        );
        assert_eq!(moving(&view(dual.clone(), None), 6, 7), Moving::UnderWay);
        assert_eq!(moving(&view(dual.clone(), Some(done.clone())), 6, 7), Moving::UnderWay);
        assert_eq!(moving(&view(done.clone(), None), 6, 7), Moving::Done);
        // Another move, or this one rolled back: not this one.
        assert_eq!(moving(&view(dual.clone(), None), 6, 8), Moving::NotStarted);
        let back = plan(0, &dual, &Change::Abort).unwrap();
        assert_eq!(moving(&view(dual, Some(back.clone())), 6, 7), Moving::NotStarted);
        assert_eq!(moving(&view(back, None), 6, 7), Moving::NotStarted);
    }

    /// A move's bar counts the pages the new members' hydrations went
    /// through, in bytes, over every PG moved: a PG whose hydration ended
    /// or whose move finished counts whole, one not heard from keeps what
    /// it had, and the message names the PGs whose new member is behind.
    #[test]
    fn a_moves_bar_counts_the_pages_hydrated_over_every_pg() {
        let text = computed::cluster::local_cluster_toml(
            2,
            1,
            64,
            "127.0.0.1:7100".parse().unwrap(),
            &(1..=7u16)
                .map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i)))
                .collect::<Vec<_>>(),
        );
        let cluster = computed::cluster::Cluster::parse(&text).unwrap();
        let page = u64::from(cluster.page_bytes);
        let pg_bytes = cluster.pg_pages * page;
        let bar = MoveBar::new(indicatif::ProgressBar::hidden(), &cluster, 2);
        assert_eq!(bar.bar.length(), Some(2 * pg_bytes));
        let h = |under_way, pages| {
            Some(HydrationStatus {
                under_way,
                bytes: pages * page,
                pages,
            })
        };
        bar.show(0, h(true, 10), 0, 50, false);
        bar.show(1, h(true, 4), 0, 60, false);
        assert_eq!(bar.bar.position(), 14 * page);
        assert_eq!(bar.bar.message(), "PGs below the PGCL: 0 1");
        bar.show(1, None, 0, 60, false);
        assert_eq!(bar.bar.position(), 14 * page, "not heard from: as it was");
        bar.show(0, h(false, 30), 40, 50, false);
        assert_eq!(bar.bar.position(), pg_bytes + 4 * page, "ended: the whole PG");
        bar.show(1, None, 60, 60, true);
        assert_eq!(bar.bar.position(), 2 * pg_bytes);
        assert_eq!(bar.bar.message(), "PG 0: SCL 40 of PGCL 50");
    }
}
