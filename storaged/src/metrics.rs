//! `storaged run --metrics ADDR`: the node's watermarks and counters as
//! Prometheus metrics on `GET /metrics`.
//!
//! The text is OpenMetrics 1.0 (what Prometheus asks for first), encoded by
//! `prometheus-client` from what the node already keeps — each segment's
//! state, the log's, the scrubber's status — read at each scrape, plus the
//! few counters kept here ([`NodeCounters`]), which are atomics: counting
//! never takes a lock the write path waits for. Counter families carry
//! `_total` on their samples, units are in the names (`_bytes`,
//! `_seconds`), and every family has its HELP and TYPE.
//!
//! The HTTP side is a few lines on tokio rather than a web framework: one
//! route, one method, one response per connection (`Connection: close`).
//! A request head is read within [`REQUEST_TIMEOUT`] and
//! [`REQUEST_BYTES_MAX`], a response written within [`WRITE_TIMEOUT`], and
//! at most [`CONNECTIONS_MAX`] connections are served at once (more are
//! closed at once), so a slow or hostile client costs a bounded amount of
//! memory and never holds up the node. Another path is 404, another method
//! 405, a head that is not HTTP/1.x or too long 400; each closes the
//! connection.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::node::Node;

/// Longest request head taken (request line and headers); a scraper's is
/// a few hundred bytes.
pub const REQUEST_BYTES_MAX: usize = 8192;
/// A request head must arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A response must be taken within this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const CONNECTIONS_MAX: usize = 16;
/// What the response says it is.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the append latency histogram's buckets, in µs (a last
/// one, +Inf, takes the rest): 50 µs to 2.5 s.
const LATENCY_BOUNDS_US: [u64; 15] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
];

/// A latency histogram of fixed buckets, counted with atomics.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn record_us(&self, us: u64) {
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Per bucket (not cumulative): its upper bound in seconds (`f64::MAX`
    /// is +Inf) and its count; the sum in seconds; the count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut count = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count += n;
            let bound = LATENCY_BOUNDS_US.get(i).map_or(f64::MAX, |&us| us as f64 / 1e6);
            buckets.push((bound, n));
        }
        (buckets, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6, count)
    }
}

/// What the node counts for its metrics only.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Writers' appends, from request to answer (the answer is the
    /// durable ack).
    pub append_latency: LatencyHistogram,
    /// Reads answered `PageDamaged`.
    pub page_damaged_answers: AtomicU64,
    /// Records (and their encoded bytes) pulled from peers and taken.
    pub pulled_records: AtomicU64,
    pub pulled_bytes: AtomicU64,
    /// Page-version bytes a hydration took from a donor.
    pub hydrated_bytes: AtomicU64,
    /// Blocks and current page versions the scrubber verified.
    pub scrub_blocks_checked: AtomicU64,
    pub scrub_pages_checked: AtomicU64,
}

