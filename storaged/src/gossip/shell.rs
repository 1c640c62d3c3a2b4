//! The gossip shell: runs a [`GossipCore`] per volume over the node's
//! segments and carries out what it asks over the network.
//!
//! Each tick it reads every segment's state from the node ([`Store`]),
//! feeds it to the core, and turns the core's actions into requests to the
//! peers named by the segment's membership: `Digest` (the reply is the
//! peer's digest), `PullRecords` (what comes back is admitted by the node
//! through its append path, and only then reported done), and hydration
//! (`GetPageVersions` batches written as the segment's base, then the
//! chain above pulled like any gap). Every request runs in a task of its
//! own whose outcome comes back on a bounded channel; the core bounds how
//! many there are, and a request the core gives up on (`Abandon`) is
//! aborted. One connection per peer, opened when first needed, checked to
//! be the node the membership names, and dropped on any error.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use super::{Action, Digest, GossipConfig, GossipCore, Local, Millis, NodeId, Pg};
use crate::client::{ClientError, NodeClient};
use crate::membership::Membership;
use crate::proto::{Message, Role, WirePageVersion};
use crate::record::{RedoRecord, SegmentId};

/// What the shell needs of the node; [`crate::node::Node`] is one.
pub trait Store: Send + Sync + 'static {
    /// Every segment with a membership: its id, its state as the core
    /// sees it, and the membership.
    fn gossip_locals(&self) -> Vec<(SegmentId, Local, Membership)>;
    /// Segments an operator asked to fill their gaps now, since the last call.
    fn take_fill_requests(&self) -> Vec<SegmentId>;
    /// The segment's pages: its first, the one after its last, their size.
    fn page_range(&self, id: SegmentId) -> Option<SegmentPages>;
    fn admit_pulled(
        &self,
        id: SegmentId,
        installed_epoch: u64,
        membership_epoch: u64,
        records: Vec<RedoRecord>,
    ) -> impl Future<Output = Result<u64, String>> + Send;
    fn hydrate_begin(&self, id: SegmentId) -> impl Future<Output = Result<(), String>> + Send;
    /// Takes a batch of `versions`, which went through `pages` pages of
    /// the segment (those with no version need nothing).
    fn hydrate_pages(
        &self,
        id: SegmentId,
        versions: Vec<WirePageVersion>,
        pages: u64,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn hydrate_end(&self, id: SegmentId, floor: u64) -> impl Future<Output = Result<u64, String>> + Send;
    fn hydrate_abort(&self, id: SegmentId);
    /// The segment holds everything its peers hold, up to `scl`: what log
    /// damage may have taken from it is known to be back.
    fn caught_up(&self, id: SegmentId, scl: u64);
    /// Mean latency of the foreground's appends since the last call, in
    /// microseconds; None if there were none.
    fn foreground_latency_us(&self) -> Option<f64>;
}

/// How often the foreground's latency is sampled for the cores.
const FOREGROUND_SAMPLE: Duration = Duration::from_millis(200);

/// How often the shell looks at the node and polls the core.
const TICK: Duration = Duration::from_millis(20);
/// Outcomes waiting to be taken; request tasks wait beyond.
const OUTCOMES_MAX: usize = 256;
/// Any request to a peer given up after this long (the core may have
/// abandoned it sooner; see [`spawn`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection attempt or a digest exchange given up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

enum Outcome {
    Digest {
        volume: u64,
        pg: Pg,
        from: NodeId,
        digest: Digest,
    },
    Done {
        volume: u64,
        id: u64,
        bytes: u64,
    },
    Progress {
        volume: u64,
        id: u64,
        bytes: u64,
    },
    Failed {
        volume: u64,
        id: u64,
    },
}

/// One connection per peer, shared by the requests to it.
#[derive(Default)]
struct Peers {
    clients: Mutex<Connections<Arc<NodeClient>>>,
}

/// The open connections, each with the address it was opened to: a
/// membership that moves a node to another address makes the connection to
/// the old one useless (or, worse, to whatever listens there now), so it is
/// dropped when the node is next asked for at its new address.
struct Connections<C> {
    open: HashMap<NodeId, (SocketAddr, C)>,
}

