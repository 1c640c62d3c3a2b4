//! A client of a storage node: one connection, many requests in flight,
//! replies matched by request id (they may come back in any order). Used by
//! computed, storctl and tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::proto::{
    ErrorCode, FRAME_BYTES_MAX, Message, MessageType, NodeStatus, PROTOCOL_VERSION, ProtoError, Role, decode_frame,
    encode_frame,
};
use crate::record::SegmentId;
use crate::scrub;

/// Requests queued for the writer, at most; callers wait beyond.
const QUEUED_MAX: usize = 1024;
/// Requests coalesced into one socket write, at most (bytes).
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
const READ_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The OS error is in the message and deliberately not a `source`: an
    // `{:#}` chain would print it twice.
    #[error("connecting to {addr}: {error}")]
    Connect { addr: SocketAddr, error: std::io::Error },
    #[error("the connection is closed")]
    Closed,
    #[error("cannot encode the request: {0}")]
    Encode(ProtoError),
    #[error("unexpected reply to Hello: {0:?}")]
    Handshake(Box<Message>),
    #[error(
        "the storage node at {addr} is node {found}, but the cluster file gives that address to node \
         {expected}; refusing it (are two nodes' address lines swapped, or a device moved to another node?)"
    )]
    WrongNode {
        addr: SocketAddr,
        expected: u64,
        found: u64,
    },
    /// The node answered the request with an `Error`.
    #[error("{message} ({code:?})")]
    Refused {
        code: ErrorCode,
        /// The node's epoch for `StaleEpoch`, its membership epoch for
        /// `StaleMembership`, else 0.
        current_epoch: u64,
        message: String,
    },
    #[error("the node answered {asked:?} with {got:?}")]
    Unexpected { asked: MessageType, got: MessageType },
}

/// The one check every peer of a storage node makes of its `HelloOk`: the
/// node at `addr` must be the node the cluster file puts there. A node is
/// its device (the id is written by `storaged format`), so a swapped
/// address line or a device moved to another host would otherwise send a
/// PG's records to a node that is not one of its segments, and count its
/// acks towards the wrong quorum.
pub fn check_node_identity(addr: SocketAddr, expected: u64, found: u64) -> Result<(), ClientError> {
    if found == expected {
        Ok(())
    } else {
        Err(ClientError::WrongNode { addr, expected, found })
    }
}

/// Replies awaited, by request id; `None` once the connection is gone, so a
/// request that reaches the writer after the reader has stopped is dropped
/// (its caller gets `Closed`) instead of waiting for a reply that cannot come.
type Pending<M> = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<M>>>>>;

/// Remember that `id` awaits `reply`; false (and `reply` dropped: its caller
/// learns the connection is closed) once the reader has stopped.
fn await_reply<M>(pending: &Pending<M>, id: u64, reply: oneshot::Sender<M>) -> bool {
    match pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        Some(map) => {
            map.insert(id, reply);
            true
        }
        None => false,
    }
}

/// Decodes one reply from the front of a buffer: `Ok(None)` until a whole
/// frame is there, else its request id, message and size. An error ends
/// the connection (the stream is out of step).
pub type DecodeReply<M> = fn(&[u8]) -> Result<Option<(u64, M, usize)>, String>;

/// One connection with many requests in flight, replies matched by request
/// id: the machinery of [`NodeClient`] and of computed's client, whose
/// protocols share the frame envelope. Usable from many tasks (`&self`).
pub struct Pipeline<M> {
    tx: mpsc::Sender<(u64, Vec<u8>, oneshot::Sender<M>)>,
    next_id: AtomicU64,
}

