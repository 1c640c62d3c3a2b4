//! The node's network shell: accept connections, decode frames, hand each
//! request to the [`Node`], write the replies. No protocol logic lives here.
//!
//! Bounds: at most `connections_max` connections are served at once; each
//! has at most `requests_per_connection_max` requests in flight, and its
//! socket is not read while that many are (TCP then pushes back on the
//! client), and replies wait in a bounded queue for a slow reader. A bad
//! frame gets an `Error` reply and the connection is closed; other
//! connections are not affected.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::proto::{ErrorCode, FrameDecoder, Message, PROTOCOL_VERSION, encode_frame};
use crate::record::SegmentId;

use super::{Node, NodeError, PageGeometry};

/// Replies queued for a connection's writer, at most.
const REPLIES_QUEUED_MAX: usize = 256;
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Replies coalesced into one socket write, at most (bytes).
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

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
    let (mut reader, mut writer) = stream.into_split();
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(REPLIES_QUEUED_MAX);
    let write_task = tokio::spawn(async move {
        // One write for every reply already queued: a syscall per reply
        // would cost more than the replies themselves under load.
        let mut out = Vec::new();
        while let Some(frame) = reply_rx.recv().await {
            out.clear();
            out.extend_from_slice(&frame);
            while out.len() < WRITE_BATCH_BYTES_MAX {
                match reply_rx.try_recv() {
                    Ok(more) => out.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            writer.write_all(&out).await?;
        }
        writer.shutdown().await
    });
    let inflight = Arc::new(Semaphore::new(node.config().requests_per_connection_max));
    let mut decoder = FrameDecoder::new(node.config().frame_bytes_max);
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut greeted = false;
    'read: loop {
        let n = tokio::select! {
            n = reader.read(&mut buf) => n?,
            _ = shutdown.changed() => break 'read,
        };
        if n == 0 {
            break;
        }
        decoder.push(&buf[..n]);
        loop {
            let frame = match decoder.next() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame; closing the connection");
                    let _ = reply_tx
                        .send(reply(0, &Message::error(e.error_code(), 0, e.to_string())))
                        .await;
                    break 'read;
                }
            };
            let id = frame.request_id;
            if !greeted {
                let Message::Hello { .. } = frame.message else {
                    let msg = Message::error(ErrorCode::BadRequest, 0, "the first message must be Hello");
                    let _ = reply_tx.send(reply(id, &msg)).await;
                    break 'read;
                };
                greeted = true;
                let ok = Message::HelloOk {
                    node_id: node.node_id,
                    protocol_version: u16::from(PROTOCOL_VERSION),
                };
                if reply_tx.send(reply(id, &ok)).await.is_err() {
                    break 'read;
                }
                continue;
            }
            // Backpressure: no more requests from this connection until one finishes.
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break 'read;
            };
            let node = node.clone();
            let reply_tx = reply_tx.clone();
            tokio::spawn(async move {
                let answer = handle(&node, frame.message).await;
                let _ = reply_tx.send(reply(id, &answer)).await;
                drop(permit);
            });
        }
    }
    // Let requests in flight finish and their replies go out.
    let _ = inflight
        .acquire_many(node.config().requests_per_connection_max as u32)
        .await;
    drop(reply_tx);
    write_task.await.unwrap_or(Ok(()))
}

fn reply(request_id: u64, msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = encode_frame(request_id, msg, &mut out) {
        // Our own replies are always encodable; if not, say so rather than send nothing.
        out.clear();
        let fallback = Message::error(ErrorCode::Internal, 0, format!("reply could not be encoded: {e}"));
        let _ = encode_frame(request_id, &fallback, &mut out);
    }
    out
}

async fn handle(node: &Node, msg: Message) -> Message {
    let result = match msg {
        Message::Append {
            volume,
            epoch,
            pg,
            page_bytes,
            pg_pages,
            records,
        } => node
            .append(
                SegmentId { volume, pg },
                epoch,
                PageGeometry { page_bytes, pg_pages },
                records,
            )
            .await
            .map(|scl| Message::AppendAck { volume, pg, scl }),
        Message::GetSegmentStatus { volume, epoch, pg } => {
            node.status(SegmentId { volume, pg }, epoch)
                .map(|s| Message::SegmentStatus {
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
        } => node
            .get_page(SegmentId { volume, pg }, epoch, page, read_point)
            .await
            .map(|(bytes, lsn)| Message::Page {
                volume,
                pg,
                page,
                lsn,
                bytes,
            }),
        Message::Hello { .. } => {
            return Message::error(ErrorCode::BadRequest, 0, "Hello was already received");
        }
        other => {
            return Message::error(ErrorCode::BadRequest, 0, format!("{:?} is not a request", other.kind()));
        }
    };
    result.unwrap_or_else(|e| error_reply(&e))
}

fn error_reply(e: &NodeError) -> Message {
    let (code, epoch) = e.wire_code();
    Message::error(code, epoch, e.to_string())
}