impl<C> Default for Connections<C> {
    fn default() -> Self {
        Connections { open: HashMap::new() }
    }
}

impl<C: Clone> Connections<C> {
    /// The connection to `peer` at `addr`; one to another address is dropped.
    fn get(&mut self, peer: NodeId, addr: SocketAddr) -> Option<C> {
        match self.open.get(&peer) {
            Some((at, c)) if *at == addr => Some(c.clone()),
            Some(_) => {
                self.open.remove(&peer);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, peer: NodeId, addr: SocketAddr, c: C) {
        self.open.insert(peer, (addr, c));
    }

    /// Forget the connection to `peer` at `addr` (one opened since to
    /// another address stays).
    fn remove(&mut self, peer: NodeId, addr: SocketAddr) {
        if self.open.get(&peer).is_some_and(|(at, _)| *at == addr) {
            self.open.remove(&peer);
        }
    }
}

impl Peers {
    fn connections(&self) -> std::sync::MutexGuard<'_, Connections<Arc<NodeClient>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn client(&self, me: NodeId, peer: NodeId, addr: SocketAddr) -> Result<Arc<NodeClient>, ClientError> {
        if let Some(c) = self.connections().get(peer, addr) {
            return Ok(c);
        }
        let connect = NodeClient::connect_to_node(addr, Role::StorageNode, me, peer);
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(c) => Arc::new(c?),
            Err(_) => return Err(ClientError::Closed),
        };
        self.connections().insert(peer, addr, client.clone());
        Ok(client)
    }

    fn drop_client(&self, peer: NodeId, addr: SocketAddr) {
        self.connections().remove(peer, addr);
    }

    /// Send `msg` to `peer`; a lost connection is forgotten so the next
    /// request opens a new one.
    async fn request(&self, me: NodeId, peer: NodeId, addr: SocketAddr, msg: Message) -> Result<Message, String> {
        let client = self.client(me, peer, addr).await.map_err(|e| e.to_string())?;
        let reply = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(msg)).await {
            Ok(reply) => reply,
            Err(_) => {
                self.drop_client(peer, addr);
                return Err(format!("node {peer} did not answer within {REQUEST_TIMEOUT:?}"));
            }
        };
        match reply {
            Ok(Message::Error { code, message, .. }) => Err(format!("{code:?}: {message}")),
            Ok(reply) => Ok(reply),
            Err(e) => {
                self.drop_client(peer, addr);
                Err(e.to_string())
            }
        }
    }
}

/// A segment's pages, as a hydration checks a donor's replies against them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentPages {
    pub first: u64,
    /// The page after the segment's last.
    pub end: u64,
    pub page_bytes: u32,
}

/// What a request task needs to know of its segment.
#[derive(Clone, Copy)]
struct SegmentView {
    id: SegmentId,
    digest: Digest,
}

