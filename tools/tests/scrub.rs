//! `storctl scrub` as a script runs it: its flags, its --help, its exit
//! statuses when the cluster file or a node fails, a closed stdout; and
//! `storctl status` showing each node's scrubbing on a dev cluster. Every
//! command is bounded (support::run kills it by PID past its limit).

mod support;

use std::path::Path;

use support::*;

/// A cluster file of six nodes on ports nothing listens on.
fn unreachable_cluster(dir: &Path) -> String {
    let mut nodes = closed_ports(7);
    let computed = nodes.pop().unwrap();
    let text = computed::cluster::local_cluster_toml(1, 2, 64, computed, &nodes);
    let file = dir.join("cluster.toml");
    std::fs::write(&file, text).unwrap();
    file.to_string_lossy().into_owned()
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("storctl-scrub-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn assert_no_panic(out: &std::process::Output) {
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn help_documents_the_exit_statuses_and_the_json() {
    let out = storctl(&["scrub", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for needle in [
        "--cluster",
        "--node",
        "--pg",
        "--json",
        "Exit status: 0 clean; 1 damage found and all of it repaired; 4 damage",
        "8 operational error",
        "2 usage error",
        "left_listed",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}: {help}");
    }
    let top = text(&storctl(&["--help"]).stdout);
    assert!(top.contains("scrub"), "{top}");
}

#[test]
fn bad_flags_are_usage_errors_named_and_never_a_panic() {
    let dir = scratch();
    let file = unreachable_cluster(dir.path());
    for (args, needle) in [
        (vec!["scrub"], "--cluster"),
        (vec!["scrub", "--cluster", &file, "--pg", "x"], "--pg"),
        (vec!["scrub", "--cluster", &file, "--node=-1"], "--node"),
        (vec!["scrub", "--cluster", &file, "--no-such-flag"], "--no-such-flag"),
        // Values the cluster file does not have: nothing is asked of any node.
        (vec!["scrub", "--cluster", &file, "--node", "9"], "--node 9"),
        (vec!["scrub", "--cluster", &file, "--pg", "2"], "--pg 2"),
    ] {
        let out = storctl(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{args:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_no_panic(&out);
    }
}

#[test]
fn an_unreadable_cluster_file_exits_8_naming_it() {
    let dir = scratch();
    let missing = dir.path().join("missing.toml");
    let out = storctl(&["scrub", "--cluster", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("missing.toml"), "{}", text(&out.stderr));
    let junk = dir.path().join("junk.toml");
    std::fs::write(&junk, "[volume\nid = ").unwrap();
    let out = storctl(&["scrub", "--cluster", junk.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("junk.toml"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    assert_no_panic(&out);
}

#[test]
fn unreachable_nodes_exit_8_each_named_with_the_report_still_printed() {
    let dir = scratch();
    let file = unreachable_cluster(dir.path());
    let out = storctl(&["scrub", "--cluster", &file, "--json"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "error");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6);
    let stderr = text(&out.stderr);
    for n in nodes {
        assert!(n["error"].as_str().unwrap().contains("Connection refused"), "{n}");
        assert_eq!(n["pass"], serde_json::Value::Null);
        let named = format!("node {} ({})", n["id"], n["address"].as_str().unwrap());
        assert!(stderr.contains(&named), "{named} not in {stderr}");
    }

    // One node, one PG: only that node is asked.
    let out = storctl(&["scrub", "--cluster", &file, "--node", "2", "--pg", "0"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.starts_with("scrub of volume 1 (PG 0): a node could not be scrubbed"),
        "{report}"
    );
    assert!(report.contains("node 2 (") && !report.contains("node 1 ("), "{report}");
    assert!(report.contains("total: 0 of 1 node(s) scrubbed"), "{report}");
    assert_no_panic(&out);
}

#[test]
fn a_closed_stdout_ends_scrub_quietly() {
    let dir = scratch();
    let file = unreachable_cluster(dir.path());
    for json in [false, true] {
        let mut args = vec!["scrub", "--cluster", &file];
        if json {
            args.push("--json");
        }
        let out = run_into_closed_pipe(STORCTL, &args);
        assert_quiet_sigpipe(&format!("storctl {args:?}"), &out);
    }
}

/// A dev cluster: `storctl status` shows every node's scrubbing (known,
/// since every node answers ScrubStatus) and its device's room (a
/// segment a PG it holds takes some of its page store), and the JSON
/// carries both.
#[test]
fn status_shows_each_nodes_scrubbing_and_room() {
    let c = ClusterDir::new();
    let up = c.up(&["--pgs", "2"]);
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));
    let out = storctl(&["status", "--cluster", &c.cluster_file(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for n in v["nodes"].as_array().unwrap() {
        assert!(n["scrub"].is_object(), "{n}");
        assert_eq!(n["scrub_error"], serde_json::Value::Null, "{n}");
        assert_eq!(n["scrub"]["left_now"], 0, "{n}");
        let room = &n["room"];
        let (store, free) = (
            room["page_store_bytes"].as_u64(),
            room["page_store_free_bytes"].as_u64(),
        );
        assert!(
            store.zip(free).is_some_and(|(s, f)| f < s),
            "every node holds a segment: {n}"
        );
        assert!(room["log_free_bytes"].as_u64() <= room["log_bytes"].as_u64(), "{n}");
    }
    let human = text(&storctl(&["status", "--cluster", &c.cluster_file()]).stdout);
    assert_eq!(human.matches("  scrub: ").count(), 6, "{human}");
    assert_eq!(human.matches("  room: page store ").count(), 6, "{human}");
    assert!(!human.contains("scrub: unknown"), "{human}");
}

/// A clean dev cluster scrubs clean: every node runs its pass and reports
/// no damage.
#[test]
fn a_clean_dev_cluster_scrubs_clean() {
    let c = ClusterDir::new();
    let up = c.up(&["--pgs", "2"]);
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));
    let out = storctl(&["scrub", "--cluster", &c.cluster_file(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "clean");
    assert_eq!(v["left"], 0);
    for n in v["nodes"].as_array().unwrap() {
        let pass = &n["pass"];
        assert!(pass["bytes_read"].as_u64().unwrap() > 0, "{n}");
        let areas = pass["areas"].as_array().unwrap();
        assert!(areas.iter().any(|a| a["area"] == "log"), "{n}");
        assert!(
            areas.iter().any(|a| a["area"] == "segment"),
            "the log and a segment: {n}"
        );
    }
    // One segment on one node: the log and that segment are read.
    let cluster = computed::cluster::Cluster::load(Path::new(&c.cluster_file())).unwrap();
    let pg = cluster
        .placement
        .iter()
        .position(|slots| slots.contains(&1))
        .unwrap()
        .to_string();
    let out = storctl(&[
        "scrub",
        "--cluster",
        &c.cluster_file(),
        "--node",
        "1",
        "--pg",
        &pg,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1);
    let areas = v["nodes"][0]["pass"]["areas"].as_array().unwrap();
    assert!(
        areas
            .iter()
            .any(|a| a["pg"].as_u64().map(|p| p.to_string()) == Some(pg.clone())),
        "{v}"
    );
}

/// `storctl inspect --json` of node `node`'s device (it may be running).
fn inspect(c: &ClusterDir, node: u64) -> serde_json::Value {
    let dev = c.path().join(format!("dev{node}"));
    let out = storctl(&["inspect", "--device", &dev.to_string_lossy(), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("inspect dev{node}: {e}: {}", text(&out.stderr)))
}

/// The byte offset of the slot holding the current version of some page
/// of node `node`'s segments (the valid page-version block with the higher
/// LSN of a page's two slots), skipping `skip` such pages.
fn current_version_slot(c: &ClusterDir, report: &serde_json::Value, node: u64, skip: usize) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(c.path().join(format!("dev{node}"))).unwrap();
    let mut found = 0;
    for seg in report["segments"].as_array().unwrap() {
        let start = seg["extent_start_block"].as_u64().unwrap();
        let page_bytes = seg["page_bytes"].as_u64().unwrap();
        let slot_blocks = (page_bytes + 32).div_ceil(4040);
        for local in 0..seg["pg_pages"].as_u64().unwrap() {
            let lsn_at = |slot: u64| {
                let at = (start + (2 * local + slot) * slot_blocks) * 4096;
                let mut h = [0u8; 40];
                f.read_exact_at(&mut h, at).unwrap();
                // Magic "STRD", kind 5 (a page version), seq = its LSN.
                (&h[0..4] == b"STRD" && h[6] == 5).then(|| (u64::from_le_bytes(h[32..40].try_into().unwrap()), at))
            };
            let best = [lsn_at(0), lsn_at(1)].into_iter().flatten().max();
            if let Some((_, at)) = best {
                if found == skip {
                    return at;
                }
                found += 1;
            }
        }
    }
    panic!("node {node} holds fewer than {} page versions: {report}", skip + 1)
}

/// Overwrite 4 KiB at `offset` of node `node`'s device with junk through
/// O_DIRECT, as a misbehaving disk would, under a running node.
fn write_junk_direct(c: &ClusterDir, node: u64, offset: u64) {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(c.path().join(format!("dev{node}")))
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: a fresh allocation of the layout's size, freed below.
    let buf = unsafe { std::alloc::alloc(layout) };
    assert!(!buf.is_null());
    // SAFETY: `buf` holds 4096 bytes.
    let junk = unsafe { std::slice::from_raw_parts_mut(buf, 4096) };
    for (i, b) in junk.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    let written = f.write_at(junk, offset);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    assert_eq!(written.unwrap(), 4096);
}

/// Flip bits in the middle of 512 bytes at `offset` (a stopped node's device).
fn flip_bytes(c: &ClusterDir, node: u64, offset: u64) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.path().join(format!("dev{node}")))
        .unwrap();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, offset + 1024).unwrap();
    for x in &mut b {
        *x ^= 0x5A;
    }
    f.write_all_at(&b, offset + 1024).unwrap();
    f.sync_all().unwrap();
}

fn scrub_json(c: &ClusterDir) -> (Option<i32>, serde_json::Value, String) {
    let out = storctl(&["scrub", "--cluster", &c.cluster_file(), "--json"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), v, text(&out.stderr))
}

/// Damage on three nodes, in the log and in the page store, written with
/// the node stopped (node 4: two live log blocks; node 5: a page version)
/// and under the running node with O_DIRECT (node 6: a page version).
/// Node 4's log damage is found at start-up and refilled from its peers;
/// `storctl scrub` finds the page versions and repairs them from peers'
/// copies (exit 1), then finds nothing (exit 0); every acknowledged commit
/// reads back, and `storctl inspect` finds every device clean.
#[test]
fn damage_on_stopped_and_running_nodes_is_found_and_repaired_by_storctl_scrub() {
    let c = ClusterDir::new();
    let up = c.up(&[]);
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));
    // Page versions on every node (coalesced while idle), then a second
    // load during which node 4 is killed: its log holds live records.
    let journal = c.path().join("journal");
    commit_with_journal(&c, &journal, 2, None);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let journal2 = c.path().join("journal2");
    commit_with_journal(&c, &journal2, 4, Some(4));

    let report = inspect(&c, 4);
    let (tail, head) = (
        report["log"]["tail_seq"].as_u64().unwrap(),
        report["log"]["head_seq"].as_u64().unwrap(),
    );
    assert!(head > tail + 8, "node 4's live log is too short to damage: {report}");
    let log_start = report["superblock"]["log_start_block"].as_u64().unwrap();
    let log_blocks = report["superblock"]["log_blocks"].as_u64().unwrap();
    let middle = tail + (head - tail) / 2;
    for seq in middle..middle + 2 {
        flip_bytes(&c, 4, (log_start + (seq - 1) % log_blocks) * 4096);
    }
    start_node(&c, 4);
    assert!(
        wait_until(std::time::Duration::from_secs(60), || caught_up(&c, 4)),
        "node 4 did not refill its log: {}\n{}",
        status(&c),
        log_tail(&c, "storaged-4.again")
    );

    // Node 5, idle and caught up, stopped; a current version damaged.
    std::thread::sleep(std::time::Duration::from_secs(1));
    kill_node(&c, 5);
    let slot5 = current_version_slot(&c, &inspect(&c, 5), 5, 0);
    flip_bytes(&c, 5, slot5);
    start_node(&c, 5);
    // Node 6 running: junk over a current version.
    let slot6 = current_version_slot(&c, &inspect(&c, 6), 6, 1);
    write_junk_direct(&c, 6, slot6);

    let (code, v, err) = scrub_json(&c);
    assert_eq!(code, Some(1), "damage found and repaired: {v}\n{err}");
    assert_eq!(v["status"], "repaired", "{v}");
    assert_eq!(v["left"], 0, "{v}");
    let found_on = |node: u64| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == node)
            .map_or(0, |n| n["pass"]["found"].as_u64().unwrap_or(0))
    };
    assert!(found_on(5) >= 1 && found_on(6) >= 1, "{v}");
    let (code, v, err) = scrub_json(&c);
    assert_eq!(code, Some(0), "a second scrub is clean: {v}\n{err}");

    // The second load wrote over the first one's pages: its journal holds
    // every page's latest acknowledged write.
    let verify = verify_only(&c.cluster_file(), &journal2);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify.stderr));
    assert!(
        text(&verify.stderr).contains("0 missing, 0 wrong"),
        "{}",
        text(&verify.stderr)
    );
    let down = storctl(&["dev-cluster", "down", "--dir", &c.arg()]);
    assert_eq!(down.status.code(), Some(0), "{}", text(&down.stderr));
    for node in 1..=6 {
        let r = inspect(&c, node);
        assert_eq!(r["status"], "clean", "dev{node}: {r}");
    }
}
