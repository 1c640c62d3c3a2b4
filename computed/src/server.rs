//! The tokio shell around the writer core: connections to every storage
//! node (reconnecting with backoff), the client listener, and one driver
//! task that owns the [`Writer`] and moves bytes between them. No protocol
//! decision is made here; no lock is held across an await (the driver owns
//! the core outright).
//!
//! Bounds: client inputs and control inputs each wait in a bounded channel
//! (`INPUTS_MAX`); a client connection has at most
//! `REQUESTS_PER_CONNECTION_MAX` requests in flight and is not read beyond;
//! each storage connection's outgoing queue holds `NODE_FRAMES_QUEUED_MAX`
//! frames (the core's in-flight windows keep it far below; a full queue
//! resets that connection).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use storaged::proto::{
    AppendHeader, FRAME_BYTES_MAX, Frame, FrameDecoder, Message, PROTOCOL_VERSION, Role, encode_append_frame,
    encode_frame,
};

use crate::api::{self, ClientErrorCode, ClientMessage, VolumeInfo};
use crate::cluster::Cluster;
use crate::core::{Output, PageWrite, TxnError, Writer, WriterConfig};
use crate::membership::{Change, ChangeError};
use crate::recovery::{Recovered, Recovery, RecoveryError};

const INPUTS_MAX: usize = 4096;
const REQUESTS_PER_CONNECTION_MAX: usize = 1024;
const NODE_FRAMES_QUEUED_MAX: usize = 4096;
const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;
const READ_CHUNK_BYTES: usize = 64 * 1024;
const TICK: Duration = Duration::from_millis(10);
/// A storage node that cannot be reached is tried again after 50 ms, then
/// at doubling intervals up to a quarter second: a node back from a
/// restart, or a new node a membership change hydrates, is taken in within
/// that (its appends and its hydration wait for it). A refused connect
/// costs next to nothing; one to a host that is gone waits out its own
/// connect timeout first.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A node refused for its identity is asked again this often: the right
/// node may come to that address (a device put back), and each refusal is
/// logged as an error, so not at the reconnect rate.
const WRONG_NODE_RETRY: Duration = Duration::from_secs(10);
/// Recovery asks again whatever is unanswered this often.
const RECOVERY_RETRY: Duration = Duration::from_millis(100);
/// While recovery waits, it says for what this often.
const RECOVERY_LOG_EVERY: Duration = Duration::from_secs(2);
/// On SIGTERM, wait at most this long for transactions in flight to commit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Inputs handled per wake-up before outputs are flushed, at most.
const INPUTS_PER_ROUND_MAX: usize = 1024;

/// (client connection, request id).
type Token = (u64, u64);

/// How [`run`] ends when a segment reports a newer epoch: another writer
/// recovered the volume. This one has closed its clients and must exit
/// (non-zero, [`EXIT_FENCED`]) rather than linger listening: a supervisor
/// then sees it stopped, and its clients go to the writer that owns the volume.
#[derive(Debug, thiserror::Error)]
#[error("another writer owns the volume (a segment is at epoch {epoch}); this one stopped")]
pub struct Fenced {
    pub epoch: u64,
}

/// `computed run`'s exit status when fenced by another writer.
pub const EXIT_FENCED: u8 = 3;

enum ClientInput {
    Commit {
        conn: u64,
        req: u64,
        writes: Vec<PageWrite>,
    },
}

enum Control {
    ClientOpen {
        conn: u64,
        tx: mpsc::Sender<Vec<u8>>,
    },
    ClientClosed {
        conn: u64,
    },
    Read {
        conn: u64,
        req: u64,
        page: u64,
    },
    Info {
        conn: u64,
        req: u64,
    },
    PgState {
        conn: u64,
        req: u64,
        pg: u32,
    },
    ChangeMembership {
        conn: u64,
        req: u64,
        pg: u32,
        change: Change,
    },
    NodeUp {
        node: u64,
        tx: mpsc::Sender<Vec<u8>>,
    },
    NodeDown {
        node: u64,
    },
    // Boxed: a message is large next to the other variants.
    Reply {
        node: u64,
        request: u64,
        message: Box<Message>,
    },
}

