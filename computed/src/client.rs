//! A client of computed: one connection, many requests in flight (replies
//! matched by request id), usable from many tasks at once (`&self`). Used by
//! storbench, storctl and tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, CLIENT_PROTOCOL_VERSION, ClientErrorCode, ClientMessage, VolumeInfo};
use crate::core::{PageRead, PageWrite};

/// Requests queued for the connection's writer, at most; callers wait beyond.
const QUEUED_MAX: usize = 1024;
/// Requests coalesced into one socket write, at most (bytes).
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
const READ_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("the connection to computed is closed")]
    Closed,
    #[error("computed refused the request ({code:?}): {message}")]
    Refused { code: ClientErrorCode, message: String },
    #[error("cannot encode the request: {0}")]
    Encode(api::FrameError),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<ClientMessage>>>>;

pub struct Client {
    tx: mpsc::Sender<(u64, Vec<u8>, oneshot::Sender<ClientMessage>)>,
    next_id: AtomicU64,
    /// What computed said about the volume when the connection opened.
    pub info: VolumeInfo,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>, oneshot::Sender<ClientMessage>)>(QUEUED_MAX);
        let w = waiters.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some((id, frame, reply)) = rx.recv().await {
                out.clear();
                out.extend_from_slice(&frame);
                w.lock().unwrap_or_else(|e| e.into_inner()).insert(id, reply);
                while out.len() < WRITE_BATCH_BYTES_MAX {
                    let Ok((id, frame, reply)) = rx.try_recv() else {
                        break;
                    };
                    w.lock().unwrap_or_else(|e| e.into_inner()).insert(id, reply);
                    out.extend_from_slice(&frame);
                }
                if writer.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
        let w = waiters.clone();
        tokio::spawn(async move {
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
                    match api::decode(&buf[used..]) {
                        Ok(Some((id, msg, len))) => {
                            used += len;
                            let waiter = w.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(msg);
                            }
                        }
                        Ok(None) => break,
                        Err(_) => break 'read,
                    }
                }
                buf.drain(..used);
            }
            // Everyone still waiting learns the connection is gone.
            w.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        let mut client = Client {
            tx,
            next_id: AtomicU64::new(1),
            info: VolumeInfo {
                volume: 0,
                page_bytes: 0,
                pages: 0,
                pgs: 0,
                vdl: 0,
                epoch: 0,
            },
        };
        match client
            .request(ClientMessage::Hello {
                protocol_version: u16::from(CLIENT_PROTOCOL_VERSION),
            })
            .await?
        {
            ClientMessage::HelloOk { info } => client.info = info,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        Ok(client)
    }

    async fn request(&self, msg: ClientMessage) -> Result<ClientMessage, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        api::encode(id, &msg, &mut frame).map_err(ClientError::Encode)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send((id, frame, reply_tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        match reply_rx.await.map_err(|_| ClientError::Closed)? {
            ClientMessage::Error { code, message } => Err(ClientError::Refused { code, message }),
            reply => Ok(reply),
        }
    }

    /// Write the pages as one transaction; returns its commit LSN once it is
    /// durable (VDL >= LSN).
    pub async fn commit(&self, writes: Vec<PageWrite>) -> Result<u64, ClientError> {
        match self.request(ClientMessage::Commit { writes }).await? {
            ClientMessage::Committed { lsn } => Ok(lsn),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Read a page at the current read point (the VDL when the read starts).
    pub async fn read(&self, page: u64) -> Result<PageRead, ClientError> {
        match self.request(ClientMessage::Read { page }).await? {
            ClientMessage::Page { read_point, lsn, bytes } => Ok(PageRead { read_point, lsn, bytes }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn volume_info(&self) -> Result<VolumeInfo, ClientError> {
        match self.request(ClientMessage::VolumeInfo).await? {
            ClientMessage::VolumeInfoOk { info } => Ok(info),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}