/// Run until `shutdown` turns true.
pub async fn run<S: Store>(store: Arc<S>, me: NodeId, config: GossipConfig, mut shutdown: watch::Receiver<bool>) {
    let start = Instant::now();
    let now = || start.elapsed().as_millis() as Millis;
    let mut cores: HashMap<u64, GossipCore> = HashMap::new();
    let mut tasks: HashMap<(u64, u64), AbortHandle> = HashMap::new();
    // Per volume: whether its hydrations under way may fetch their next
    // batch (the core's byte budget is not spent).
    let mut paces: HashMap<u64, watch::Sender<bool>> = HashMap::new();
    let peers = Arc::new(Peers::default());
    let (tx, mut rx) = mpsc::channel::<Outcome>(OUTCOMES_MAX);
    let mut sampled_at = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
            Some(o) = rx.recv() => {
                take(&mut cores, &mut tasks, now(), o);
                while let Ok(o) = rx.try_recv() {
                    take(&mut cores, &mut tasks, now(), o);
                }
            }
        }
        if *shutdown.borrow() {
            break;
        }
        // The node's segments as they are now.
        let mut views: HashMap<(u64, Pg), (SegmentView, Membership)> = HashMap::new();
        for (id, local, membership) in store.gossip_locals() {
            let core = cores
                .entry(id.volume)
                .or_insert_with(|| GossipCore::new(me, config.clone(), me ^ id.volume.rotate_left(17) ^ 0x9e37));
            views.insert(
                (id.volume, id.pg),
                (
                    SegmentView {
                        id,
                        digest: local.digest,
                    },
                    membership,
                ),
            );
            // After log damage the segment may lack records it acknowledged
            // (an open hole, up to u64::MAX), until it holds what its peers hold.
            let open_hole = local.missing.last().is_some_and(|&(_, upto)| upto == u64::MAX);
            core.set_local(id.pg, local);
            if open_hole && let Some(scl) = core.caught_up(now(), id.pg) {
                store.caught_up(id, scl);
            }
        }
        for id in store.take_fill_requests() {
            let known = cores.get_mut(&id.volume).is_some_and(|core| core.fill_now(id.pg));
            tracing::info!(
                volume = id.volume,
                pg = id.pg,
                known,
                "asked to fill the segment's gaps now"
            );
        }
        // A segment the node no longer holds (or whose membership went) is
        // forgotten, with what its core knew of its peers.
        for (&volume, core) in cores.iter_mut() {
            for pg in core.pgs() {
                if !views.contains_key(&(volume, pg)) {
                    core.remove_local(pg);
                }
            }
        }
        if sampled_at.elapsed() >= FOREGROUND_SAMPLE {
            sampled_at = Instant::now();
            let latency_us = store.foreground_latency_us();
            for core in cores.values_mut() {
                match latency_us {
                    Some(us) => core.observe_foreground(us),
                    None => core.observe_no_foreground(),
                }
            }
        }
        let t = now();
        for (&volume, core) in cores.iter_mut() {
            for action in core.poll(t) {
                match action {
                    Action::SendDigest { pg, to } => {
                        let Some((view, membership)) = views.get(&(volume, pg)) else {
                            continue;
                        };
                        let Some(addr) = address(membership, to) else { continue };
                        let (view, peers, tx) = (*view, peers.clone(), tx.clone());
                        // Not tracked: a digest exchange is bounded by its timeout.
                        tokio::spawn(async move {
                            let msg = Message::Digest {
                                volume,
                                pg,
                                digest: view.digest,
                            };
                            let reply = tokio::time::timeout(CONNECT_TIMEOUT, peers.request(me, to, addr, msg)).await;
                            match reply {
                                Ok(Ok(Message::DigestOk { digest, .. })) => {
                                    let _ = tx
                                        .send(Outcome::Digest {
                                            volume,
                                            pg,
                                            from: to,
                                            digest,
                                        })
                                        .await;
                                }
                                Ok(Ok(other)) => {
                                    tracing::debug!(peer = to, pg, reply = ?other.kind(), "unexpected digest reply");
                                }
                                Ok(Err(e)) => tracing::debug!(peer = to, pg, error = %e, "digest refused or failed"),
                                Err(_) => tracing::debug!(peer = to, pg, "digest timed out"),
                            }
                        });
                    }
                    Action::Pull {
                        id,
                        pg,
                        to,
                        after,
                        max_bytes,
                    } => {
                        let Some((view, membership)) = views.get(&(volume, pg)) else {
                            core.on_failed(t, id);
                            continue;
                        };
                        let Some(addr) = address(membership, to) else {
                            core.on_failed(t, id);
                            continue;
                        };
                        let (view, peers, tx, store) = (*view, peers.clone(), tx.clone(), store.clone());
                        let work = async move {
                            match pull(&*store, &peers, me, to, addr, view, after, max_bytes).await {
                                Ok(bytes) => Outcome::Done { volume, id, bytes },
                                Err(e) => {
                                    tracing::debug!(peer = to, pg, after, error = %e, "pull failed");
                                    Outcome::Failed { volume, id }
                                }
                            }
                        };
                        let handle = spawn(work, tx);
                        tasks.insert((volume, id), handle);
                    }
                    Action::Hydrate { id, pg, from, at } => {
                        let Some((view, membership)) = views.get(&(volume, pg)) else {
                            core.on_failed(t, id);
                            continue;
                        };
                        let Some(addr) = address(membership, from) else {
                            core.on_failed(t, id);
                            continue;
                        };
                        let (view, peers, tx, store) = (*view, peers.clone(), tx.clone(), store.clone());
                        tracing::info!(
                            volume,
                            pg,
                            from,
                            at,
                            "hydrating the segment from a peer: what it lacks was coalesced by every peer"
                        );
                        let progress = tx.clone();
                        let mut pace = paces
                            .entry(volume)
                            .or_insert_with(|| watch::channel(true).0)
                            .subscribe();
                        let work = async move {
                            let h = Hydrating {
                                store: &*store,
                                peers: &peers,
                                me,
                                from,
                                addr,
                                view,
                                id,
                                at,
                                tx: &progress,
                            };
                            match hydrate(h, &mut pace).await {
                                Ok((scl, bytes)) => {
                                    tracing::info!(volume, pg, from, scl, bytes, "segment hydrated");
                                    Outcome::Done { volume, id, bytes }
                                }
                                Err(e) => {
                                    store.hydrate_abort(view.id);
                                    tracing::warn!(volume, pg, from, error = %e, "hydration failed; will try again");
                                    Outcome::Failed { volume, id }
                                }
                            }
                        };
                        let handle = spawn(work, tx);
                        tasks.insert((volume, id), handle);
                    }
                    Action::Abandon { id } => {
                        if let Some(handle) = tasks.remove(&(volume, id)) {
                            handle.abort();
                        }
                    }
                }
            }
            let go = core.hydration_may_go_on();
            paces
                .entry(volume)
                .or_insert_with(|| watch::channel(true).0)
                .send_if_modified(|was| std::mem::replace(was, go) != go);
        }
    }
    for (_, handle) in tasks {
        handle.abort();
    }
}