impl NodeCounters {
    pub fn pulled(&self, records: u64, bytes: u64) {
        self.pulled_records.fetch_add(records, Ordering::Relaxed);
        self.pulled_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn hydrated(&self, bytes: u64) {
        self.hydrated_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn scrubbed(&self, blocks: u64, pages: u64) {
        self.scrub_blocks_checked.fetch_add(blocks, Ordering::Relaxed);
        self.scrub_pages_checked.fetch_add(pages, Ordering::Relaxed);
    }
}

/// Reads the node at each scrape. Weak: a connection waiting on a slow
/// client must not keep a stopping node's log open (its driver ends when
/// the last `Arc<Node>` goes).
struct NodeCollector(Weak<Node>);

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        // Gone: the process is stopping; an empty exposition.
        let Some(node) = self.0.upgrade() else {
            return Ok(());
        };
        let segments = node.segment_gauges();
        type Field = fn(&crate::node::SegmentGauges) -> u64;
        let per_segment: [(&str, &str, Field); 10] = [
            (
                "storaged_segment_scl",
                "Segment complete LSN: the segment holds its PG's chain up to it with no gap.",
                |s| s.scl,
            ),
            (
                "storaged_segment_highest_lsn",
                "Highest LSN of a record the segment holds (0: none).",
                |s| s.highest_lsn,
            ),
            (
                "storaged_segment_pgmrpl",
                "PG minimum read point LSN the writer set: the log may be freed below it.",
                |s| s.pgmrpl,
            ),
            (
                "storaged_segment_coalesced_lsn",
                "Every record at or below this LSN is in page versions: the floor the log is freed below.",
                |s| s.coalesced_lsn,
            ),
            (
                "storaged_segment_holes",
                "LSN ranges the segment lacks above its SCL (at most 16 counted).",
                |s| s.holes,
            ),
            (
                "storaged_segment_records",
                "Records the segment holds that are not yet in page versions.",
                |s| s.records,
            ),
            (
                "storaged_segment_epoch",
                "Volume epoch requests to the segment are checked against (a recovering writer's seal raises it).",
                |s| s.epoch,
            ),
            (
                "storaged_segment_installed_epoch",
                "Volume epoch whose truncation the segment has installed; below its epoch while sealed.",
                |s| s.installed_epoch,
            ),
            (
                "storaged_segment_membership_epoch",
                "Membership epoch of the PG as the writer last set it (0: none set).",
                |s| s.membership_epoch,
            ),
            (
                "storaged_segment_damaged_pages",
                "Pages of the segment whose current version was found damaged since the node opened.",
                |s| s.damaged_pages,
            ),
        ];
        for (name, help, field) in per_segment {
            let mut m: MetricEncoder = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &segments {
                m.encode_family(&[("volume", s.id.volume), ("pg", u64::from(s.id.pg))])?
                    .encode_gauge(&field(s))?;
            }
        }
        gauge(
            &mut enc,
            "storaged_segments",
            "Segments the node holds.",
            segments.len() as u64,
        )?;
        gauge(
            &mut enc,
            "storaged_node_id",
            "This node's id in the cluster file.",
            node.node_id,
        )?;

        let (appends, _) = node.foreground_totals();
        counter(
            &mut enc,
            "storaged_appends",
            "Writers' Append requests answered since start.",
            appends,
        )?;
        let (buckets, sum, count) = node.counters().append_latency.snapshot();
        enc.encode_descriptor(
            "storaged_append_seconds",
            "Writers' Append requests, from request to answer (a durable ack or a refusal).",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;

        let log = node.log_gauges();
        counter(
            &mut enc,
            "storaged_log_written_bytes",
            "Bytes written to the log since start.",
            log.written_bytes,
        )?;
        counter(
            &mut enc,
            "storaged_log_entries_written",
            "Log entries made durable since start.",
            log.entries_written,
        )?;
        gauge(
            &mut enc,
            "storaged_log_size_bytes",
            "Size of the log region.",
            log.size_bytes,
        )?;
        gauge(
            &mut enc,
            "storaged_log_used_bytes",
            "Log bytes between its tail and its head.",
            log.used_bytes,
        )?;
        gauge(&mut enc, "storaged_log_free_bytes", "Log bytes free.", log.free_bytes)?;

        let c = node.counters();
        counter(
            &mut enc,
            "storaged_repair_pulled_records",
            "Records pulled from peers and taken since start.",
            c.pulled_records.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "storaged_repair_pulled_bytes",
            "Bytes of records pulled from peers and taken since start.",
            c.pulled_bytes.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "storaged_repair_hydrated_bytes",
            "Bytes of page versions hydrations took from donors since start.",
            c.hydrated_bytes.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "storaged_page_damaged_answers",
            "Page reads answered PageDamaged since start.",
            c.page_damaged_answers.load(Ordering::Relaxed),
        )?;

        let scrub = node.scrub_status();
        counter(
            &mut enc,
            "storaged_scrub_passes_completed",
            "Scrub passes (background and priority) completed since start.",
            node.scrub_passes_completed(),
        )?;
        gauge(
            &mut enc,
            "storaged_scrub_last_pass_end_timestamp_seconds",
            "Unix time the last completed scrub pass ended (0: none yet).",
            scrub.last.as_ref().map_or(0, |p| p.ended_unix_secs),
        )?;
        counter(
            &mut enc,
            "storaged_scrub_checked_blocks",
            "Blocks the scrubber read and verified since start.",
            c.scrub_blocks_checked.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "storaged_scrub_checked_pages",
            "Current page versions the scrubber verified since start.",
            c.scrub_pages_checked.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "storaged_scrub_damage_found",
            "Damage the scrubber found since start, repaired or not.",
            scrub.found_total,
        )?;
        counter(
            &mut enc,
            "storaged_scrub_damage_repaired",
            "Damage the scrubber repaired since start.",
            scrub.repaired_total,
        )?;
        gauge(
            &mut enc,
            "storaged_scrub_damage_left",
            "DAMAGE NOBODY COULD REPAIR, held by this node now: anything above 0 needs an operator \
             (the log names each place at ERROR).",
            scrub.left_now,
        )?;
        Ok(())
    }
}

/// The registry a node's endpoint encodes.
pub fn registry(node: &Arc<Node>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector(Arc::downgrade(node))));
    registry
}

