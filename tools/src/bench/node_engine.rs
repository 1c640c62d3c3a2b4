//! `--engine node`: appends through a storage node over TCP on 127.0.0.1,
//! timed from send to AppendAck (durable, with the segment's SCL).
//!
//! The node (storaged's `Node` and its server) runs in this process on the
//! device named by `--filename` (created and formatted if missing, as for
//! `--engine log`); each of the `--iodepth` × `--numjobs` appenders has its
//! own connection and its own segment, and appends one record per request,
//! so the figures include framing, the TCP round trip, the segment core and
//! the log. `--bs` is the record's size on the log, as for `--engine log`.
//!
//! `--rw randread` measures GetPage instead: one segment of `--node-pages`
//! pages of `--bs` bytes (8k by default for reads) is written (an image per
//! page), coalesced into page versions (PGMRPL raised past the images), and
//! each page then gets `--chain-deltas` small deltas that stay in memory;
//! `--iodepth` × `--numjobs` readers then ask for random pages at the SCL,
//! so each read is one page store read plus the chain applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use storaged::client::NodeClient;
use storaged::node::server::{bind, serve};
use storaged::node::{Node, NodeConfig};
use storaged::proto::{ErrorCode, Message, Role};
use storaged::record::{RECORD_HEADER_BYTES, RecordBody, RedoRecord, SegmentId, WireRecord};

use super::log_engine::{entry_bytes_for, open_or_create};
use super::stats::{DirStats, JobStats};
use super::{BenchArgs, Engine, Rw};

#[path = "node_reads.rs"]
mod reads;

const RECORDS_DEFAULT: u64 = 100_000;
const VOLUME: u64 = 1;
/// Each appender is its own segment: small PGs keep the page store extents
/// a run creates small (a fresh segment per appender and per run).
const PAGE_BYTES: u32 = 8192;
const PG_PAGES: u64 = 16;

pub struct NodeBench;

impl Engine for NodeBench {
    fn run(&self, args: &BenchArgs) -> Result<Vec<JobStats>> {
        if args.rw() == Rw::Randread {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            return rt.block_on(reads::run(args));
        }
        if args.rw() != Rw::Write {
            bail!("--engine node appends (--rw write, the default) or reads pages (--rw randread)");
        }
        let entry_bytes = entry_bytes_for(args.bs)?;
        if entry_bytes - RECORD_HEADER_BYTES > 8192 {
            bail!("--engine node: records change one 8 KiB page; --bs is at most 8k");
        }
        // One thread, as storaged runs: hand-offs between workers cost more
        // than they give on small machines (docs/performance.md).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        rt.block_on(run(args, entry_bytes))
    }
}