/// Runs `work` to its end in a task of its own, which `Abandon` never
/// cancels: the node's calls in it (an append of pulled records, a step of
/// a hydration) must not stop half way, or a log pin or a rebuild mark
/// would be left behind. Abandoning drops only the wait for it, and with it
/// the outcome; every request in it ends by `REQUEST_TIMEOUT` at most.
fn spawn<F: Future<Output = Outcome> + Send + 'static>(work: F, tx: mpsc::Sender<Outcome>) -> AbortHandle {
    let inner = tokio::spawn(work);
    tokio::spawn(async move {
        if let Ok(outcome) = inner.await {
            let _ = tx.send(outcome).await;
        }
    })
    .abort_handle()
}

fn take(cores: &mut HashMap<u64, GossipCore>, tasks: &mut HashMap<(u64, u64), AbortHandle>, now: Millis, o: Outcome) {
    match o {
        Outcome::Digest {
            volume,
            pg,
            from,
            digest,
        } => {
            if let Some(core) = cores.get_mut(&volume)
                && let Err(refusal) = core.on_digest(now, pg, from, digest)
            {
                tracing::debug!(volume, pg, peer = from, %refusal, "peer's digest not taken");
            }
        }
        Outcome::Done { volume, id, bytes } => {
            tasks.remove(&(volume, id));
            if let Some(core) = cores.get_mut(&volume) {
                core.on_pulled(now, id, bytes);
            }
        }
        Outcome::Progress { volume, id, bytes } => {
            if let Some(core) = cores.get_mut(&volume) {
                core.on_progress(now, id, bytes);
            }
        }
        Outcome::Failed { volume, id } => {
            tasks.remove(&(volume, id));
            if let Some(core) = cores.get_mut(&volume) {
                core.on_failed(now, id);
            }
        }
    }
}

fn address(membership: &Membership, peer: NodeId) -> Option<SocketAddr> {
    membership.members.iter().find(|m| m.id == peer).map(|m| m.addr)
}