impl<M: Send + 'static> Pipeline<M> {
    /// Start the connection's writer and reader tasks on `stream`.
    pub fn start(stream: TcpStream, decode: DecodeReply<M>) -> Pipeline<M> {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let pending: Pending<M> = Arc::new(Mutex::new(Some(HashMap::new())));
        let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>, oneshot::Sender<M>)>(QUEUED_MAX);
        let p = pending.clone();
        tokio::spawn(async move {
            // Requests queued together go out in one write.
            let mut out = Vec::new();
            while let Some((id, frame, reply)) = rx.recv().await {
                out.clear();
                if !await_reply(&p, id, reply) {
                    break;
                }
                out.extend_from_slice(&frame);
                while out.len() < WRITE_BATCH_BYTES_MAX {
                    match rx.try_recv() {
                        Ok((id, frame, reply)) => {
                            if !await_reply(&p, id, reply) {
                                break;
                            }
                            out.extend_from_slice(&frame);
                        }
                        Err(_) => break,
                    }
                }
                if writer.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
        let p = pending;
        tokio::spawn(async move {
            // Bounded by the decoder: a declared length over its maximum
            // is an error as soon as the length field is in.
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; READ_CHUNK_BYTES];
            'read: loop {
                let n = match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                let mut used = 0;
                loop {
                    match decode(&buf[used..]) {
                        Ok(Some((id, msg, len))) => {
                            used += len;
                            let waiter = p
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .as_mut()
                                .and_then(|m| m.remove(&id));
                            if let Some(w) = waiter {
                                let _ = w.send(msg);
                            }
                        }
                        Ok(None) => break,
                        Err(_) => break 'read,
                    }
                }
                buf.drain(..used);
            }
            // Everyone still waiting, and every later request, learns the
            // connection is gone.
            p.lock().unwrap_or_else(|e| e.into_inner()).take();
        });
        Pipeline {
            tx,
            next_id: AtomicU64::new(1),
        }
    }

    /// A request id not used before on this connection.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Send `frame` (a request encoded with id `id`) and wait for its reply;
    /// `None` if the connection is gone.
    pub async fn call(&self, id: u64, frame: Vec<u8>) -> Option<M> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx.send((id, frame, reply_tx)).await.ok()?;
        reply_rx.await.ok()
    }
}

pub struct NodeClient {
    pipeline: Pipeline<Message>,
    /// The node's id, from its HelloOk.
    pub node_id: u64,
}

fn decode_reply(buf: &[u8]) -> Result<Option<(u64, Message, usize)>, String> {
    decode_frame(buf, FRAME_BYTES_MAX)
        .map(|f| f.map(|(frame, len)| (frame.request_id, frame.message, len)))
        .map_err(|e| e.to_string())
}

impl NodeClient {
    /// Connect to the node the cluster file names `expected` at `addr`,
    /// and refuse it ([`ClientError::WrongNode`]) if it says it is another
    /// (see [`check_node_identity`]).
    pub async fn connect_to_node(
        addr: SocketAddr,
        role: Role,
        my_node_id: u64,
        expected: u64,
    ) -> Result<NodeClient, ClientError> {
        let client = NodeClient::connect(addr, role, my_node_id).await?;
        check_node_identity(addr, expected, client.node_id)?;
        Ok(client)
    }

