//! `storaged run --metrics ADDR` as a real process on 127.0.0.1: what a
//! Prometheus scrape reads after appends, and what bad or slow requests
//! get (a 4xx, and the node serving on).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use storaged::client::NodeClient;
use storaged::proto::{Message, Role};
use storaged::record::{RecordBody, RedoRecord, SegmentId, WireRecord};
use support::run;
use testkit::Daemon;

mod support;

/// Any one HTTP exchange, connecting included.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const VOLUME: u64 = 42;
const PAGE_BYTES: u32 = 8192;
const PG_PAGES: u64 = 64;

/// A port of 127.0.0.1 free a moment ago.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `storaged run` on `device` with its metrics on `metrics`.
fn start_daemon(device: &Path, metrics: SocketAddr) -> Daemon {
    support::start_daemon(device, &["--metrics", &metrics.to_string()])
}

fn rec(pg: u32, lsn: u64, prev: u64) -> RedoRecord {
    RedoRecord {
        segment: SegmentId { volume: VOLUME, pg },
        lsn,
        prev_lsn_pg: prev,
        prev_lsn_page: 0,
        page: pg as u64 * PG_PAGES + lsn % 7,
        cpl: true,
        body: RecordBody::PageDelta {
            offset: 16,
            bytes: vec![7; 100],
        },
    }
}

/// Append `records` to `pg`; the SCL acknowledged.
async fn append(c: &NodeClient, pg: u32, records: Vec<RedoRecord>) -> u64 {
    let ack = c
        .request(Message::Append {
            volume: VOLUME,
            epoch: 1,
            pg,
            page_bytes: PAGE_BYTES,
            pg_pages: PG_PAGES,
            membership_epoch: 0,
            records: records.into_iter().map(WireRecord::new).collect(),
        })
        .await
        .unwrap();
    match ack {
        Message::AppendAck { scl, .. } => scl,
        other => panic!("expected an AppendAck, got {other:?}"),
    }
}

/// Send `request` raw and read the whole answer (the server closes).
/// The status code and the body.
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).unwrap();
    s.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(HTTP_TIMEOUT)).unwrap();
    // The server may answer (and close) before it has read all of a long request.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8(answer).expect("a text answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (code, head.to_owned(), body.to_owned())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
}

/// Scrape `addr`, check the exposition's shape, and parse it: every family
/// has HELP and TYPE and a `storaged_` name, every sample belongs to a
/// declared family, counters' samples end in `_total`, `# EOF` ends it.
fn scrape(addr: SocketAddr) -> Scrape {
    let (code, head, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "the exposition ends with # EOF");
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').expect("HELP name text");
            assert!(!text.trim().is_empty(), "{name} has an empty HELP");
            assert!(help.insert(name.to_owned()), "{name} has two HELP lines");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(help.contains(name), "{name}: TYPE without a HELP before it");
            assert!(name.starts_with("storaged_"), "{name}");
            assert!(
                types.insert(name.to_owned(), ty.to_owned()).is_none(),
                "{name} typed twice"
            );
        } else if line == "# EOF" {
        } else {
            assert!(!line.starts_with('#'), "unexpected line {line:?}");
            let sample = line.split(['{', ' ']).next().unwrap();
            let family = types
                .iter()
                .rev()
                .find(|(family, ty)| match ty.as_str() {
                    "counter" => sample == format!("{family}_total"),
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| sample == format!("{family}{s}")),
                    _ => sample == family.as_str(),
                })
                .map(|(f, _)| f.clone());
            assert!(
                family.is_some(),
                "sample {sample} belongs to no family declared before it"
            );
        }
    }
    assert_eq!(help.len(), types.len(), "every HELP has a TYPE");
    for (family, ty) in &types {
        assert!(
            ["counter", "gauge", "histogram"].contains(&ty.as_str()),
            "{family} is a {ty}"
        );
    }
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("a Prometheus exposition");
    assert!(!scrape.samples.is_empty());
    scrape
}

/// The value of `metric` (a counter's `_total` sample, a gauge) with `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found = s
        .samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {metric} {labels:?}"));
    match found.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{metric} is a {other:?}"),
    }
}

