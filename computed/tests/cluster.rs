//! Real processes on 127.0.0.1: 6 `storaged` daemons on file devices in a
//! temp dir and one `computed`. Commits are acknowledged only once 4
//! segments hold them: with 3 nodes stopped (SIGSTOP) or killed, commits
//! stall, and resume when one comes back; with 2 killed they go on. Reads
//! after storage restarts return the committed data.
//!
//! Needs the `storaged` binary next to `computed` in the target dir; it is
//! built with `cargo build -p storaged` if missing. Every process is killed
//! by PID when its guard drops; every test bounds its time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use computed::client::Client;
use computed::cluster::local_cluster_toml;
use computed::core::PageWrite;
use testkit::Daemon;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a commit is given to show it is stalled.
const STALL_WINDOW: Duration = Duration::from_millis(1500);

fn storaged_bin() -> PathBuf {
    let computed = PathBuf::from(env!("CARGO_BIN_EXE_computed"));
    let bin = computed.with_file_name("storaged");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", "-p", "storaged"]).status().unwrap();
        assert!(status.success(), "building storaged");
    }
    bin
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Cluster {
    dir: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    nodes: Vec<Option<Daemon>>,
    computed: Option<Daemon>,
    computed_addr: SocketAddr,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("computed-cluster-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let bin = storaged_bin();
        let addrs: Vec<SocketAddr> = (0..6).map(|_| free_port()).collect();
        for i in 0..6 {
            let dev = dir.path().join(format!("dev{}", i + 1));
            let out = Command::new(&bin)
                .args([
                    "format",
                    "--device",
                    dev.to_str().unwrap(),
                    "--node-id",
                    &(i + 1).to_string(),
                ])
                .args(["--size", "64m"])
                .env("RUST_LOG", "warn")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let mut c = Cluster {
            dir,
            addrs,
            nodes: (0..6).map(|_| None).collect(),
            computed: None,
            computed_addr: free_port(),
        };
        for i in 0..6 {
            c.start_node(i);
        }
        let file = c.dir.path().join("cluster.toml");
        std::fs::write(&file, local_cluster_toml(7, 2, 64, c.computed_addr, &c.addrs)).unwrap();
        c.start_computed();
        c
    }

    /// computed on a port the kernel gives it as it binds (clients use the
    /// address it reports): a port picked ahead and bound later can be
    /// taken between by another test's connection.
    fn start_computed(&mut self) {
        let file = self.dir.path().join("cluster.toml");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_computed"));
        cmd.args(["run", "--cluster", file.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        let computed = Daemon::start(cmd);
        self.computed_addr = computed.addr;
        self.computed = Some(computed);
    }

    fn start_node(&mut self, i: usize) {
        let dev = self.dir.path().join(format!("dev{}", i + 1));
        let mut cmd = Command::new(storaged_bin());
        cmd.args([
            "run",
            "--device",
            dev.to_str().unwrap(),
            "--listen",
            &self.addrs[i].to_string(),
        ]);
        self.nodes[i] = Some(Daemon::start(cmd));
    }

    fn node(&self, i: usize) -> &Daemon {
        self.nodes[i].as_ref().unwrap()
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { tokio::time::timeout(TEST_TIMEOUT, f).await.expect("test timed out") });
}

fn stamp(page: u64, n: u64) -> PageWrite {
    let mut bytes = page.to_le_bytes().to_vec();
    bytes.extend_from_slice(&n.to_le_bytes());
    PageWrite::Range {
        page,
        offset: 100,
        bytes,
    }
}

/// Commit and return the LSN; the commit touches a page of each PG.
async fn commit(client: &Client, n: u64) -> u64 {
    client
        .commit(vec![stamp(n % 64, n), stamp(64 + n % 64, n)])
        .await
        .expect("commit")
}

/// Every page written by commits 1..=last holds the newest stamp.
async fn check_reads(client: &Client, last: u64) {
    for page in (0..64).chain(64..128) {
        let newest = (1..=last).rev().find(|n| n % 64 == page % 64);
        let got = client.read(page).await.expect("read");
        let want: Vec<u8> = match newest {
            Some(n) => page
                .to_le_bytes()
                .iter()
                .chain(n.to_le_bytes().iter())
                .copied()
                .collect(),
            None => vec![0; 16],
        };
        assert_eq!(
            &got.bytes[100..116],
            &want[..],
            "page {page} at read point {}",
            got.read_point
        );
    }
}

#[test]
fn commits_need_four_segments_and_survive_storage_restarts() {
    let mut c = Cluster::start();
    run(async {
        let client = Client::connect(c.computed_addr).await.unwrap();
        assert_eq!(client.info.pages, 128);
        let mut n = 0;
        // Once every node is connected, commits flow.
        for _ in 0..20 {
            n += 1;
            commit(&client, n).await;
        }

        // Three nodes held back: a commit stalls, no error; one back: it completes.
        for i in [0, 1, 2] {
            c.node(i).signal(libc::SIGSTOP);
        }
        n += 1;
        let pending = commit(&client, n);
        tokio::pin!(pending);
        assert!(
            tokio::time::timeout(STALL_WINDOW, &mut pending).await.is_err(),
            "acknowledged with 3 segments"
        );
        c.node(2).signal(libc::SIGCONT);
        let lsn = pending.await;
        let info = client.volume_info().await.unwrap();
        assert!(info.vdl >= lsn);
        for i in [0, 1] {
            c.node(i).signal(libc::SIGCONT);
        }

        // Two nodes killed: commits go on.
        c.kill(3);
        c.kill(4);
        for _ in 0..20 {
            n += 1;
            commit(&client, n).await;
        }
        check_reads(&client, n).await;

        // A third killed: stall; one restarted: resume.
        c.kill(5);
        n += 1;
        let pending = commit(&client, n);
        tokio::pin!(pending);
        assert!(
            tokio::time::timeout(STALL_WINDOW, &mut pending).await.is_err(),
            "acknowledged with 3 segments"
        );
        c.start_node(4);
        pending.await;
        for _ in 0..10 {
            n += 1;
            commit(&client, n).await;
        }
        check_reads(&client, n).await;

        // Every node restarted: reads still return the committed data.
        c.start_node(3);
        c.start_node(5);
        for i in 0..3 {
            c.kill(i);
            c.start_node(i);
        }
        n += 1;
        commit(&client, n).await;
        check_reads(&client, n).await;

        // Bad requests get a clear error; the connection goes on.
        let err = client.read(1000).await.unwrap_err();
        assert!(err.to_string().contains("outside the volume"), "{err}");
        let err = client
            .commit(vec![PageWrite::Range {
                page: 1,
                offset: 8190,
                bytes: vec![1; 4],
            }])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("run past"), "{err}");
        n += 1;
        commit(&client, n).await;
    });
    // SIGTERM: computed exits 0.
    let status = c.computed.take().unwrap().terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn many_concurrent_clients_and_transactions() {
    let c = Cluster::start();
    run(async {
        let client = std::sync::Arc::new(Client::connect(c.computed_addr).await.unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..8u64 {
            let client = client.clone();
            tasks.spawn(async move {
                let mut last = 0;
                for i in 0..50u64 {
                    let page = t * 8 + i % 8;
                    let lsn = client.commit(vec![stamp(page, i)]).await.expect("commit");
                    assert!(lsn > 0);
                    last = last.max(lsn);
                }
                last
            });
        }
        let mut last = 0;
        while let Some(r) = tasks.join_next().await {
            last = last.max(r.unwrap());
        }
        assert!(client.volume_info().await.unwrap().vdl >= last);
        // Each task's pages end with its last stamp.
        for t in 0..8u64 {
            for k in 0..8u64 {
                let page = t * 8 + k;
                let newest = (0..50u64).rev().find(|i| i % 8 == k).unwrap();
                let got = client.read(page).await.unwrap();
                assert_eq!(&got.bytes[108..116], &newest.to_le_bytes());
            }
        }
    });
}

/// computed killed with -9 in the middle of a stream of commits, then
/// started again on the same volume: it recovers (a new epoch, the VDL at
/// least every acknowledged commit), every acknowledged commit reads back,
/// and new commits go on above it. Then once more with a storage node down
/// during the recovery.
#[test]
fn computed_recovers_the_volume_after_kill_9() {
    let mut c = Cluster::start();
    run(async {
        let client = Client::connect(c.computed_addr).await.unwrap();
        assert_eq!(client.info.epoch, 1, "a fresh volume starts at epoch 1");
        let mut n = 0;
        let mut acked = 0;
        for _ in 0..40 {
            n += 1;
            acked = acked.max(commit(&client, n).await);
        }
        // Commits in flight when computed dies may or may not survive.
        let client = std::sync::Arc::new(client);
        let mut inflight = Vec::new();
        for k in 1..=20 {
            let cl = client.clone();
            inflight.push(tokio::spawn(async move { cl.commit(vec![stamp(k % 64, n + k)]).await }));
        }
        c.computed.take().unwrap().kill9();
        for t in inflight {
            let _ = t.await;
        }
        drop(client);

        c.start_computed();
        let client = Client::connect(c.computed_addr).await.unwrap();
        let info = client.volume_info().await.unwrap();
        assert_eq!(info.epoch, 2, "recovery takes a new epoch");
        assert!(
            info.vdl >= acked,
            "VDL {} is below an acknowledged commit at {acked}",
            info.vdl
        );
        // The stamps of commits 1..=40 are there unless a later one (in
        // flight at the kill, so maybe committed) wrote the same page.
        for page in 64..128 {
            let got = client.read(page).await.expect("read");
            let want: Vec<u8> = match (1..=n).rev().find(|m| m % 64 == page % 64) {
                Some(m) => page
                    .to_le_bytes()
                    .iter()
                    .chain(m.to_le_bytes().iter())
                    .copied()
                    .collect(),
                None => vec![0; 16],
            };
            assert_eq!(&got.bytes[100..116], &want[..], "page {page} after recovery");
        }
        // New commits go on above the recovered VDL, and read back.
        let first = commit(&client, 1000).await;
        assert!(first > info.vdl);
        for m in 0..64 {
            commit(&client, m + 1).await;
        }
        check_reads(&client, 64).await;
        drop(client);

        // Again, with one storage node down while computed recovers: a
        // write quorum is enough; the node installs the epoch when back.
        c.computed.take().unwrap().kill9();
        c.kill(5);
        c.start_computed();
        let client = Client::connect(c.computed_addr).await.unwrap();
        assert_eq!(client.volume_info().await.unwrap().epoch, 3);
        check_reads(&client, 64).await;
        c.start_node(5);
        for m in 0..64 {
            commit(&client, m + 1).await;
        }
        check_reads(&client, 64).await;
    });
}

/// A second computed started on the same volume recovers it at a new
/// epoch. The first learns it at its next write (the segments refuse its
/// epoch): it closes its clients and exits with status 3, instead of
/// lingering on its port refusing every client for ever.
#[test]
fn a_fenced_computed_closes_its_clients_and_exits() {
    let mut c = Cluster::start();
    run(async {
        let first = Client::connect(c.computed_addr).await.unwrap();
        commit(&first, 1).await;

        let file = c.dir.path().join("cluster.toml");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_computed"));
        cmd.args(["run", "--cluster", file.to_str().unwrap(), "--listen"])
            .arg(free_port().to_string());
        let second = Daemon::start(cmd);
        // Its Hello is answered once it has recovered the volume.
        let taker = Client::connect(second.addr).await.unwrap();
        assert_eq!(taker.info.epoch, 2);

        // The first writer's next commit meets the new epoch: never
        // acknowledged; its connection is closed.
        let late = tokio::time::timeout(Duration::from_secs(30), commit_result(&first, 2))
            .await
            .expect("the fenced writer left its client waiting");
        assert!(late.is_err(), "a fenced writer acknowledged a commit: {late:?}");
        let status = c
            .computed
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(30))
            .expect("the fenced computed is still running");
        assert_eq!(status.code(), Some(3), "{status:?}");
        assert!(Client::connect(c.computed_addr).await.is_err(), "still listening");

        // The new writer goes on.
        let lsn = commit(&taker, 3).await;
        assert!(lsn > 1);
        for (page, n) in [(1u64, 1u64), (3, 3)] {
            let got = taker.read(page).await.expect("read");
            assert_eq!(&got.bytes[108..116], &n.to_le_bytes(), "page {page}");
        }
        // The refused commit is not there.
        assert_eq!(&taker.read(2).await.expect("read").bytes[100..116], &[0u8; 16]);
    });
}

async fn commit_result(client: &Client, n: u64) -> Result<u64, computed::client::ClientError> {
    client.commit(vec![stamp(n % 64, n), stamp(64 + n % 64, n)]).await
}
