//! The node's network shell: accept connections, decode frames, hand each
//! request to the [`Node`], write the replies. No protocol logic lives here.
//!
//! One task per connection reads, decodes, polls that connection's requests
//! and writes their replies; a wake-up that finds several replies ready
//! sends them in one write.
//!
//! Bounds: at most `connections_max` connections are served at once; each
//! has at most `requests_per_connection_max` requests in flight, and its
//! socket is not read while that many are, nor while more than
//! `REPLY_BYTES_QUEUED_MAX` of replies wait for a slow reader (TCP then
//! pushes back on the client). A bad frame gets an `Error` reply and the
//! connection is closed; other connections are not affected.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::proto::{
    ErrorCode, FRAME_BYTES_MAX, FrameDecoder, Message, PROTOCOL_VERSION, Role, encode_frame, fit_status_for_wire,
};
use crate::record::SegmentId;

use super::{Node, NodeError, PageGeometry, SegmentStatus};

/// Reply bytes a connection holds for a peer that does not read them
/// before it stops reading that peer's requests. Requests already in
/// flight still add theirs: at most `requests_per_connection_max` more.
const REPLY_BYTES_QUEUED_MAX: usize = 256 * 1024;
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Bind `addr` with the socket options a storage node wants.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Serve until `shutdown` turns true; then stop accepting, let requests in
/// flight finish, and return.
pub async fn serve(node: Arc<Node>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let connections = Arc::new(Semaphore::new(node.config().connections_max));
    let mut tasks = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let node = node.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(node, stream, shutdown).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

async fn connection(node: Arc<Node>, stream: TcpStream, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let node: &Node = &node;
    let requests_max = node.config().requests_per_connection_max;
    // The connection's requests are polled here, in its own task, rather
    // than spawned: no task (a large allocation) per request, no hand-off
    // of each reply to a writer task, and every reply that became ready in
    // one wake-up leaves in one write.
    let mut requests = FuturesUnordered::new();
    let mut out = ReplyBuf::default();
    let mut decoder = FrameDecoder::new(node.config().frame_bytes_max);
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    // Who the peer said it is in its Hello: gossip requests are answered
    // only for a storage node, and for the node id it gave.
    let mut greeted: Option<Peer> = None;
    let mut reading = true;
    // Whole frames may wait in the decoder: it is not fed more until they
    // are taken, so it holds at most one read's worth.
    let mut frames_waiting = false;
    let mut result = Ok(());
    loop {
        // Backpressure: no request is started while `requests_max` are in
        // flight, and the socket is not read while frames wait or replies
        // are not being read; TCP then pushes back on the client.
        while frames_waiting && reading && requests.len() < requests_max {
            let frame = match decoder.next() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    frames_waiting = false;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame; closing the connection");
                    out.push(0, &Message::error(e.error_code(), 0, e.to_string()));
                    reading = false;
                    break;
                }
            };
            let id = frame.request_id;
            let Some(peer) = greeted else {
                let Message::Hello { role, node_id, .. } = frame.message else {
                    let msg = Message::error(ErrorCode::BadRequest, 0, "the first message must be Hello");
                    out.push(id, &msg);
                    reading = false;
                    break;
                };
                greeted = Some(Peer { role, node_id });
                let ok = Message::HelloOk {
                    node_id: node.node_id,
                    protocol_version: u16::from(PROTOCOL_VERSION),
                };
                out.push(id, &ok);
                continue;
            };
            requests.push(request(node, peer, id, frame.message));
        }
        // Replies out first: the peer waits on them, and a full buffer stops reading.
        if !out.is_empty()
            && let Err(e) = out.write_some(&stream)
        {
            result = Err(e);
            break;
        }
        if !reading && requests.is_empty() && out.is_empty() {
            break;
        }
        let take_more = reading && !frames_waiting && out.pending_bytes() < REPLY_BYTES_QUEUED_MAX;
        tokio::select! {
            biased;
            Some((id, answer)) = requests.next(), if !requests.is_empty() => {
                out.push(id, &answer);
                // Everything else already finished goes in the same write.
                while let Some(Some((id, answer))) = requests.next().now_or_never() {
                    out.push(id, &answer);
                }
            }
            ready = stream.writable(), if !out.is_empty() => {
                if let Err(e) = ready {
                    result = Err(e);
                    break;
                }
            }
            ready = stream.readable(), if take_more => {
                if let Err(e) = ready {
                    result = Err(e);
                    break;
                }
                match stream.try_read(&mut buf) {
                    Ok(0) => reading = false,
                    Ok(n) => {
                        decoder.push(&buf[..n]);
                        frames_waiting = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            _ = shutdown.changed(), if reading => reading = false,
        }
    }
    // Let requests in flight finish (their effects stand); their replies go
    // out if the peer still reads.
    while requests.next().await.is_some() {}
    result?;
    let mut stream = stream;
    stream.shutdown().await
}

/// Replies encoded and not yet written, in the order they finished.
#[derive(Default)]
struct ReplyBuf {
    bytes: Vec<u8>,
    /// Bytes at the front of `bytes` already written.
    written: usize,
}

impl ReplyBuf {
    fn is_empty(&self) -> bool {
        self.written == self.bytes.len()
    }

    fn pending_bytes(&self) -> usize {
        self.bytes.len() - self.written
    }

    fn push(&mut self, request_id: u64, msg: &Message) {
        if let Err(e) = encode_frame(request_id, msg, &mut self.bytes) {
            // Our own replies are always encodable; if not, say so rather
            // than send nothing. `encode_frame` left `bytes` as it was.
            let fallback = Message::error(ErrorCode::Internal, 0, format!("reply could not be encoded: {e}"));
            let _ = encode_frame(request_id, &fallback, &mut self.bytes);
        }
    }

    /// Write what the socket takes now, without waiting.
    fn write_some(&mut self, stream: &TcpStream) -> std::io::Result<()> {
        while !self.is_empty() {
            match stream.try_write(&self.bytes[self.written..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.is_empty() {
            self.bytes.clear();
            self.written = 0;
        }
        Ok(())
    }
}

/// A request in flight: its id and, once done, its reply.
///
/// `map`, not an `async` block around `handle`: such a block holds the
/// message a second time beside the future that owns it, and the request's
/// allocation (its task in `requests`) then passes 1 KiB, where glibc's
/// malloc leaves its per-thread cache for the large-request path, which
/// consolidates its free lists first: most of the node's malloc time at 32
/// appenders (docs/performance.md).
fn request(node: &Node, peer: Peer, id: u64, msg: Message) -> impl Future<Output = (u64, Message)> + '_ {
    handle(node, peer, msg).map(move |answer| (id, answer))
}

/// The connection's `Hello`: who asks.
#[derive(Debug, Clone, Copy)]
struct Peer {
    role: Role,
    node_id: u64,
}

impl Peer {
    /// Gossip requests come from storage nodes only: the node id a
    /// membership names is a storage node's, and the writer and operators
    /// have their own requests for what they need.
    fn storage_node(&self, what: &str) -> Result<u64, String> {
        if self.role == Role::StorageNode {
            return Ok(self.node_id);
        }
        Err(format!(
            "{what} is a storage node's request; this connection's Hello said {:?}",
            self.role
        ))
    }

    /// Scrub requests come from operators (`storctl`): a priority pass
    /// costs the node read bandwidth, which neither the writer nor a peer
    /// has reason to spend.
    fn operator(&self, what: &str) -> Result<(), String> {
        if self.role == Role::Operator {
            return Ok(());
        }
        Err(format!(
            "{what} is an operator's request; this connection's Hello said {:?}",
            self.role
        ))
    }
}

/// A writer's request names the PG's membership epoch as the writer has
/// it: one below the segment's is from a writer behind a membership change
/// (refused, with the segment's epoch, as a stale volume epoch is). One
/// above it is from a writer that has not told this segment yet; 0 is not
/// checked.
fn check_membership_epoch(node: &Node, id: SegmentId, got: u64) -> Result<(), NodeError> {
    if got == 0 {
        return Ok(());
    }
    let st = node.state();
    match st.segments.get(&id).and_then(|s| s.membership.as_ref()) {
        Some(held) if held.epoch > got => Err(NodeError::StaleMembership {
            got,
            current: held.epoch,
        }),
        _ => Ok(()),
    }
}

/// An append names a membership epoch above the segment's: the writer has
/// not told this segment yet. Taken only when the step is the next one
/// with this node already a member (`Membership::rejoins` can then not
/// hold of it); otherwise refused (`StaleMembership`, with the lower
/// epoch the segment holds) until the telling is taken. The telling may
/// make the node drop what it holds, having rejoined the PG
/// (`Node::forget_before_rejoining`); records it acknowledged to this
/// writer before would go with it, and the writer counts them.
fn check_append_membership(node: &Node, id: SegmentId, got: u64) -> Result<(), NodeError> {
    if got == 0 {
        return Ok(());
    }
    let st = node.state();
    let held = st.segments.get(&id).and_then(|s| s.membership.as_ref());
    match held {
        Some(h) if h.epoch == got || (h.epoch + 1 == got && h.is_member(node.node_id)) => Ok(()),
        // Above: the writer is behind (as `check_membership_epoch`).
        _ => Err(NodeError::StaleMembership {
            got,
            current: held.map_or(0, |h| h.epoch),
        }),
    }
}

async fn handle(node: &Node, peer: Peer, msg: Message) -> Message {
    let result = match msg {
        Message::Append {
            volume,
            epoch,
            pg,
            page_bytes,
            pg_pages,
            membership_epoch,
            records,
        } => {
            let started = std::time::Instant::now();
            let id = SegmentId { volume, pg };
            let result = match check_append_membership(node, id, membership_epoch) {
                Ok(()) => {
                    node.append(id, epoch, PageGeometry { page_bytes, pg_pages }, records)
                        .await
                }
                Err(e) => Err(e),
            };
            node.record_foreground(started.elapsed().as_micros() as u64);
            result.map(|scl| Message::AppendAck {
                volume,
                pg,
                scl,
                incarnation: node.incarnation,
            })
        }
        Message::GetSegmentStatus { volume, epoch, pg } => node
            .status(SegmentId { volume, pg }, epoch)
            .map(|s| status_reply(node, volume, pg, s)),
        Message::Seal {
            volume,
            epoch,
            pg,
            page_bytes,
            pg_pages,
        } => node
            .seal(SegmentId { volume, pg }, epoch, PageGeometry { page_bytes, pg_pages })
            .await
            .map(|s| status_reply(node, volume, pg, s)),
        Message::Truncate {
            volume,
            epoch,
            pg,
            ranges,
        } => node
            .truncate(SegmentId { volume, pg }, epoch, ranges)
            .await
            .map(|s| status_reply(node, volume, pg, s)),
        Message::ReadRecords {
            volume,
            epoch,
            pg,
            after,
            max_bytes,
        } => {
            // Leave room in the frame for the reply's own fields.
            let max = (max_bytes as usize).min(FRAME_BYTES_MAX / 2);
            node.read_records(SegmentId { volume, pg }, epoch, after, max)
                .map(|(scl, records)| Message::Records {
                    volume,
                    pg,
                    scl,
                    records,
                })
        }
        Message::SetPgmrpl { volume, epoch, pg, lsn } => node
            .set_pgmrpl(SegmentId { volume, pg }, epoch, lsn)
            .await
            .map(|pgmrpl| Message::PgmrplOk { volume, pg, pgmrpl }),
        Message::GetPage {
            volume,
            epoch,
            pg,
            page,
            read_point,
            membership_epoch,
        } => match check_membership_epoch(node, SegmentId { volume, pg }, membership_epoch) {
            Ok(()) => node.get_page(SegmentId { volume, pg }, epoch, page, read_point).await,
            Err(e) => Err(e),
        }
        .map(|(bytes, lsn)| Message::Page {
            volume,
            pg,
            page,
            lsn,
            bytes,
        }),
        Message::SetMembership {
            volume,
            epoch,
            pg,
            page_bytes,
            pg_pages,
            membership,
            annulled,
        } => node
            .set_membership_with_ranges(
                SegmentId { volume, pg },
                epoch,
                PageGeometry { page_bytes, pg_pages },
                membership,
                annulled,
            )
            .await
            .map(|s| status_reply(node, volume, pg, s)),
        Message::Digest { volume, pg, digest } => {
            let from = match peer.storage_node("Digest") {
                Ok(from) => from,
                Err(why) => return Message::error(ErrorCode::BadRequest, 0, why),
            };
            node.peer_digest(SegmentId { volume, pg }, from, digest)
                .map(|digest| Message::DigestOk { volume, pg, digest })
        }
        Message::PullRecords {
            volume,
            pg,
            installed_epoch,
            membership_epoch,
            after,
            max_bytes,
        } => {
            let from = match peer.storage_node("PullRecords") {
                Ok(from) => from,
                Err(why) => return Message::error(ErrorCode::BadRequest, 0, why),
            };
            // Leave room in the frame for the reply's own fields.
            let max = (max_bytes as usize).min(FRAME_BYTES_MAX / 2);
            node.pull_records(
                SegmentId { volume, pg },
                from,
                installed_epoch,
                membership_epoch,
                after,
                max,
            )
            .map(|(scl, records)| Message::Records {
                volume,
                pg,
                scl,
                records,
            })
        }
        Message::GetPageVersions {
            volume,
            pg,
            installed_epoch,
            membership_epoch,
            first_page,
            max_bytes,
            changed_after,
        } => {
            let from = match peer.storage_node("GetPageVersions") {
                Ok(from) => from,
                Err(why) => return Message::error(ErrorCode::BadRequest, 0, why),
            };
            // Leave room in the frame for the reply's own fields.
            let max = (max_bytes as usize).min(FRAME_BYTES_MAX / 2);
            node.page_versions_changed_after(
                SegmentId { volume, pg },
                from,
                installed_epoch,
                membership_epoch,
                first_page,
                max,
                changed_after,
            )
            .await
            .map(|(floor, next_page, versions)| Message::PageVersions {
                volume,
                pg,
                floor,
                next_page,
                versions,
            })
        }
        Message::Scrub { filter } => {
            if let Err(why) = peer.operator("Scrub") {
                return Message::error(ErrorCode::BadRequest, 0, why);
            }
            node.scrub_request(filter).map(|pass| Message::ScrubStarted { pass })
        }
        Message::FillGaps { volume, pg } => {
            if let Err(why) = peer.operator("FillGaps") {
                return Message::error(ErrorCode::BadRequest, 0, why);
            }
            node.fill_gaps(SegmentId { volume, pg })
                .map(|()| Message::FillGapsOk { volume, pg })
        }
        Message::NodeStatus => {
            if let Err(why) = peer.operator("NodeStatus") {
                return Message::error(ErrorCode::BadRequest, 0, why);
            }
            Ok(Message::NodeStatusOk {
                status: node.node_status().await,
            })
        }
        Message::ScrubStatus => {
            if let Err(why) = peer.operator("ScrubStatus") {
                return Message::error(ErrorCode::BadRequest, 0, why);
            }
            let mut status = node.scrub_status();
            fit_status_for_wire(&mut status);
            Ok(Message::ScrubStatusOk { status })
        }
        Message::GetPageAt {
            volume,
            pg,
            installed_epoch,
            membership_epoch,
            page,
            lsn,
        } => {
            let from = match peer.storage_node("GetPageAt") {
                Ok(from) => from,
                Err(why) => return Message::error(ErrorCode::BadRequest, 0, why),
            };
            let id = SegmentId { volume, pg };
            // The gate of PullRecords: a member, at the same membership
            // epoch and the same installed volume epoch (so both segments
            // hold the same truncation ranges and the same page at `lsn`).
            match node.check_gossip_peer(id, from, installed_epoch, membership_epoch, true) {
                Ok(()) => node
                    .page_at_exact(id, installed_epoch, membership_epoch, page, lsn)
                    .await
                    .map(|bytes| Message::PageAt {
                        volume,
                        pg,
                        page,
                        lsn,
                        bytes,
                    }),
                Err(e) => Err(e),
            }
        }
        Message::Hello { .. } => {
            return Message::error(ErrorCode::BadRequest, 0, "Hello was already received");
        }
        other => {
            return Message::error(ErrorCode::BadRequest, 0, format!("{:?} is not a request", other.kind()));
        }
    };
    result.unwrap_or_else(|e| error_reply(&e))
}

fn status_reply(node: &Node, volume: u64, pg: u32, s: SegmentStatus) -> Message {
    Message::SegmentStatus {
        volume,
        pg,
        epoch: s.epoch,
        scl: s.scl,
        highest_lsn: s.highest_lsn,
        lowest_lsn: s.lowest_lsn,
        pgmrpl: s.pgmrpl,
        records: s.records,
        log_bytes: s.log_bytes,
        page_store_bytes: s.page_store_bytes,
        installed_epoch: s.installed_epoch,
        incarnation: node.incarnation,
        annulled: s.annulled,
        holes: s.holes,
        damage: s.damage,
        membership: s.membership,
        hydration: s.hydration,
    }
}

fn error_reply(e: &NodeError) -> Message {
    let (code, epoch) = e.wire_code();
    Message::error(code, epoch, e.to_string())
}