#[test]
fn a_scrape_has_every_family_described_and_the_segment_s_scl() {
    let dir = support::tempdir("storaged-metrics-");
    let dev = support::format_device(dir.path(), "16m");
    let metrics = free_addr();
    let daemon = start_daemon(&dev, metrics);
    let scl = std::cell::Cell::new(0);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        append(&c, 0, vec![rec(0, 10, 0), rec(0, 20, 10)]).await;
        // 40 links to 30, which is missing: held above a hole.
        assert_eq!(append(&c, 0, vec![rec(0, 40, 30)]).await, 20);
        scl.set(append(&c, 3, vec![rec(3, 11, 0)]).await);
    });
    let s = scrape(metrics);
    let pg0 = [("volume", "42"), ("pg", "0")];
    assert_eq!(value(&s, "storaged_segment_scl", &pg0), 20.0);
    assert_eq!(value(&s, "storaged_segment_highest_lsn", &pg0), 40.0);
    assert_eq!(value(&s, "storaged_segment_holes", &pg0), 1.0);
    assert_eq!(value(&s, "storaged_segment_epoch", &pg0), 1.0);
    assert_eq!(
        value(&s, "storaged_segment_scl", &[("volume", "42"), ("pg", "3")]),
        scl.get() as f64
    );
    assert_eq!(value(&s, "storaged_segments", &[]), 2.0);
    assert_eq!(value(&s, "storaged_node_id", &[]), 5.0);
    assert_eq!(value(&s, "storaged_appends_total", &[]), 3.0);
    assert!(value(&s, "storaged_log_written_bytes_total", &[]) >= 4096.0);
    assert!(value(&s, "storaged_log_used_bytes", &[]) > 0.0);
    assert!(value(&s, "storaged_log_free_bytes", &[]) > 0.0);
    assert_eq!(value(&s, "storaged_scrub_damage_left", &[]), 0.0);
    let latency = s
        .samples
        .iter()
        .find(|x| x.metric == "storaged_append_seconds")
        .expect("the append latency histogram");
    match &latency.value {
        Value::Histogram(buckets) => {
            let all = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(all, 3.0, "every append is in the +Inf bucket");
        }
        other => panic!("storaged_append_seconds is a {other:?}"),
    }
    // What the brief of every family promises, by name.
    for family in [
        "storaged_segment_pgmrpl",
        "storaged_segment_coalesced_lsn",
        "storaged_segment_installed_epoch",
        "storaged_segment_membership_epoch",
        "storaged_repair_pulled_records_total",
        "storaged_repair_pulled_bytes_total",
        "storaged_repair_hydrated_bytes_total",
        "storaged_scrub_passes_completed_total",
        "storaged_scrub_last_pass_end_timestamp_seconds",
        "storaged_scrub_checked_blocks_total",
        "storaged_scrub_checked_pages_total",
        "storaged_scrub_damage_found_total",
        "storaged_scrub_damage_repaired_total",
        "storaged_page_damaged_answers_total",
        "storaged_log_entries_written_total",
        "storaged_log_size_bytes",
    ] {
        assert!(s.samples.iter().any(|x| x.metric == family), "no {family}");
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn bad_and_slow_requests_get_4xx_and_the_node_serves_on() {
    let dir = support::tempdir("storaged-metrics-");
    let dev = support::format_device(dir.path(), "16m");
    let metrics = free_addr();
    let daemon = start_daemon(&dev, metrics);
    // A client that connects and sends nothing holds no one up.
    let silent = TcpStream::connect_timeout(&metrics, HTTP_TIMEOUT).unwrap();
    assert_eq!(get(metrics, "/").0, 404);
    assert_eq!(get(metrics, "/metrics/../x").0, 404);
    let (code, head, _) = exchange(metrics, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(code, 405);
    assert!(head.contains("Allow: GET"), "{head}");
    assert_eq!(exchange(metrics, b"garbage\r\n\r\n").0, 400);
    assert_eq!(exchange(metrics, b"\xff\xfe\xfd\r\n\r\n").0, 400);
    assert_eq!(exchange(metrics, b"GET /metrics SPDY/3\r\n\r\n").0, 400);
    // A head that never ends: refused once it is too long, not buffered on.
    let mut endless = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    endless.resize(64 << 10, b'a');
    assert_eq!(exchange(metrics, &endless).0, 400);
    // A half-sent request is given up by the node in time (never waited for).
    let mut half = TcpStream::connect_timeout(&metrics, HTTP_TIMEOUT).unwrap();
    half.write_all(b"GET /metr").unwrap();
    half.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = String::new();
    let _ = half.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    drop(silent);
    // Still serving, metrics and appends alike.
    scrape(metrics);
    run(async {
        let c = NodeClient::connect(daemon.addr, Role::Computed, 0).await.unwrap();
        assert_eq!(append(&c, 0, vec![rec(0, 10, 0)]).await, 10);
    });
    assert_eq!(value(&scrape(metrics), "storaged_segment_scl", &[("pg", "0")]), 10.0);
    assert_eq!(daemon.terminate().code(), Some(0));
}