/// A node to talk to: in-process on --filename, or a running one at
/// --node-addr. Stopped by [`LocalNode::stop`].
pub(super) struct LocalNode {
    node: Arc<Node>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl LocalNode {
    pub(super) async fn stop(self) {
        let _ = self.stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        self.node.shutdown().await;
    }
}

pub(super) async fn node_for(args: &BenchArgs) -> Result<(std::net::SocketAddr, Option<LocalNode>)> {
    let mut local = None;
    let addr = match args.node_addr {
        Some(addr) => addr,
        None => {
            let path = args
                .filename
                .as_deref()
                .ok_or_else(|| anyhow!("--engine node needs --filename DEVICE or --node-addr ADDR"))?;
            let dev = open_or_create(path, args.size, args.ring, args.force).await?;
            let mut config = NodeConfig::default();
            config.log.write_blocks_max = args.log_write_blocks;
            config.log.writes_inflight_max = args.log_writes_inflight;
            config.log.durability = args.log_durability.into();
            config.log.validate().map_err(|e| anyhow!("log engine settings: {e}"))?;
            let (node, _) = Node::open(dev, config)
                .await
                .with_context(|| format!("opening the node on {}", path.display()))?;
            let listener = bind("127.0.0.1:0".parse().expect("literal address")).context("listening on 127.0.0.1")?;
            let addr = listener.local_addr().context("listening address")?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let server = tokio::spawn(serve(node.clone(), listener, stop_rx));
            local = Some(LocalNode { node, stop_tx, server });
            addr
        }
    };
    Ok((addr, local))
}

async fn run(args: &BenchArgs, entry_bytes: usize) -> Result<Vec<JobStats>> {
    let (addr, local) = node_for(args).await?;

    let duration = args.duration();
    let per_job = match (duration, args.size) {
        (Some(_), _) => u64::MAX,
        (None, Some(size)) => (size / args.bs).max(1),
        (None, None) => RECORDS_DEFAULT,
    };
    let appenders = u64::from(args.iodepth);
    let stop = Arc::new(AtomicBool::new(false));
    let payload = entry_bytes - RECORD_HEADER_BYTES;
    let start = Instant::now();
    // Appenders share connections as computed does (one per node,
    // pipelined); --node-connections raises the count.
    let mut clients = Vec::new();
    for _ in 0..args.node_connections.max(1) {
        clients.push(Arc::new(NodeClient::connect(addr, Role::Computed, 0).await?));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for job in 0..u64::from(args.numjobs) {
        for a in 0..appenders {
            let stop = stop.clone();
            let quota = per_job / appenders + u64::from(a < per_job % appenders);
            // Its own segment: a fresh PG per appender and per run.
            let pg = ((job * appenders + a) as u32) ^ (start.elapsed().as_nanos() as u32 & 0xFFFF_0000);
            let client = clients[((job * appenders + a) as usize) % clients.len()].clone();
            let local_log = local.is_some();
            tasks.spawn(async move {
                let seg = SegmentId { volume: VOLUME, pg };
                let scl = match client
                    .request(Message::GetSegmentStatus {
                        volume: VOLUME,
                        epoch: 0,
                        pg,
                    })
                    .await?
                {
                    Message::SegmentStatus { scl, .. } => scl,
                    _ => 0,
                };
                let mut stats = DirStats::default();
                let mut prev = scl;
                for i in 0..quota {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let lsn = scl + i + 1;
                    let record = RedoRecord {
                        segment: seg,
                        lsn,
                        prev_lsn_pg: prev,
                        prev_lsn_page: 0,
                        page: u64::from(pg) * PG_PAGES + i % PG_PAGES,
                        cpl: true,
                        body: RecordBody::PageDelta {
                            offset: 0,
                            bytes: vec![lsn as u8; payload],
                        },
                    };
                    let t = Instant::now();
                    let reply = client
                        .request(Message::Append {
                            volume: VOLUME,
                            epoch: 1,
                            pg,
                            page_bytes: PAGE_BYTES,
                            pg_pages: PG_PAGES,
                            membership_epoch: 0,
                            records: vec![WireRecord::new(record)],
                        })
                        .await?;
                    match reply {
                        Message::AppendAck { scl, .. } if scl >= lsn => {}
                        // Nothing frees this node's log: no computed sends it a
                        // PGMRPL, so a run can append only what the log holds.
                        Message::Error {
                            code: ErrorCode::Overloaded,
                            message,
                            ..
                        } if local_log => {
                            return Err(anyhow!(
                                "append of LSN {lsn}: {message}. This benchmark never frees the node's log, so a \
                                 run appends at most what the log holds: give a larger --size for a new device (a \
                                 quarter of it is log, up to 1 GiB), a new --filename, or a shorter --runtime"
                            ));
                        }
                        other => return Err(anyhow!("append of LSN {lsn} answered {other:?}")),
                    }
                    let _ = stats.latency_ns.record((t.elapsed().as_nanos() as u64).max(1));
                    stats.ios += 1;
                    prev = lsn;
                }
                anyhow::Ok((job, stats))
            });
        }
    }
    let result = super::appenders::finish(tasks, stop.clone(), duration, args.numjobs, args.bs, start).await;
    drop(clients);
    if let Some(local) = local {
        local.stop().await;
    }
    result
}
