//! `storctl scrub` as a script runs it: its flags, its --help, its exit
//! statuses when the cluster file or a node fails, a closed stdout; and
//! `storctl status` showing each node's scrubbing on a dev cluster. Every
//! command is bounded (support::run kills it by PID past its limit).

mod support;

use std::net::SocketAddr;
use std::path::Path;

use support::*;

/// A cluster file of six nodes on ports nothing listens on.
fn unreachable_cluster(dir: &Path) -> String {
    let closed = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let nodes: Vec<SocketAddr> = (0..6).map(|_| closed()).collect();
    let text = computed::cluster::local_cluster_toml(1, 2, 64, closed(), &nodes);
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
/// since every node answers ScrubStatus), and the JSON carries it.
#[test]
fn status_shows_each_nodes_scrubbing() {
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
    }
    let human = text(&storctl(&["status", "--cluster", &c.cluster_file()]).stdout);
    assert_eq!(human.matches("  scrub: ").count(), 6, "{human}");
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