/// Pull the chain above `after` from `to` and have the node admit it;
/// returns the bytes pulled.
#[allow(clippy::too_many_arguments)]
async fn pull<S: Store>(
    store: &S,
    peers: &Peers,
    me: NodeId,
    to: NodeId,
    addr: SocketAddr,
    view: SegmentView,
    after: u64,
    max_bytes: u32,
) -> Result<u64, String> {
    let msg = Message::PullRecords {
        volume: view.id.volume,
        pg: view.id.pg,
        installed_epoch: view.digest.installed_epoch,
        membership_epoch: view.digest.membership_epoch,
        after,
        max_bytes,
    };
    let records = match peers.request(me, to, addr, msg).await? {
        Message::Records { records, .. } => records,
        other => return Err(format!("answered {:?} to PullRecords", other.kind())),
    };
    if records.is_empty() {
        return Err(format!("node {to} holds nothing above {after}"));
    }
    let bytes = records.iter().map(|r| r.encoded_len() as u64).sum();
    store
        .admit_pulled(
            view.id,
            view.digest.installed_epoch,
            view.digest.membership_epoch,
            records,
        )
        .await?;
    Ok(bytes)
}

/// Fetch every page version `from` holds and take them as the segment's
/// base; returns the SCL after and the bytes fetched. `at` is the donor's
/// floor in the digest it was chosen by. Each reply is checked
/// ([`check_batch`]) before the node takes any of it: a donor that answers
/// out of bounds fails the hydration with nothing of that reply stored, and
/// the core asks again (another donor, or this one with a fresh digest).
///
/// The segment's pages are fetched in [`HYDRATE_STREAMS`] stretches at
/// once, each a stream of batches: a batch's end is the donor's to say, so
/// one stream can have only one batch coming at a time, and that left both
/// devices waiting on round trips. The streams write disjoint pages. The
/// base's floor is the lowest any batch had (floors never go back within a
/// stream, so it is the lowest of their first batches).
async fn hydrate<S: Store>(h: Hydrating<'_, S>, pace: &mut watch::Receiver<bool>) -> Result<(u64, u64), String> {
    let Hydrating { store, view, .. } = h;
    let pages = store
        .page_range(view.id)
        .ok_or_else(|| "the segment is gone".to_string())?;
    store.hydrate_begin(view.id).await?;
    let count = pages.end.saturating_sub(pages.first);
    // A stream that fails stops the others at their next batch (a step
    // under way is never cut short: see `spawn`).
    let failed = std::sync::atomic::AtomicBool::new(false);
    let streams = (0..HYDRATE_STREAMS).map(|i| {
        let stretch = (
            pages.first + count * i / HYDRATE_STREAMS,
            pages.first + count * (i + 1) / HYDRATE_STREAMS,
        );
        let pace = pace.clone();
        let failed = &failed;
        async move {
            let result = hydrate_stretch(h, pace, failed, pages, stretch).await;
            if result.is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            result
        }
    });
    let results = futures_util::future::join_all(streams).await;
    // The failure that stopped the others, rather than theirs.
    if let Some(Err(e)) = (results.iter())
        .find(|r| r.as_ref().is_err_and(|e| e != STOPPED_BY_ANOTHER))
        .or_else(|| results.iter().find(|r| r.is_err()))
    {
        return Err(e.clone());
    }
    let mut floor = None;
    let mut total = 0;
    for stream in results {
        let (first_floor, bytes) = stream?;
        floor = first_floor
            .map(|f: u64| floor.map_or(f, |lowest: u64| lowest.min(f)))
            .or(floor);
        total += bytes;
    }
    let scl = store.hydrate_end(view.id, floor.unwrap_or(0)).await?;
    Ok((scl, total))
}

const STOPPED_BY_ANOTHER: &str = "another stream of the hydration failed";

/// Streams of one hydration: four keep the donor's and the segment's
/// devices busy, with at most two batches (4 MiB of pages) each in memory.
const HYDRATE_STREAMS: u64 = 4;

/// One hydration: the segment, the donor `from` chosen by its digest
/// showing floor `at`, and where its progress goes (request `id`).
struct Hydrating<'a, S> {
    store: &'a S,
    peers: &'a Peers,
    me: NodeId,
    from: NodeId,
    addr: SocketAddr,
    view: SegmentView,
    id: u64,
    at: u64,
    tx: &'a mpsc::Sender<Outcome>,
}

// By hand: a derive would ask `S: Copy`, and only references to it are held.
impl<S> Clone for Hydrating<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S> Copy for Hydrating<'_, S> {}

