//! `--engine node --rw randread`: GetPage at the SCL of pages that have a
//! stored version and a chain of deltas above it (see the engine's header).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use storaged::client::NodeClient;
use storaged::proto::{Message, Role};
use storaged::record::{RecordBody, RedoRecord, SegmentId, WireRecord};

use super::super::BenchArgs;
use super::super::stats::{DirStats, JobStats};
use super::node_for;

const VOLUME: u64 = 2;
/// Records per Append while the pages are written.
const SETUP_BATCH_RECORDS: usize = 64;
/// How long coalescing may take to store the images before the run gives up.
const COALESCE_WAIT: Duration = Duration::from_secs(120);

pub async fn run(args: &BenchArgs) -> Result<Vec<JobStats>> {
    let page_bytes = u32::try_from(args.bs)
        .ok()
        .filter(|b| b.is_power_of_two() && (512..=65536).contains(b));
    let Some(page_bytes) = page_bytes else {
        bail!("--engine node --rw randread: --bs is the page size, a power of two from 512 to 64k");
    };
    let pages = args.node_pages;
    let (addr, local) = node_for(args).await?;
    let setup = NodeClient::connect(addr, Role::Computed, 0).await?;
    // A fresh segment per run: PG number from the clock.
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32);
    let pg = clock ^ (std::process::id() << 8);
    let seg = SegmentId { volume: VOLUME, pg };
    let first = u64::from(pg) * pages;
    let mut lsn = 0u64;
    let mut batch = Vec::new();
    let send = |records: Vec<RedoRecord>| {
        let setup = &setup;
        async move {
            match setup
                .request(Message::Append {
                    volume: VOLUME,
                    epoch: 1,
                    pg,
                    page_bytes,
                    pg_pages: pages,
                    membership_epoch: 0,
                    records: records.into_iter().map(WireRecord::new).collect(),
                })
                .await?
            {
                Message::AppendAck { .. } => Ok(()),
                other => Err(anyhow!("setting up pages: append answered {other:?}")),
            }
        }
    };
    for p in 0..pages {
        lsn += 1;
        batch.push(record(
            seg,
            lsn,
            first + p,
            RecordBody::PageImage(vec![p as u8; page_bytes as usize]),
        ));
        if batch.len() == SETUP_BATCH_RECORDS {
            send(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        send(std::mem::take(&mut batch)).await?;
    }
    let images_through = lsn;
    // Let the node coalesce the images into versions, and wait until it has.
    setup
        .request(Message::SetPgmrpl {
            volume: VOLUME,
            epoch: 1,
            pg,
            lsn: images_through,
        })
        .await?;
    let deadline = Instant::now() + COALESCE_WAIT;
    loop {
        let lowest = match setup
            .request(Message::GetSegmentStatus {
                volume: VOLUME,
                epoch: 0,
                pg,
            })
            .await?
        {
            Message::SegmentStatus {
                lowest_lsn, records, ..
            } => (records > 0).then_some(lowest_lsn),
            other => bail!("segment status answered {other:?}"),
        };
        if lowest.is_none_or(|l| l > images_through) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the node did not coalesce the {pages} page images within {COALESCE_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for d in 0..args.chain_deltas {
        for p in 0..pages {
            lsn += 1;
            let offset = ((d * 97) % (u64::from(page_bytes) - 64)) as u32;
            let body = RecordBody::PageDelta {
                offset,
                bytes: vec![d as u8; 64],
            };
            batch.push(record(seg, lsn, first + p, body));
            if batch.len() == SETUP_BATCH_RECORDS {
                send(std::mem::take(&mut batch)).await?;
            }
        }
    }
    if !batch.is_empty() {
        send(std::mem::take(&mut batch)).await?;
    }
    let read_point = lsn;

    let stop = Arc::new(AtomicBool::new(false));
    let duration = args.duration();
    let per_reader = match (duration, args.size) {
        (Some(_), _) => u64::MAX,
        _ => pages.max(1000),
    };
    let mut clients = Vec::new();
    for _ in 0..args.node_connections.max(1) {
        clients.push(Arc::new(NodeClient::connect(addr, Role::Computed, 0).await?));
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let readers = u64::from(args.iodepth);
    for job in 0..u64::from(args.numjobs) {
        for r in 0..readers {
            let stop = stop.clone();
            let client = clients[((job * readers + r) as usize) % clients.len()].clone();
            tasks.spawn(async move {
                let mut rng = fastrand::Rng::with_seed(job * 1000 + r);
                let mut stats = DirStats::default();
                for _ in 0..per_reader {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let page = first + rng.u64(0..pages);
                    let t = Instant::now();
                    match client
                        .request(Message::GetPage {
                            volume: VOLUME,
                            epoch: 1,
                            pg,
                            page,
                            read_point,
                            membership_epoch: 0,
                        })
                        .await?
                    {
                        Message::Page { bytes, .. } if bytes.len() == page_bytes as usize => {}
                        other => return Err(anyhow!("GetPage of page {page} answered {other:?}")),
                    }
                    let _ = stats.latency_ns.record((t.elapsed().as_nanos() as u64).max(1));
                    stats.ios += 1;
                }
                anyhow::Ok((job, stats))
            });
        }
    }
    let result = super::super::appenders::finish(tasks, stop, duration, args.numjobs, args.bs, start).await;
    drop(clients);
    if let Some(local) = local {
        local.stop().await;
    }
    // The shared ending reports appends as writes; these were reads.
    let jobs = result.context("readers")?;
    Ok(jobs
        .into_iter()
        .map(|j| JobStats {
            read: j.write,
            write: DirStats::default(),
        })
        .collect())
}

fn record(segment: SegmentId, lsn: u64, page: u64, body: RecordBody) -> RedoRecord {
    RedoRecord {
        segment,
        lsn,
        prev_lsn_pg: lsn - 1,
        prev_lsn_page: 0,
        page,
        cpl: true,
        body,
    }
}