    /// Connect to whatever node listens at `addr` (its id is in `node_id`):
    /// for tools that talk to one node, not to a cluster file's.
    pub async fn connect(addr: SocketAddr, role: Role, my_node_id: u64) -> Result<NodeClient, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|error| ClientError::Connect { addr, error })?;
        let mut client = NodeClient {
            pipeline: Pipeline::start(stream, decode_reply),
            node_id: 0,
        };
        let hello = Message::Hello {
            role,
            node_id: my_node_id,
            protocol_version: u16::from(PROTOCOL_VERSION),
        };
        match client.request(hello).await? {
            Message::HelloOk { node_id, .. } => client.node_id = node_id,
            other => return Err(ClientError::Handshake(Box::new(other))),
        }
        Ok(client)
    }

    /// Send a request and wait for its reply (an `Error` reply is a reply).
    pub async fn request(&self, msg: Message) -> Result<Message, ClientError> {
        let id = self.pipeline.next_id();
        let mut frame = Vec::new();
        encode_frame(id, &msg, &mut frame).map_err(ClientError::Encode)?;
        self.pipeline.call(id, frame).await.ok_or(ClientError::Closed)
    }

    /// Ask for a priority scrub pass over the segments `filter` names (the
    /// log always); the number of the pass, whose report `scrub_status`
    /// gives once it completed. Needs a connection opened as an operator.
    pub async fn scrub(&self, filter: scrub::Filter) -> Result<u64, ClientError> {
        match self.request(Message::Scrub { filter }).await? {
            Message::ScrubStarted { pass } => Ok(pass),
            other => Err(refused_or_unexpected(MessageType::Scrub, other)),
        }
    }

    /// How the node's scrubbing stands: the pass under way, the last one
    /// completed, the totals. Needs a connection opened as an operator.
    pub async fn scrub_status(&self) -> Result<scrub::Status, ClientError> {
        match self.request(Message::ScrubStatus).await? {
            Message::ScrubStatusOk { status } => Ok(status),
            other => Err(refused_or_unexpected(MessageType::ScrubStatus, other)),
        }
    }

    /// Ask the node to fill segment `id`'s gaps from its peers now, rather
    /// than at its next gossip round. Needs a connection opened as an
    /// operator. `Refused { code: UnknownSegment, .. }`: the node holds no
    /// segment of the PG with a membership.
    pub async fn fill_gaps(&self, id: SegmentId) -> Result<(), ClientError> {
        let msg = Message::FillGaps {
            volume: id.volume,
            pg: id.pg,
        };
        match self.request(msg).await? {
            Message::FillGapsOk { .. } => Ok(()),
            other => Err(refused_or_unexpected(MessageType::FillGaps, other)),
        }
    }

    /// How the node's device stands as a whole: its page store's room for
    /// new segments, and its log. Needs a connection opened as an operator.
    pub async fn node_status(&self) -> Result<NodeStatus, ClientError> {
        match self.request(Message::NodeStatus).await? {
            Message::NodeStatusOk { status } => Ok(status),
            other => Err(refused_or_unexpected(MessageType::NodeStatus, other)),
        }
    }

    /// Page `page` of segment `id` exactly as of `lsn`, from a peer that
    /// holds it at the same epochs (`installed_epoch`, `membership_epoch`).
    /// Needs a connection opened as a storage node, whose id is a member.
    /// `Refused { code: NotHeld, .. }`: that node cannot build it; ask another.
    pub async fn get_page_at(
        &self,
        id: SegmentId,
        installed_epoch: u64,
        membership_epoch: u64,
        page: u64,
        lsn: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let req = Message::GetPageAt {
            volume: id.volume,
            pg: id.pg,
            installed_epoch,
            membership_epoch,
            page,
            lsn,
        };
        match self.request(req).await? {
            // The page asked for, not another one a confused peer sent.
            Message::PageAt {
                volume,
                pg,
                page: p,
                lsn: l,
                bytes,
            } if volume == id.volume && pg == id.pg && p == page && l == lsn => Ok(bytes),
            other => Err(refused_or_unexpected(MessageType::GetPageAt, other)),
        }
    }
}

/// Connecting to a peer for a page copy, at most.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One page copy from a peer, at most: the scrubber then tries another.
const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Page copies for the scrubber ([`scrub::Peers`]): `GetPageAt` to the
/// segment's peers as storage node `me`, one connection per peer, opened
/// when first needed and dropped when it fails (the next request opens a
/// new one). A peer whose `Hello` names another node than the membership
/// puts at its address is refused, as gossip refuses it.
pub struct PagePeers {
    me: u64,
    /// By node and address: a membership that moves a node to another
    /// address gets a connection to the new one.
    clients: Mutex<HashMap<scrub::Peer, Arc<NodeClient>>>,
}

impl PagePeers {
    pub fn new(me: u64) -> PagePeers {
        PagePeers {
            me,
            clients: Mutex::new(HashMap::new()),
        }
    }

    async fn client(&self, (peer, addr): scrub::Peer) -> Result<Arc<NodeClient>, String> {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(peer, addr))
        {
            return Ok(c.clone());
        }
        let connect = NodeClient::connect_to_node(addr, Role::StorageNode, self.me, peer);
        let client = match tokio::time::timeout(PEER_CONNECT_TIMEOUT, connect).await {
            Ok(c) => Arc::new(c.map_err(|e| e.to_string())?),
            Err(_) => {
                return Err(format!(
                    "node {peer} at {addr}: no answer within {PEER_CONNECT_TIMEOUT:?}"
                ));
            }
        };
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((peer, addr), client.clone());
        Ok(client)
    }

    fn drop_client(&self, peer: scrub::Peer) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer);
    }
}