/// One stream of [`hydrate`]: the pages `stretch.0 .. stretch.1`, batch
/// after batch, the next fetched while this one is written. Returns the
/// floor of its first batch (None if it had none) and the bytes it took.
async fn hydrate_stretch<S: Store>(
    h: Hydrating<'_, S>,
    mut pace: watch::Receiver<bool>,
    failed: &std::sync::atomic::AtomicBool,
    pages: SegmentPages,
    (first, end): (u64, u64),
) -> Result<(Option<u64>, u64), String> {
    let Hydrating {
        store,
        from,
        view,
        id,
        at,
        tx,
        ..
    } = h;
    if first >= end {
        return Ok((None, 0));
    }
    let mut page = first;
    // The first batch's floor, and the last one's.
    let (mut floor, mut last_floor) = (None, at);
    let mut total = 0;
    let asked = |first_page, floor_before| Asked {
        volume: view.id.volume,
        pg: view.id.pg,
        pages,
        first_page,
        changed_after: view.digest.floor,
        max_bytes: HYDRATE_BATCH_BYTES,
        floor_at_least: floor_before,
    };
    // Each batch waits for the repair budget (the core's rate, which
    // yields to the foreground), so a hydration is paced like pulls are.
    let mut paced = async |first_page| {
        pace.wait_for(|go| *go)
            .await
            .map_err(|_| "gossip is stopping".to_string())?;
        if failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(STOPPED_BY_ANOTHER.to_string());
        }
        fetch_versions(h, first_page).await
    };
    let mut fetched = paced(page).await?;
    loop {
        let mut batch = check_batch(from, &asked(page, last_floor), fetched)?;
        last_floor = batch.floor;
        floor.get_or_insert(batch.floor);
        // Pages past the stretch are the next stream's.
        batch.versions.retain(|v| v.page < end);
        let bytes: u64 = batch.versions.iter().map(|v| v.bytes.len() as u64).sum();
        let next_page = batch.next_page;
        let more = next_page < end;
        let went_through = next_page.min(end).saturating_sub(page);
        let (written, next) = tokio::join!(store.hydrate_pages(view.id, batch.versions, went_through), async {
            if more { Some(paced(next_page).await) } else { None }
        });
        written?;
        total += bytes;
        let _ = tx
            .send(Outcome::Progress {
                volume: view.id.volume,
                id,
                bytes,
            })
            .await;
        page = next_page;
        match next {
            Some(reply) => fetched = reply?,
            None => return Ok((floor, total)),
        }
    }
}

/// One `GetPageVersions` batch from the hydration's donor, as the reply says it.
async fn fetch_versions<S>(h: Hydrating<'_, S>, first_page: u64) -> Result<Message, String> {
    let view = h.view;
    let msg = Message::GetPageVersions {
        volume: view.id.volume,
        pg: view.id.pg,
        installed_epoch: view.digest.installed_epoch,
        membership_epoch: view.digest.membership_epoch,
        first_page,
        max_bytes: HYDRATE_BATCH_BYTES,
        // Every change at or below the segment's own floor is in its pages.
        changed_after: view.digest.floor,
    };
    h.peers.request(h.me, h.from, h.addr, msg).await
}

/// Page bytes one `GetPageVersions` brings at most.
const HYDRATE_BATCH_BYTES: u32 = 2 << 20;

/// What one `GetPageVersions` asked, to check its reply against.
#[derive(Debug, Clone, Copy)]
struct Asked {
    volume: u64,
    pg: Pg,
    pages: SegmentPages,
    first_page: u64,
    changed_after: u64,
    max_bytes: u32,
    /// The donor's floor as last heard (its digest, or the batch before):
    /// a coalesced LSN never goes back.
    floor_at_least: u64,
}

/// A donor's `PageVersions` reply that passed [`check_batch`].
#[derive(Debug)]
struct Batch {
    floor: u64,
    next_page: u64,
    versions: Vec<WirePageVersion>,
}