/// Serve the volume until `shutdown` turns true. `ready` is called with the
/// bound client address once the listener accepts connections.
pub async fn run(
    cluster: Cluster,
    config: WriterConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (client_tx, client_rx) = mpsc::channel::<ClientInput>(INPUTS_MAX);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(INPUTS_MAX);
    let (metrics_tx, metrics_rx) = watch::channel(String::new());
    let mut tasks = tokio::task::JoinSet::new();
    for node in &cluster.nodes {
        tasks.spawn(node_connection(node.id, node.address, ctl_tx.clone(), shutdown.clone()));
    }
    if let Some(m) = metrics {
        tasks.spawn(serve_metrics(m, metrics_rx, shutdown.clone()));
    }
    // Clients wait in the listen backlog until the volume is recovered.
    let (recovered, nodes) = match recover(&cluster, &mut ctl_rx, &mut shutdown).await {
        Ok(r) => r,
        Err(e) => {
            tasks.abort_all();
            // SIGTERM while recovering: nothing was served, nothing is owed.
            if *shutdown.borrow() {
                tracing::info!("stopped before recovery finished");
                return Ok(());
            }
            return Err(e);
        }
    };
    let info = VolumeInfo {
        volume: cluster.volume_id,
        page_bytes: cluster.page_bytes,
        pages: cluster.pages(),
        pgs: cluster.pgs,
        vdl: recovered.vdl,
        epoch: recovered.epoch,
    };
    let mut core = Writer::recovered(config, &recovered);
    for &node in nodes.keys() {
        core.node_up(node);
    }
    let links = Links {
        nodes,
        ctl_tx: ctl_tx.downgrade(),
        connecting: cluster.nodes.iter().map(|n| n.id).collect(),
    };
    let mut driver = tokio::spawn(drive(
        core,
        links,
        info,
        client_rx,
        ctl_rx,
        metrics_tx,
        shutdown.clone(),
    ));
    let mut next_conn = 1;
    // The driver ends on its own only when fenced (or failed): then stop
    // accepting at once.
    let ended = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let conn = next_conn;
                    next_conn += 1;
                    let (client_tx, ctl_tx, info) = (client_tx.clone(), ctl_tx.clone(), info);
                    tokio::spawn(async move {
                        if let Err(e) = client_connection(conn, stream, info, client_tx, ctl_tx).await {
                            tracing::debug!(%peer, error = %e, "client connection ended");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = shutdown.changed() => break None,
            r = &mut driver => break Some(r),
        }
    };
    drop(listener);
    drop(client_tx);
    drop(ctl_tx);
    let result = match ended {
        Some(r) => r,
        None => driver.await,
    };
    // The driver held every client's reply queue: with it gone, each
    // client connection's writer has ended and shut its socket down.
    tasks.abort_all();
    match result {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("the driver task failed: {e}")),
    }
}