/// The exposition text of `registry`, `# EOF` last.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest(&'static str),
}

/// Route a complete request head (up to its blank line).
pub fn route(head: &[u8]) -> Route {
    let Ok(head) = std::str::from_utf8(head) else {
        return Route::BadRequest("the request is not text");
    };
    let line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest("the request line is not METHOD TARGET VERSION");
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Route::BadRequest("the request line is not METHOD TARGET HTTP/1.x");
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Read a request head: `Ok(None)` if it is longer than
/// [`REQUEST_BYTES_MAX`] or the client closed before its end.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; REQUEST_BYTES_MAX];
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end + 2);
            return Ok(Some(buf));
        }
        if len == buf.len() {
            return Ok(None);
        }
        match stream.read(&mut buf[len..]).await? {
            0 => return Ok(None),
            n => len += n,
        }
    }
}

fn response(status: &str, extra: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = String::with_capacity(body.len() + 160);
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    out.push_str(body);
    out.into_bytes()
}

async fn connection(registry: &Registry, mut stream: TcpStream) {
    let plain = "text/plain; charset=utf-8";
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        // Too slow: nothing more is spent on it.
        Err(_) => response("408 Request Timeout", "", plain, "request head not received in time\n"),
        Ok(Err(_)) => return,
        Ok(Ok(None)) => response(
            "400 Bad Request",
            "",
            plain,
            &format!("no complete request head within {REQUEST_BYTES_MAX} bytes\n"),
        ),
        Ok(Ok(Some(head))) => match route(&head) {
            Route::Metrics => match render(registry) {
                Ok(text) => response("200 OK", "", CONTENT_TYPE, &text),
                Err(_) => response("500 Internal Server Error", "", plain, "encoding the metrics failed\n"),
            },
            Route::NotFound => response("404 Not Found", "", plain, "the metrics are at /metrics\n"),
            Route::MethodNotAllowed => response("405 Method Not Allowed", "Allow: GET\r\n", plain, "only GET\n"),
            Route::BadRequest(why) => response("400 Bad Request", "", plain, &format!("{why}\n")),
        },
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await;
}

/// Serve `node`'s metrics on `listener` until `stop` turns true.
pub async fn serve(node: Arc<Node>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let registry = Arc::new(registry(&node));
    drop(node);
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        if *stop.borrow() {
            return;
        }
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "metrics: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            r = stop.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        };
        // Beyond the limit a scraper is turned away, not queued.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            connection(&registry, stream).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics/x HTTP/1.1\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n"), Route::MethodNotAllowed);
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n"), Route::MethodNotAllowed);
        for bad in [
            &b"\xff\xfe\r\n"[..],
            b"GET\r\n",
            b"GET /metrics\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n",
            b"GET metrics HTTP/1.1\r\n",
            b"GET /metrics SPDY/3\r\n",
            b"G(T /metrics HTTP/1.1\r\n",
            b"\r\n",
        ] {
            assert!(matches!(route(bad), Route::BadRequest(_)), "{bad:?}");
        }
    }

    #[test]
    fn latencies_fall_in_the_bucket_of_their_upper_bound() {
        let h = LatencyHistogram::default();
        for us in [0, 50, 51, 2_500_000, 2_500_001, u64::MAX / 2] {
            h.record_us(us);
        }
        let (buckets, _, count) = h.snapshot();
        assert_eq!(count, 6);
        assert_eq!(buckets[0], (50e-6, 2));
        assert_eq!(buckets[1], (100e-6, 1));
        assert_eq!(buckets[14], (2.5, 1));
        assert_eq!(buckets[15], (f64::MAX, 2));
    }
}