/// Check a donor's reply to `asked` before any of it is stored: the
/// segment named is the one asked about; the floor is not below what the
/// donor said before (its coalesced LSN never goes back) and is an LSN;
/// `next_page` moves on from the first page asked and stays inside the
/// segment; each version is of a page in the range the batch covers, in
/// ascending order and once, with the segment's page size, above the LSN
/// the segment asked changes after (and so never 0); and the page bytes
/// keep to the bound asked (beyond one version). Any breach refuses the
/// reply whole, naming the donor and what is wrong.
fn check_batch(from: NodeId, asked: &Asked, reply: Message) -> Result<Batch, String> {
    let refuse = |why: String| Err(format!("node {from} answered GetPageVersions out of bounds: {why}"));
    let (volume, pg, floor, next_page, versions) = match reply {
        Message::PageVersions {
            volume,
            pg,
            floor,
            next_page,
            versions,
        } => (volume, pg, floor, next_page, versions),
        other => return Err(format!("node {from} answered {:?} to GetPageVersions", other.kind())),
    };
    if (volume, pg) != (asked.volume, asked.pg) {
        return refuse(format!(
            "the reply is for volume {volume} pg {pg}, not volume {} pg {}",
            asked.volume, asked.pg
        ));
    }
    if floor < asked.floor_at_least {
        return refuse(format!(
            "floor {floor} is below {}, the floor it gave before (a floor never goes back)",
            asked.floor_at_least
        ));
    }
    if floor == u64::MAX {
        return refuse(format!("floor {floor} is not an LSN"));
    }
    if next_page <= asked.first_page {
        return refuse(format!(
            "next page {next_page} does not move on from page {}",
            asked.first_page
        ));
    }
    if next_page > asked.pages.end {
        return refuse(format!(
            "next page {next_page} is past the segment's pages {}..{}",
            asked.pages.first, asked.pages.end
        ));
    }
    let mut bytes = 0usize;
    let mut after = None;
    for v in &versions {
        if v.page < asked.first_page || v.page >= next_page {
            return refuse(format!(
                "a version of page {}, outside the batch's pages {}..{next_page}",
                v.page, asked.first_page
            ));
        }
        if after.is_some_and(|p| v.page <= p) {
            return refuse(format!(
                "a version of page {} after one of page {}",
                v.page,
                after.unwrap_or(0)
            ));
        }
        after = Some(v.page);
        if v.bytes.len() != asked.pages.page_bytes as usize {
            return refuse(format!(
                "page {}: a version of {} bytes; the segment's pages are {} bytes",
                v.page,
                v.bytes.len(),
                asked.pages.page_bytes
            ));
        }
        if v.lsn <= asked.changed_after {
            return refuse(format!(
                "page {}: a version at LSN {}, not above LSN {} (asked for changes after it)",
                v.page, v.lsn, asked.changed_after
            ));
        }
        bytes += v.bytes.len();
    }
    if versions.len() > 1 && bytes > asked.max_bytes as usize {
        return refuse(format!(
            "{bytes} page bytes, more than the {} asked for",
            asked.max_bytes
        ));
    }
    Ok(Batch {
        floor,
        next_page,
        versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: SegmentPages = SegmentPages {
        first: 1024,
        end: 2048,
        page_bytes: 4096,
    };

    fn asked() -> Asked {
        Asked {
            volume: 3,
            pg: 1,
            pages: PAGES,
            first_page: 1100,
            changed_after: 50,
            max_bytes: 3 * 4096,
            floor_at_least: 90,
        }
    }

    fn version(page: u64, lsn: u64) -> WirePageVersion {
        WirePageVersion {
            page,
            lsn,
            bytes: vec![7; 4096],
        }
    }

    fn reply(floor: u64, next_page: u64, versions: Vec<WirePageVersion>) -> Message {
        Message::PageVersions {
            volume: 3,
            pg: 1,
            floor,
            next_page,
            versions,
        }
    }

    fn refused(reply: Message) -> String {
        match check_batch(5, &asked(), reply) {
            Ok(b) => panic!("taken: floor {}, next page {}", b.floor, b.next_page),
            Err(e) => {
                assert!(e.starts_with("node 5 answered"), "{e}");
                e
            }
        }
    }

    #[test]
    fn a_reply_inside_what_was_asked_is_taken() {
        // Versions may be above the floor (coalescing went on between).
        let b = check_batch(
            5,
            &asked(),
            reply(95, 1200, vec![version(1100, 60), version(1150, 200)]),
        )
        .unwrap();
        assert_eq!((b.floor, b.next_page, b.versions.len()), (95, 1200, 2));
        // The end of the segment; no versions (a sparse range); one
        // version past the byte bound.
        assert!(check_batch(5, &asked(), reply(90, 2048, vec![])).is_ok());
        let one = Asked {
            max_bytes: 100,
            ..asked()
        };
        assert!(check_batch(5, &one, reply(90, 1101, vec![version(1100, 60)])).is_ok());
    }

    #[test]
    fn a_reply_out_of_bounds_is_refused_whole() {
        let ok = || vec![version(1100, 60), version(1101, 61)];
        // The floor goes back, or is not an LSN.
        assert!(refused(reply(89, 1200, ok())).contains("floor 89 is below 90"));
        assert!(refused(reply(u64::MAX, 1200, ok())).contains("not an LSN"));
        // next_page stands still, goes back, or leaves the segment.
        assert!(refused(reply(95, 1100, vec![])).contains("does not move on"));
        assert!(refused(reply(95, 7, vec![])).contains("does not move on"));
        assert!(refused(reply(95, 2049, vec![])).contains("past the segment's pages 1024..2048"));
        assert!(refused(reply(95, u64::MAX, vec![])).contains("past the segment"));
        // A version outside the batch's pages: before the first asked, at
        // or past next_page, or in another segment.
        assert!(refused(reply(95, 1200, vec![version(1099, 60)])).contains("page 1099, outside"));
        assert!(refused(reply(95, 1200, vec![version(1200, 60)])).contains("page 1200, outside"));
        assert!(refused(reply(95, 2048, vec![version(5000, 60)])).contains("page 5000, outside"));
        // Twice the same page, or out of order.
        assert!(refused(reply(95, 1200, vec![version(1101, 60), version(1101, 61)])).contains("after one of"));
        assert!(refused(reply(95, 1200, vec![version(1102, 60), version(1101, 61)])).contains("after one of"));
        // A page of another size.
        let mut short = version(1100, 60);
        short.bytes.truncate(100);
        assert!(refused(reply(95, 1200, vec![short])).contains("100 bytes"));
        let mut long = version(1100, 60);
        long.bytes.push(0);
        assert!(refused(reply(95, 1200, vec![long])).contains("4097 bytes"));
        // At or below what the segment asked changes after (LSN 0 among them).
        assert!(refused(reply(95, 1200, vec![version(1100, 50)])).contains("LSN 50, not above LSN 50"));
        assert!(refused(reply(95, 1200, vec![version(1100, 0)])).contains("LSN 0"));
        // More page bytes than asked for.
        let four = (1100..1104).map(|p| version(p, 60)).collect();
        assert!(refused(reply(95, 1200, four)).contains("more than the 12288 asked"));
        // Another segment's reply, or another message.
        let mut other = reply(95, 1200, ok());
        if let Message::PageVersions { pg, .. } = &mut other {
            *pg = 2;
        }
        assert!(refused(other).contains("volume 3 pg 2, not volume 3 pg 1"));
        let e = check_batch(
            5,
            &asked(),
            Message::Records {
                volume: 3,
                pg: 1,
                scl: 0,
                records: vec![],
            },
        )
        .unwrap_err();
        assert!(e.contains("to GetPageVersions"), "{e}");
    }

    #[test]
    fn a_connection_to_a_node_s_old_address_is_dropped() {
        let (old, new): (SocketAddr, SocketAddr) =
            ("127.0.0.1:4001".parse().unwrap(), "127.0.0.1:4002".parse().unwrap());
        let mut c = Connections::default();
        c.insert(7, old, "to the old address");
        assert_eq!(c.get(7, old), Some("to the old address"));
        // The membership moved node 7: its connection is not used, and gone.
        assert_eq!(c.get(7, new), None);
        assert_eq!(c.get(7, old), None);
        c.insert(7, new, "to the new address");
        // A request that failed on the old connection does not drop the new one.
        c.remove(7, old);
        assert_eq!(c.get(7, new), Some("to the new address"));
        c.remove(7, new);
        assert_eq!(c.get(7, new), None);
    }
}