/// Run [`Recovery`] over the storage connections until the volume's VDL
/// is durable on a write quorum of every PG at a new epoch. Returns where
/// the volume stands and the connections that are up.
async fn recover(
    cluster: &Cluster,
    ctl_rx: &mut mpsc::Receiver<Control>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<(Recovered, HashMap<u64, mpsc::Sender<Vec<u8>>>)> {
    let mut r = Recovery::new(
        cluster.volume_id,
        cluster.page_bytes,
        cluster.pg_pages,
        (0..cluster.pgs)
            .map(|pg| {
                cluster
                    .membership(pg)
                    .expect("the cluster file lists every node it places")
            })
            .collect(),
    );
    let mut nodes: HashMap<u64, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut retry = tokio::time::interval(RECOVERY_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut logged = Instant::now();
    let mut out = Vec::new();
    let mut frame = Vec::new();
    tracing::info!(volume = cluster.volume_id, "recovering the volume");
    loop {
        tokio::select! {
            c = ctl_rx.recv() => match c {
                Some(Control::NodeUp { node, tx }) => {
                    nodes.insert(node, tx);
                    r.node_up(node);
                }
                Some(Control::NodeDown { node }) => {
                    nodes.remove(&node);
                    r.node_down(node);
                }
                Some(Control::Reply { node, request, message }) => r.on_reply(node, request, *message),
                // No client is accepted before recovery ends.
                Some(_) => {}
                None => anyhow::bail!("the storage connections ended during recovery"),
            },
            _ = retry.tick() => {
                r.tick();
                if logged.elapsed() >= RECOVERY_LOG_EVERY {
                    tracing::warn!(progress = %r.progress(), "recovery is waiting for storage nodes");
                    logged = Instant::now();
                }
            }
            _ = shutdown.changed() => anyhow::bail!("stopped during recovery ({})", r.progress()),
        }
        if let Some(e) = r.failed() {
            return Err(match e {
                RecoveryError::Fenced { epoch } => Fenced { epoch: *epoch }.into(),
            });
        }
        r.take_outputs(&mut out);
        for (node, request, message) in out.drain(..) {
            frame.clear();
            if let Err(e) = encode_frame(request, &message, &mut frame) {
                tracing::error!(node, error = %e, "recovery request not encodable");
                continue;
            }
            if let Some(tx) = nodes.get(&node)
                && tx.try_send(frame.clone()).is_err()
            {
                // Reset the connection; its task reconnects and recovery asks again.
                nodes.remove(&node);
                r.node_down(node);
            }
        }
        if let Some(done) = r.recovered() {
            tracing::info!(
                epoch = done.epoch,
                vdl = done.vdl,
                next_lsn = done.next_lsn,
                took_ms = started.elapsed().as_millis() as u64,
                "volume recovered"
            );
            return Ok((done, nodes));
        }
    }
}

/// Bind a listener with the options computed wants.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The driver's links to the storage nodes.
struct Links {
    /// The send queue of each node whose connection is up.
    nodes: HashMap<u64, mpsc::Sender<Vec<u8>>>,
    /// To start a connection to a node a membership change brought in (not
    /// in the cluster file computed started with). Weak: the driver must not
    /// keep the control channel open by itself.
    ctl_tx: mpsc::WeakSender<Control>,
    /// Nodes with a connection task.
    connecting: HashSet<u64>,
}

async fn drive(
    mut core: Writer<Token>,
    mut links: Links,
    mut info: VolumeInfo,
    mut client_rx: mpsc::Receiver<ClientInput>,
    mut ctl_rx: mpsc::Receiver<Control>,
    metrics: watch::Sender<String>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let now_us = |s: Instant| s.elapsed().as_micros() as u64;
    let mut clients: HashMap<u64, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outputs = Vec::new();
    let mut draining: Option<Instant> = None;
    let mut frame = Vec::new();
    let (mut clients_open, mut ctl_open) = (true, true);
    loop {
        let accepting = core.accepting() && draining.is_none() && clients_open;
        tokio::select! {
            input = client_rx.recv(), if accepting => match input {
                Some(i) => on_client_input(&mut core, &clients, i),
                None => clients_open = false,
            },
            ctl = ctl_rx.recv(), if ctl_open => match ctl {
                Some(c) => on_control(&mut core, &mut clients, &mut links.nodes, &info, c),
                None => ctl_open = false,
            },
            _ = tick.tick() => {
                core.tick(now_us(start));
                let _ = metrics.send(metrics_text(&core));
            }
            _ = shutdown.changed(), if draining.is_none() => {
                tracing::info!(uncommitted = core.uncommitted_txns(), "stopping: waiting for transactions in flight");
                draining = Some(Instant::now());
            }
        }
        core.set_now(now_us(start));
        // Take what else is ready before sending: records that arrive
        // meanwhile ride along in the same batches.
        for _ in 0..INPUTS_PER_ROUND_MAX {
            match ctl_rx.try_recv() {
                Ok(c) => on_control(&mut core, &mut clients, &mut links.nodes, &info, c),
                Err(_) => break,
            }
        }
        for _ in 0..INPUTS_PER_ROUND_MAX {
            if !core.accepting() || draining.is_some() {
                break;
            }
            match client_rx.try_recv() {
                Ok(i) => on_client_input(&mut core, &clients, i),
                Err(_) => break,
            }
        }
        core.take_outputs(&mut outputs);
        for o in outputs.drain(..) {
            match o {
                Output::Append {
                    node,
                    request,
                    pg,
                    epoch,
                    membership_epoch,
                    records,
                } => {
                    frame.clear();
                    let slices: Vec<&[u8]> = records.iter().map(|r| r.bytes.as_slice()).collect();
                    let header = AppendHeader {
                        volume: info.volume,
                        epoch,
                        pg,
                        page_bytes: info.page_bytes,
                        pg_pages: info.pages / u64::from(info.pgs.max(1)),
                        membership_epoch,
                    };
                    // The core bounds a batch below the frame limit; a refusal
                    // here is a bug that must not take the writer down.
                    match encode_append_frame(request, &header, &slices, &mut frame) {
                        Ok(()) => to_node(&mut core, &mut links.nodes, node, frame.clone()),
                        Err(e) => tracing::error!(error = %e, pg, "append batch not encodable"),
                    }
                }
                Output::Request { node, request, message } => {
                    frame.clear();
                    if encode_frame(request, &message, &mut frame).is_ok() {
                        to_node(&mut core, &mut links.nodes, node, frame.clone());
                    }
                }
                Output::Committed { token, lsn } => {
                    reply(&clients, token, &ClientMessage::Committed { lsn });
                }
                Output::ReadDone { token, page } => {
                    let msg = ClientMessage::Page {
                        read_point: page.read_point,
                        lsn: page.lsn,
                        bytes: page.bytes,
                    };
                    reply(&clients, token, &msg);
                }
                Output::Fenced { epoch } => return Err(Fenced { epoch }.into()),
                Output::Connect { node, addr } => {
                    if let Some(tx) = links.ctl_tx.upgrade()
                        && links.connecting.insert(node)
                    {
                        tracing::info!(node, %addr, "connecting to a new member");
                        tokio::spawn(node_connection(node, addr, tx, shutdown.clone()));
                    }
                }
            }
        }
        info.vdl = core.vdl();
        if let Some(since) = draining {
            if core.uncommitted_txns() == 0 && core.waiting_txns() == 0 {
                tracing::info!(vdl = core.vdl(), "every transaction in flight committed");
                return Ok(());
            }
            if since.elapsed() > DRAIN_TIMEOUT {
                tracing::warn!(
                    uncommitted = core.uncommitted_txns(),
                    "stopping with transactions not yet durable"
                );
                return Ok(());
            }
        }
    }
}

fn on_client_input(core: &mut Writer<Token>, clients: &HashMap<u64, mpsc::Sender<Vec<u8>>>, input: ClientInput) {
    let ClientInput::Commit { conn, req, writes } = input;
    if let Err(e) = core.submit((conn, req), writes) {
        reply(clients, (conn, req), &txn_error(&e));
    }
}

fn txn_error(e: &TxnError) -> ClientMessage {
    let code = match e {
        TxnError::Empty | TxnError::BadWrite { .. } => ClientErrorCode::BadRequest,
        TxnError::TooManyWrites { .. } => ClientErrorCode::TooLarge,
        TxnError::PageOutOfRange { .. } => ClientErrorCode::PageOutOfRange,
        TxnError::Busy => ClientErrorCode::Busy,
        TxnError::Fenced { .. } => ClientErrorCode::Fenced,
    };
    ClientMessage::Error {
        code,
        message: e.to_string(),
    }
}

/// A refused membership change as the client sees it: Busy for a step
/// still being installed (ask again), Fenced, and BadRequest with what is
/// wrong for the rest.
fn change_error(e: &ChangeError) -> ClientMessage {
    let code = match e {
        ChangeError::Installing { .. } => ClientErrorCode::Busy,
        ChangeError::Fenced(_) => ClientErrorCode::Fenced,
        _ => ClientErrorCode::BadRequest,
    };
    ClientMessage::Error {
        code,
        message: e.to_string(),
    }
}

fn on_control(
    core: &mut Writer<Token>,
    clients: &mut HashMap<u64, mpsc::Sender<Vec<u8>>>,
    nodes: &mut HashMap<u64, mpsc::Sender<Vec<u8>>>,
    info: &VolumeInfo,
    c: Control,
) {
    match c {
        Control::ClientOpen { conn, tx } => {
            clients.insert(conn, tx);
        }
        Control::ClientClosed { conn } => {
            clients.remove(&conn);
        }
        Control::Read { conn, req, page } => {
            if let Err(e) = core.read((conn, req), page) {
                reply(clients, (conn, req), &txn_error(&e));
            }
        }
        Control::Info { conn, req } => {
            let mut info = *info;
            info.vdl = core.vdl();
            reply(clients, (conn, req), &ClientMessage::VolumeInfoOk { info });
        }
        Control::PgState { conn, req, pg } => {
            let msg = match core.pg_view(pg) {
                Some(view) => ClientMessage::PgStateOk { view },
                None => change_error(&ChangeError::NoSuchPg(pg)),
            };
            reply(clients, (conn, req), &msg);
        }
        Control::ChangeMembership { conn, req, pg, change } => {
            let msg = match core.change_membership(pg, change.clone()) {
                Ok(view) => {
                    tracing::info!(pg, ?change, epoch = view.membership.epoch, "membership change started");
                    ClientMessage::PgStateOk { view }
                }
                Err(e) => change_error(&e),
            };
            reply(clients, (conn, req), &msg);
        }
        Control::NodeUp { node, tx } => {
            tracing::info!(node, "storage node connected");
            nodes.insert(node, tx);
            core.node_up(node);
        }
        Control::NodeDown { node } => {
            if nodes.remove(&node).is_some() {
                tracing::warn!(node, "storage node connection lost");
            }
            core.node_down(node);
        }
        Control::Reply { node, request, message } => core.on_reply(node, request, *message),
    }
}

fn to_node(core: &mut Writer<Token>, nodes: &mut HashMap<u64, mpsc::Sender<Vec<u8>>>, node: u64, frame: Vec<u8>) {
    let Some(tx) = nodes.get(&node) else {
        return; // down: the core re-sends when it is back
    };
    if tx.try_send(frame).is_err() {
        // Full or closed: drop the connection (its task reconnects) and
        // let the core re-send from the segments' SCLs.
        tracing::warn!(node, "storage node queue full; resetting the connection");
        nodes.remove(&node);
        core.node_down(node);
    }
}

fn reply(clients: &HashMap<u64, mpsc::Sender<Vec<u8>>>, (conn, req): Token, msg: &ClientMessage) {
    let Some(tx) = clients.get(&conn) else {
        return; // the client left
    };
    let mut out = Vec::new();
    if api::encode(req, msg, &mut out).is_ok() {
        // The queue holds a connection's whole in-flight limit: never full.
        let _ = tx.try_send(out);
    }
}

fn metrics_text(core: &Writer<Token>) -> String {
    let mut s = format!(
        "computed_vdl {}\ncomputed_vcl {}\ncomputed_lsn_allocated {}\ncomputed_txns_uncommitted {}\n\
         computed_txns_waiting_lal {}\ncomputed_held_bytes {}\ncomputed_reads_inflight {}\n",
        core.vdl(),
        core.vcl(),
        core.allocated_through(),
        core.uncommitted_txns(),
        core.waiting_txns(),
        core.held_bytes(),
        core.reads_inflight(),
    );
    for pg in 0..core.config().memberships.len() as u32 {
        s.push_str(&format!("computed_pgcl{{pg=\"{pg}\"}} {}\n", core.pgcl(pg)));
        let Some(view) = core.pg_view(pg) else { continue };
        s.push_str(&format!(
            "computed_membership_epoch{{pg=\"{pg}\"}} {}\n",
            view.membership.epoch
        ));
        for m in &view.members {
            s.push_str(&format!("computed_scl{{pg=\"{pg}\",node=\"{}\"}} {}\n", m.id, m.scl));
        }
    }
    s
}

async fn serve_metrics(listener: TcpListener, text: watch::Receiver<String>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (mut stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let body = text.borrow().clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut req)).await;
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

/// One client connection: decode requests, hand them to the driver, write
/// its replies. A bad frame gets an Error and the connection is closed; a
/// bad request gets an Error and the connection goes on.
async fn client_connection(
    conn: u64,
    stream: TcpStream,
    info: VolumeInfo,
    client_tx: mpsc::Sender<ClientInput>,
    ctl_tx: mpsc::Sender<Control>,
) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let inflight = Arc::new(Semaphore::new(REQUESTS_PER_CONNECTION_MAX));
    // Room for every reply in flight plus the locally answered ones.
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(REQUESTS_PER_CONNECTION_MAX + 16);
    let (local_tx, mut local_rx) = mpsc::channel::<Vec<u8>>(16);
    ctl_tx
        .send(Control::ClientOpen { conn, tx: reply_tx })
        .await
        .map_err(|_| anyhow::anyhow!("computed is stopping"))?;
    let permits = inflight.clone();
    let write_task = tokio::spawn(async move {
        let mut out = Vec::new();
        loop {
            out.clear();
            tokio::select! {
                f = reply_rx.recv() => match f {
                    Some(f) => { out.extend_from_slice(&f); permits.add_permits(1); }
                    None => break,
                },
                f = local_rx.recv() => match f {
                    Some(f) => out.extend_from_slice(&f),
                    None => break,
                },
            }
            while out.len() < WRITE_BATCH_BYTES_MAX {
                match reply_rx.try_recv() {
                    Ok(f) => {
                        out.extend_from_slice(&f);
                        permits.add_permits(1);
                    }
                    Err(_) => break,
                }
            }
            if writer.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut greeted = false;
    let result: anyhow::Result<()> = 'read: loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e.into()),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        loop {
            let (req, msg) = match api::decode(&buf[used..]) {
                Ok(Some((req, msg, len))) => {
                    used += len;
                    (req, msg)
                }
                Ok(None) => break,
                Err(e) => {
                    let mut out = Vec::new();
                    let err = ClientMessage::Error {
                        code: e.code(),
                        message: e.to_string(),
                    };
                    let _ = api::encode(0, &err, &mut out);
                    let _ = local_tx.send(out).await;
                    break 'read Err(anyhow::anyhow!("bad frame: {e}"));
                }
            };
            let local = |msg: &ClientMessage| {
                let mut out = Vec::new();
                let _ = api::encode(req, msg, &mut out);
                out
            };
            if !greeted {
                let answer = match msg {
                    ClientMessage::Hello { .. } => {
                        greeted = true;
                        ClientMessage::HelloOk { info }
                    }
                    _ => ClientMessage::Error {
                        code: ClientErrorCode::BadRequest,
                        message: "the first message must be Hello".into(),
                    },
                };
                let _ = local_tx.send(local(&answer)).await;
                if !greeted {
                    break 'read Ok(());
                }
                continue;
            }
            let control = match msg {
                ClientMessage::Commit { writes } => Some(Err(ClientInput::Commit { conn, req, writes })),
                ClientMessage::Read { page } => Some(Ok(Control::Read { conn, req, page })),
                ClientMessage::VolumeInfo => Some(Ok(Control::Info { conn, req })),
                ClientMessage::PgState { pg } => Some(Ok(Control::PgState { conn, req, pg })),
                ClientMessage::ChangeMembership { pg, change } => {
                    Some(Ok(Control::ChangeMembership { conn, req, pg, change }))
                }
                other => {
                    let err = ClientMessage::Error {
                        code: ClientErrorCode::BadRequest,
                        message: format!("{other:?} is not a request").chars().take(200).collect(),
                    };
                    let _ = local_tx.send(local(&err)).await;
                    None
                }
            };
            let Some(input) = control else {
                continue;
            };
            // Backpressure: no more from this client until a reply frees a slot.
            match inflight.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => break 'read Ok(()),
            }
            let sent = match input {
                Ok(c) => ctl_tx.send(c).await.is_ok(),
                Err(i) => client_tx.send(i).await.is_ok(),
            };
            if !sent {
                break 'read Ok(());
            }
        }
        buf.drain(..used);
    };
    let _ = ctl_tx.send(Control::ClientClosed { conn }).await;
    drop(local_tx);
    let _ = write_task.await;
    result
}

/// Keep a connection to one storage node: connect, say Hello, check that
/// the node is the one the cluster file puts at `addr`, report it up, move
/// frames both ways, report it down, back off, again. A node that is not
/// the one expected is never reported up: none of its PGs' records or
/// requests (recovery's included) go to it, and its segments count as down.
async fn node_connection(
    node: u64,
    addr: SocketAddr,
    ctl_tx: mpsc::Sender<Control>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        let stream = tokio::select! {
            s = attempt => s,
            _ = shutdown.changed() => return,
        };
        let mut wait = backoff;
        match stream {
            Ok(stream) => {
                let hello =
                    tokio::time::timeout(HELLO_TIMEOUT, node_session(node, addr, stream, &ctl_tx, &mut backoff));
                match hello.await {
                    Ok(Ok(session)) => match session.await {
                        Ok(Err(e)) => tracing::debug!(node, error = %e, "storage connection ended"),
                        Ok(Ok(())) => {}
                        Err(e) => tracing::warn!(node, error = %e, "storage connection task failed"),
                    },
                    Ok(Err(HelloError::WrongNode(e))) => {
                        tracing::error!(node, %addr, "{e}");
                        wait = WRONG_NODE_RETRY;
                    }
                    Ok(Err(HelloError::Io(e))) => tracing::debug!(node, error = %e, "storage node refused the Hello"),
                    Err(_) => tracing::debug!(node, "storage node did not answer the Hello"),
                }
                if ctl_tx.send(Control::NodeDown { node }).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!(node, %addr, error = %e, "cannot connect to storage node"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Why a Hello did not open a session.
enum HelloError {
    Io(std::io::Error),
    /// The node at the address is another node (`ClientError::WrongNode`).
    WrongNode(storaged::client::ClientError),
}

impl From<std::io::Error> for HelloError {
    fn from(e: std::io::Error) -> HelloError {
        HelloError::Io(e)
    }
}

type Session = tokio::task::JoinHandle<std::io::Result<()>>;

/// Say Hello, report the node up, and start the session's task (so that
/// the caller's Hello timeout does not bound the session).
async fn node_session(
    node: u64,
    addr: SocketAddr,
    stream: TcpStream,
    ctl_tx: &mpsc::Sender<Control>,
    backoff: &mut Duration,
) -> Result<Session, HelloError> {
    let (mut reader, mut writer) = stream.into_split();
    let mut hello = Vec::new();
    let msg = Message::Hello {
        role: Role::Computed,
        node_id: 0,
        protocol_version: u16::from(PROTOCOL_VERSION),
    };
    encode_frame(0, &msg, &mut hello).map_err(std::io::Error::other)?;
    writer.write_all(&hello).await?;
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        decoder.push(&chunk[..n]);
        match decoder.next() {
            Ok(Some(Frame {
                message: Message::HelloOk { node_id, .. },
                ..
            })) => {
                storaged::client::check_node_identity(addr, node, node_id).map_err(HelloError::WrongNode)?;
                break;
            }
            Ok(Some(f)) => {
                return Err(std::io::Error::other(format!("unexpected reply to Hello: {:?}", f.message)).into());
            }
            Ok(None) => continue,
            Err(e) => return Err(std::io::Error::other(e).into()),
        }
    }
    *backoff = BACKOFF_MIN;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(NODE_FRAMES_QUEUED_MAX);
    if ctl_tx.send(Control::NodeUp { node, tx }).await.is_err() {
        return Err(std::io::Error::other("computed is stopping").into());
    }
    let ctl = ctl_tx.clone();
    // The rest of the session is not bounded by the Hello timeout.
    let session = tokio::spawn(async move {
        let write = async move {
            let mut out = Vec::new();
            while let Some(f) = rx.recv().await {
                out.clear();
                out.extend_from_slice(&f);
                while out.len() < WRITE_BATCH_BYTES_MAX {
                    match rx.try_recv() {
                        Ok(f) => out.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                writer.write_all(&out).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let read = async move {
            loop {
                loop {
                    match decoder.next() {
                        Ok(Some(f)) => {
                            let c = Control::Reply {
                                node,
                                request: f.request_id,
                                message: Box::new(f.message),
                            };
                            if ctl.send(c).await.is_err() {
                                return Ok(());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Err(std::io::Error::other(e)),
                    }
                }
                let n = reader.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                decoder.push(&chunk[..n]);
            }
        };
        // Either direction ending ends the session.
        tokio::select! {
            r = write => r,
            r = read => r,
        }
    });
    Ok(session)
}
