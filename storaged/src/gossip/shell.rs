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
    /// The first page of the segment and the page after its last.
    fn page_range(&self, id: SegmentId) -> Option<(u64, u64)>;
    fn admit_pulled(
        &self,
        id: SegmentId,
        installed_epoch: u64,
        membership_epoch: u64,
        records: Vec<RedoRecord>,
    ) -> impl Future<Output = Result<u64, String>> + Send;
    fn hydrate_begin(&self, id: SegmentId) -> impl Future<Output = Result<(), String>> + Send;
    fn hydrate_pages(
        &self,
        id: SegmentId,
        versions: Vec<WirePageVersion>,
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
    clients: Mutex<HashMap<NodeId, Arc<NodeClient>>>,
}

impl Peers {
    async fn client(&self, me: NodeId, peer: NodeId, addr: SocketAddr) -> Result<Arc<NodeClient>, ClientError> {
        if let Some(c) = self.clients.lock().unwrap_or_else(|p| p.into_inner()).get(&peer) {
            return Ok(c.clone());
        }
        let connect = NodeClient::connect_to_node(addr, Role::StorageNode, me, peer);
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(c) => Arc::new(c?),
            Err(_) => return Err(ClientError::Closed),
        };
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, client.clone());
        Ok(client)
    }

    fn drop_client(&self, peer: NodeId) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer);
    }

    /// Send `msg` to `peer`; a lost connection is forgotten so the next
    /// request opens a new one.
    async fn request(&self, me: NodeId, peer: NodeId, addr: SocketAddr, msg: Message) -> Result<Message, String> {
        let client = self.client(me, peer, addr).await.map_err(|e| e.to_string())?;
        let reply = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(msg)).await {
            Ok(reply) => reply,
            Err(_) => {
                self.drop_client(peer);
                return Err(format!("node {peer} did not answer within {REQUEST_TIMEOUT:?}"));
            }
        };
        match reply {
            Ok(Message::Error { code, message, .. }) => Err(format!("{code:?}: {message}")),
            Ok(reply) => Ok(reply),
            Err(e) => {
                self.drop_client(peer);
                Err(e.to_string())
            }
        }
    }
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
            if let Some(us) = store.foreground_latency_us() {
                for core in cores.values_mut() {
                    core.observe_foreground(us);
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
                        let work = async move {
                            match hydrate(&*store, &peers, me, from, addr, view, id, &progress).await {
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
/// base; returns the SCL after and the bytes fetched.
#[allow(clippy::too_many_arguments)]
async fn hydrate<S: Store>(
    store: &S,
    peers: &Peers,
    me: NodeId,
    from: NodeId,
    addr: SocketAddr,
    view: SegmentView,
    id: u64,
    tx: &mpsc::Sender<Outcome>,
) -> Result<(u64, u64), String> {
    let (first, end) = store
        .page_range(view.id)
        .ok_or_else(|| "the segment is gone".to_string())?;
    store.hydrate_begin(view.id).await?;
    let mut page = first;
    let mut floor = u64::MAX;
    let mut total = 0;
    if page >= end {
        let scl = store.hydrate_end(view.id, 0).await?;
        return Ok((scl, 0));
    }
    // The next batch is fetched while this one is written.
    let mut fetched = fetch_versions(peers, me, from, addr, view, page).await?;
    loop {
        let (batch_floor, next_page, versions) = fetched;
        if next_page <= page {
            return Err(format!("node {from} did not move on from page {page}"));
        }
        floor = floor.min(batch_floor);
        let bytes: u64 = versions.iter().map(|v| v.bytes.len() as u64).sum();
        let more = next_page < end;
        let (written, next) = tokio::join!(store.hydrate_pages(view.id, versions), async {
            if more {
                Some(fetch_versions(peers, me, from, addr, view, next_page).await)
            } else {
                None
            }
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
            Some(batch) => fetched = batch?,
            None => break,
        }
    }
    let floor = if floor == u64::MAX { 0 } else { floor };
    let scl = store.hydrate_end(view.id, floor).await?;
    Ok((scl, total))
}

/// One `GetPageVersions` batch from `from`: (floor, next page, versions).
async fn fetch_versions(
    peers: &Peers,
    me: NodeId,
    from: NodeId,
    addr: SocketAddr,
    view: SegmentView,
    first_page: u64,
) -> Result<(u64, u64, Vec<WirePageVersion>), String> {
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
    match peers.request(me, from, addr, msg).await? {
        Message::PageVersions {
            floor,
            next_page,
            versions,
            ..
        } => Ok((floor, next_page, versions)),
        other => Err(format!("answered {:?} to GetPageVersions", other.kind())),
    }
}

/// Page bytes one `GetPageVersions` brings at most.
const HYDRATE_BATCH_BYTES: u32 = 2 << 20;
