//! A client of computed: one connection, many requests in flight (replies
//! matched by request id), usable from many tasks at once (`&self`). Used by
//! storbench, storctl and tests.

use std::net::SocketAddr;

use storaged::client::Pipeline;
use tokio::net::TcpStream;

use crate::api::{self, CLIENT_PROTOCOL_VERSION, ClientErrorCode, ClientMessage, VolumeInfo};
use crate::core::{PageRead, PageWrite};
use crate::membership::{Change, PgView};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The cause is in the message and not a `source`: `{:#}` would print it twice.
    #[error("connecting to {addr}: {error}")]
    Connect { addr: SocketAddr, error: std::io::Error },
    #[error("the connection to computed is closed")]
    Closed,
    #[error("computed refused the request ({code:?}): {message}")]
    Refused { code: ClientErrorCode, message: String },
    #[error("cannot encode the request: {0}")]
    Encode(api::FrameError),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

pub struct Client {
    pipeline: Pipeline<ClientMessage>,
    /// What computed said about the volume when the connection opened.
    pub info: VolumeInfo,
}

fn decode_reply(buf: &[u8]) -> Result<Option<(u64, ClientMessage, usize)>, String> {
    api::decode(buf).map_err(|e| e.to_string())
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|error| ClientError::Connect { addr, error })?;
        let mut client = Client {
            pipeline: Pipeline::start(stream, decode_reply),
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
        let id = self.pipeline.next_id();
        let mut frame = Vec::new();
        api::encode(id, &msg, &mut frame).map_err(ClientError::Encode)?;
        match self.pipeline.call(id, frame).await.ok_or(ClientError::Closed)? {
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

    /// Where PG `pg`'s membership stands, as the writer sees it.
    pub async fn pg_state(&self, pg: u32) -> Result<PgView, ClientError> {
        match self.request(ClientMessage::PgState { pg }).await? {
            ClientMessage::PgStateOk { view } => Ok(view),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Start `change` of PG `pg`'s membership; where the PG stands once its
    /// first step was sent. Refused `Busy` while a step is being installed
    /// (ask again), `BadRequest` for a change that does not fit (the text
    /// says why).
    pub async fn change_membership(&self, pg: u32, change: Change) -> Result<PgView, ClientError> {
        match self.request(ClientMessage::ChangeMembership { pg, change }).await? {
            ClientMessage::PgStateOk { view } => Ok(view),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}