impl scrub::Peers for PagePeers {
    async fn page_at(
        &self,
        peer: scrub::Peer,
        id: SegmentId,
        (installed_epoch, membership_epoch): (u64, u64),
        page: u64,
        lsn: u64,
    ) -> Result<Vec<u8>, String> {
        let client = self.client(peer).await?;
        let ask = client.get_page_at(id, installed_epoch, membership_epoch, page, lsn);
        match tokio::time::timeout(PEER_REQUEST_TIMEOUT, ask).await {
            Ok(Ok(bytes)) => Ok(bytes),
            // The peer answered: the connection is sound.
            Ok(Err(e @ ClientError::Refused { .. })) => Err(format!("node {}: {e}", peer.0)),
            Ok(Err(e)) => {
                self.drop_client(peer);
                Err(format!("node {}: {e}", peer.0))
            }
            Err(_) => {
                self.drop_client(peer);
                Err(format!("node {}: no answer within {PEER_REQUEST_TIMEOUT:?}", peer.0))
            }
        }
    }
}

/// An `Error` reply as [`ClientError::Refused`], anything else as unexpected.
fn refused_or_unexpected(asked: MessageType, reply: Message) -> ClientError {
    match reply {
        Message::Error {
            code,
            current_epoch,
            message,
        } => ClientError::Refused {
            code,
            current_epoch,
            message,
        },
        other => ClientError::Unexpected {
            asked,
            got: other.kind(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A fake node 7: answers Hello, then closes the connection.
    async fn node_7() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                let hello = loop {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    if let Some((frame, _)) = decode_frame(&got, FRAME_BYTES_MAX).unwrap() {
                        break frame;
                    }
                };
                let mut out = Vec::new();
                let ok = Message::HelloOk {
                    node_id: 7,
                    protocol_version: u16::from(PROTOCOL_VERSION),
                };
                encode_frame(hello.request_id, &ok, &mut out).unwrap();
                s.write_all(&out).await.unwrap();
                drop(s);
            }
        });
        addr
    }

    #[test]
    fn a_node_is_the_one_the_cluster_file_puts_at_its_address() {
        let addr: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        assert!(check_node_identity(addr, 1, 1).is_ok());
        let e = check_node_identity(addr, 1, 2).unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::WrongNode {
                    expected: 1,
                    found: 2,
                    ..
                }
            ),
            "{e:?}"
        );
        // The message names both ids and the address.
        let text = e.to_string();
        assert!(
            text.contains("127.0.0.1:7001") && text.contains("is node 2") && text.contains("to node 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn connect_to_node_refuses_another_node() {
        let addr = node_7().await;
        let e = NodeClient::connect_to_node(addr, Role::Operator, 0, 3)
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(
                e,
                ClientError::WrongNode {
                    expected: 3,
                    found: 7,
                    ..
                }
            ),
            "{e:?}"
        );
        let c = NodeClient::connect_to_node(addr, Role::Operator, 0, 7).await.unwrap();
        assert_eq!(c.node_id, 7);
    }

    /// A node that answers Hello and then closes the connection: every later
    /// request must fail with `Closed`, never wait forever.
    #[tokio::test]
    async fn requests_after_the_node_is_gone_fail_instead_of_hanging() {
        let addr = node_7().await;
        for _ in 0..20 {
            let c = NodeClient::connect(addr, Role::Computed, 0).await.unwrap();
            assert_eq!(c.node_id, 7);
            for _ in 0..5 {
                let status = Message::GetSegmentStatus {
                    volume: 1,
                    epoch: 0,
                    pg: 0,
                };
                let r = tokio::time::timeout(std::time::Duration::from_secs(10), c.request(status)).await;
                assert!(matches!(r, Ok(Err(ClientError::Closed))), "{r:?}");
            }
        }
    }

    /// The refusal is said once, also where the error's chain is printed.
    #[tokio::test]
    async fn a_refused_connection_says_why_once() {
        // A port that was free a moment ago: nothing listens there now.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let err = match NodeClient::connect(addr, Role::Computed, 0).await {
            Err(e) => anyhow::Error::from(e),
            Ok(_) => return eprintln!("skipped: something took the port"),
        };
        let chain = format!("{err:#}");
        assert!(chain.contains(&addr.to_string()), "{chain}");
        assert_eq!(chain.matches("os error").count(), 1, "{chain}");
    }
}
