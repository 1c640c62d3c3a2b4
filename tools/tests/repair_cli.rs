//! `storctl repair`, with real processes on 127.0.0.1: its flags and exit
//! codes, a gap fill on a dev cluster, and segments moved to spare nodes of
//! an 8-node dev cluster (a node lost for good; a run killed mid-change,
//! computed killed too, and a run again; a move that cannot finish, rolled
//! back; a replaced node added back).

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// A cluster file whose nodes and computed all listen nowhere.
fn nowhere_cluster(dir: &std::path::Path) -> (String, SocketAddr) {
    let mut nodes = closed_ports(9);
    let computed = nodes.pop().unwrap();
    let file = dir.join("cluster.toml");
    std::fs::write(&file, computed::cluster::local_cluster_toml(1, 1, 64, computed, &nodes)).unwrap();
    (file.to_string_lossy().into_owned(), computed)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("repair-cli-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn assert_no_panic(out: &std::process::Output) {
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_flags_are_usage_errors_and_unknown_nodes_are_named() {
    let dir = tempdir();
    let (file, _) = nowhere_cluster(dir.path());
    // Usage errors (2), each naming the flag that is missing.
    for (args, flag) in [
        (vec!["--pg", "0", "--replace", "6"], "--with"),
        (vec!["--replace", "6", "--with", "7"], "--pg"),
        (vec!["--node", "6"], "--with"),
        (vec!["--pg", "0", "--with", "7"], "--with"),
        (vec!["--pg", "0", "--abort", "--replace", "6", "--with", "7"], "--abort"),
        (vec![], "--pg"),
    ] {
        let mut all = vec!["repair", "--cluster", &file];
        all.extend_from_slice(&args);
        let out = storctl(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(flag), "{args:?}: {}", text(&out.stderr));
        assert_no_panic(&out);
    }
    // A node the cluster file does not have: 8, saying what to do.
    for args in [
        vec!["--pg", "0", "--replace", "6", "--with", "9"],
        vec!["--node", "9", "--with", "7"],
    ] {
        let mut all = vec!["repair", "--cluster", &file];
        all.extend_from_slice(&args);
        let out = storctl(&all);
        assert_eq!(out.status.code(), Some(8), "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("add node 9 to the cluster file"),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_no_panic(&out);
    }
    let out = storctl(&["repair", "--cluster", &file, "--pg", "3"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--pg 3"), "{}", text(&out.stderr));
    let missing = dir.path().join("missing.toml");
    let out = storctl(&["repair", "--cluster", missing.to_str().unwrap(), "--pg", "0"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("missing.toml"), "{}", text(&out.stderr));
    let help = storctl(&["repair", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(
        text(&help.stdout).contains("Exit status: 0 nothing needed"),
        "{}",
        text(&help.stdout)
    );
}

#[test]
fn unreachable_computed_or_nodes_exit_8_named() {
    let dir = tempdir();
    let (file, computed) = nowhere_cluster(dir.path());
    for args in [
        vec!["--pg", "0", "--replace", "6", "--with", "7"],
        vec!["--pg", "0", "--abort"],
        vec!["--node", "6", "--with", "7"],
    ] {
        let mut all = vec!["repair", "--cluster", &file];
        all.extend_from_slice(&args);
        let out = storctl(&all);
        assert_eq!(out.status.code(), Some(8), "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(&format!("computed at {computed} is unreachable")),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_no_panic(&out);
    }
    // A gap fill needs no computed, but some node of the PG.
    let out = storctl(&["repair", "--cluster", &file, "--pg", "0", "--json"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "error");
    assert!(
        report["pgs"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no storage node of PG 0 answers"),
        "{report}"
    );
    // Into a closed pipe: quietly, by SIGPIPE.
    let out = run_into_closed_pipe(STORCTL, &["repair", "--cluster", &file, "--pg", "0"]);
    assert_quiet_sigpipe("storctl repair", &out);
}

/// A node down while more was written than computed holds for it: once it
/// is back, `repair --pg` waits for it to fill its gap from its peers
/// (exit 1), and a second run finds nothing to do (exit 0). With computed
/// down: a gap fill still runs, a move does not (8).
#[test]
fn a_gap_is_filled_and_a_second_run_finds_nothing_to_do() {
    let c = cluster_with_small_hold();
    let file = c.cluster_file();
    let journal = c.path().join("journal");
    kill_node(&c, 6);
    commit_with_journal(&c, &journal, 4, None);
    start_node(&c, 6);
    let first = storctl(&["repair", "--cluster", &file, "--pg", "0", "--json", "--timeout", "100"]);
    expect_exit(&first, 1);
    let report: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(report["pgs"][0]["result"], "repaired", "{report}");
    let target = report["pgs"][0]["target"].as_u64().unwrap();
    assert!(target > 0, "{report}");
    let v = status(&c);
    let seg6 = v["pgs"][0]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["node"] == 6)
        .cloned()
        .unwrap();
    assert!(seg6["scl"].as_u64().unwrap() >= target, "{v}");

    let second = storctl(&["repair", "--cluster", &file, "--pg", "0"]);
    expect_exit(&second, 0);
    assert!(
        text(&second.stdout).contains("every segment up is at the PGCL"),
        "{}",
        text(&second.stdout)
    );

    // computed down: the gap fill still answers; a move needs the writer.
    let computed = c.pid("computed");
    // SAFETY: the dev cluster's computed, by its PID.
    unsafe { libc::kill(computed, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || pid_gone(computed)));
    let fill = storctl(&["repair", "--cluster", &file, "--pg", "0"]);
    assert_eq!(fill.status.code(), Some(0), "{}", text(&fill.stderr));
    let replace = replace_in_pg0(&file, "6", "5", &[]);
    assert_eq!(replace.status.code(), Some(8), "{}", text(&replace.stderr));
    assert!(
        text(&replace.stderr).contains("is unreachable"),
        "{}",
        text(&replace.stderr)
    );
}

/// `repair --pg` fills a gap now, not at the nodes' next gossip round:
/// here every node gossips once an hour (and once at start). Node 6 is
/// stopped (SIGSTOP) while more is written than computed holds for it, so
/// once it runs again it lacks records nothing but gossip brings back.
/// Nothing does until the repair asks its node to fill its gaps (a PG not
/// asked yet stays behind); then it reaches the PGCL, and with nodes 1 and
/// 2 down it carries the write quorum: every journaled commit reads back.
#[test]
fn a_gap_fill_starts_at_once_whatever_the_gossip_interval() {
    let c = cluster_with_small_hold();
    let file = c.cluster_file();
    let config = c.path().join("hourly-gossip.toml");
    std::fs::write(&config, "gossip_interval_ms = 3600000\n").unwrap();
    let config = config.to_string_lossy().into_owned();
    for node in 1..=6 {
        kill_node(&c, node);
        start_node_with(&c, node, &["--config", &config]);
    }
    let journal = c.path().join("journal");
    let six = node_pid(&c, 6).unwrap();
    // SAFETY: a daemon this test started, by its PID.
    unsafe { libc::kill(six, libc::SIGSTOP) };
    commit_with_journal(&c, &journal, 4, None);
    // SAFETY: as above.
    unsafe { libc::kill(six, libc::SIGCONT) };
    let behind = |v: &serde_json::Value, pg: usize| {
        let pg = &v["pgs"][pg];
        let seg6 = pg["segments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["node"] == 6)
            .cloned();
        seg6.and_then(|s| s["scl"].as_u64())
            .is_some_and(|scl| scl < pg["pgcl"].as_u64().unwrap_or(0))
    };
    // Computed takes node 6 back and sends it new records above its gaps;
    // the gaps stay.
    std::thread::sleep(Duration::from_secs(2));
    let v = status(&c);
    assert!(
        behind(&v, 0) && behind(&v, 1),
        "node 6 should lack what computed let go of: {v}"
    );

    for pg in ["0", "1"] {
        let out = storctl(&["repair", "--cluster", &file, "--pg", pg, "--json", "--timeout", "60"]);
        expect_exit(&out, 1);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["pgs"][0]["result"], "repaired", "{report}");
        if pg == "0" {
            // PG 1, not asked yet, is still behind.
            let v = status(&c);
            assert!(behind(&v, 1), "{v}");
        }
    }
    let log = std::fs::read_to_string(c.path().join("logs").join("storaged-6.again.log")).unwrap();
    assert!(log.contains("asked to fill the segment's gaps now"), "{log}");

    carries_the_quorum(&c, 6, [1, 2], &journal);
}

fn eight_nodes_one_pg() -> ClusterDir {
    let c = ClusterDir::new();
    let out = c.up(&["--nodes", "8", "--pgs", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    c
}

/// PG 0's membership as `storctl status --json` shows it: (epoch,
/// changing, old set sorted, new set sorted).
fn membership(c: &ClusterDir) -> Option<(u64, bool, Vec<u64>, Vec<u64>)> {
    let v = status(c);
    let m = &v["pgs"][0]["membership"];
    let set = |k: &str| -> Vec<u64> {
        let mut s: Vec<u64> = m[k]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        s.sort_unstable();
        s
    };
    Some((m["epoch"].as_u64()?, m["changing"].as_bool()?, set("old"), set("new")))
}

/// An 8-node dev cluster with one PG took 2 s of journaled commits; node 6
/// was then killed and `repair --node 6 --with 7` moved its segment to
/// spare node 7 (exit 1, "moved"). Returns the cluster and the journal.
fn node_6_lost_and_moved_to_7() -> (ClusterDir, std::path::PathBuf) {
    let c = eight_nodes_one_pg();
    let file = c.cluster_file();
    let journal = c.path().join("journal");
    commit_with_journal(&c, &journal, 2, None);
    kill_node(&c, 6);
    let moved = storctl(&[
        "repair",
        "--cluster",
        &file,
        "--node",
        "6",
        "--with",
        "7",
        "--json",
        "--timeout",
        "100",
    ]);
    expect_exit(&moved, 1);
    let report: serde_json::Value = serde_json::from_slice(&moved.stdout).unwrap();
    assert_eq!(report["pgs"][0]["result"], "moved", "{report}");
    let (_, changing, old, _) = membership(&c).expect("a membership");
    assert!(!changing);
    assert_eq!(old, vec![1, 2, 3, 4, 5, 7]);
    (c, journal)
}

/// A move onto a node with no room for the segment is refused before it
/// starts, by `--replace` and by `--node` alike: exit 4, naming the room
/// the node has and what a segment takes, with the PG's membership left as
/// it was (nothing to roll back). The segment then moves to a node with
/// room. (A node that loses its room after the check refuses the PG's
/// membership; `repair` then stops waiting and says so: see computed's
/// `a_refused_membership_does_not_stop_commits` and the refusal list of
/// `PgStateOk`.)
#[test]
fn a_move_onto_a_node_without_room_is_refused_before_it_starts() {
    let c = eight_nodes_one_pg();
    let file = c.cluster_file();
    kill_node(&c, 7);
    std::fs::remove_file(c.path().join("dev7")).unwrap();
    let dev = format!("{}/dev7", c.arg());
    let small = run(
        storaged_bin().to_str().unwrap(),
        &["format", "--device", &dev, "--node-id", "7", "--size", "8m"],
    );
    assert_eq!(small.status.code(), Some(0), "{}", text(&small.stderr));
    start_node(&c, 7);

    let out = replace_in_pg0(&file, "6", "7", &["--json", "--timeout", "100"]);
    expect_exit(&out, 4);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = report["pgs"][0]["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("node 7 has no room for 1 more segment")
            && message.contains("nothing was changed")
            && message.contains("--pg 0 --replace 6 --with ID"),
        "{report}"
    );
    let (_, changing, old, _) = membership(&c).expect("a membership");
    assert!(!changing, "the membership was not touched");
    assert_eq!(old, vec![1, 2, 3, 4, 5, 6]);

    let node = storctl(&[
        "repair",
        "--cluster",
        &file,
        "--node",
        "6",
        "--with",
        "7",
        "--timeout",
        "100",
    ]);
    expect_exit(&node, 4);
    let said = text(&node.stdout);
    assert!(
        said.contains("node 7 has no room") && said.contains("--node 6 --with ID"),
        "{said}"
    );
    let (_, changing, old, _) = membership(&c).expect("a membership");
    assert!(!changing);
    assert_eq!(old, vec![1, 2, 3, 4, 5, 6]);

    let moved = replace_in_pg0(&file, "6", "8", &["--json", "--timeout", "100"]);
    expect_exit(&moved, 1);
    let (_, _, old, _) = membership(&c).expect("a membership");
    assert_eq!(old, vec![1, 2, 3, 4, 5, 8]);
}

/// Node 6 lost for good: its segment moves to spare node 7; then with two
/// more of the original members gone the PG still takes commits (it needs
/// node 7 for its quorum), every commit acknowledged before reads back, and
/// a second run has nothing to do.
#[test]
fn a_lost_nodes_segments_move_to_a_spare_and_carry_the_quorum() {
    let (c, journal) = node_6_lost_and_moved_to_7();
    let file = c.cluster_file();
    let text_status = storctl(&["status", "--cluster", &file]);
    assert!(
        text(&text_status.stdout).contains("membership epoch"),
        "{}",
        text(&text_status.stdout)
    );

    // The PG is scrubbed where it now is: on node 7, not on the dead node 6.
    let scrubbed = storctl(&["scrub", "--cluster", &file, "--pg", "0", "--json"]);
    expect_exit(&scrubbed, 0);
    let report: serde_json::Value = serde_json::from_slice(&scrubbed.stdout).unwrap();
    let ids: Vec<u64> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 7], "{report}");

    carries_the_quorum(&c, 7, [4, 5], &journal);

    let again = storctl(&["repair", "--cluster", &file, "--node", "6", "--with", "7"]);
    expect_exit(&again, 0);
}

/// Node 6, replaced while it was down, comes back and is added to the PG
/// again in place of node 5: it drops the records it held from before
/// above its floor (a recovery may have annulled some while it was out,
/// which it would never learn), refills from its peers, and then carries
/// the quorum with two of the original members gone; every commit
/// acknowledged reads back.
#[test]
fn a_replaced_node_added_back_refills_and_carries_the_quorum() {
    let (c, journal) = node_6_lost_and_moved_to_7();
    let file = c.cluster_file();
    commit_with_journal(&c, &journal, 2, None);

    start_node(&c, 6);
    let back = replace_in_pg0(&file, "5", "6", &["--timeout", "100"]);
    expect_exit(&back, 1);
    let (_, changing, old, _) = membership(&c).expect("a membership");
    assert!(!changing);
    assert_eq!(old, vec![1, 2, 3, 4, 6, 7]);
    carries_the_quorum(&c, 6, [1, 2], &journal);
}

/// A move to a node that is down cannot finish: storctl says so (4) with
/// the commands to wait again or roll back; killed mid-change (kill -9),
/// computed killed and started again, and run again once the node is
/// back, it finishes; a move rolled back with
/// --abort goes back to the old set, and an abort with nothing under way
/// has nothing to do.
#[test]
fn an_interrupted_move_is_finished_by_a_second_run_and_one_that_cannot_finish_is_rolled_back() {
    let c = eight_nodes_one_pg();
    let file = c.cluster_file();
    commit_with_journal(&c, &c.path().join("journal"), 1, None);
    kill_node(&c, 8);

    // Killed mid-change.
    let child = Command::new(STORCTL)
        .args(replace_args(&file, "6", "8", &[]))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let changing = wait_until(Duration::from_secs(60), || {
        membership(&c).is_some_and(|(_, changing, _, new)| changing && new.contains(&8))
    });
    // SAFETY: our own child, by its PID.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = wait_bounded(child, Duration::from_secs(10));
    assert!(changing, "no change under way: {:?}", membership(&c));

    // Node 8 still down: the move cannot finish; where it stands and what to run.
    let stuck = replace_in_pg0(&file, "6", "8", &["--timeout", "2"]);
    expect_exit(&stuck, 4);
    let out = text(&stuck.stdout);
    assert!(
        out.contains("still under way") && out.contains("--abort") && out.contains("node 8 at"),
        "{out}"
    );

    // computed crashes mid-change too: the change is in the segments, and
    // the writer that recovers carries it on.
    let computed = c.pid("computed");
    // SAFETY: the dev cluster's computed, by its PID.
    unsafe { libc::kill(computed, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || pid_gone(computed)));
    start_computed(&c);
    start_node(&c, 8);
    let finished = replace_in_pg0(&file, "6", "8", &["--timeout", "100"]);
    expect_exit(&finished, 1);
    let (_, changing, old, _) = membership(&c).unwrap();
    assert!(!changing);
    assert_eq!(old, vec![1, 2, 3, 4, 5, 8]);
    let again = replace_in_pg0(&file, "6", "8", &[]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));

    // A move to a node that is down, rolled back.
    kill_node(&c, 7);
    let stuck = replace_in_pg0(&file, "5", "7", &["--timeout", "3"]);
    expect_exit(&stuck, 4);
    let abort = storctl(&["repair", "--cluster", &file, "--pg", "0", "--abort", "--timeout", "60"]);
    expect_exit(&abort, 1);
    assert!(text(&abort.stdout).contains("rolled back"), "{}", text(&abort.stdout));
    let (_, changing, old, _) = membership(&c).unwrap();
    assert!(!changing);
    assert_eq!(old, vec![1, 2, 3, 4, 5, 8]);
    let nothing = storctl(&["repair", "--cluster", &file, "--pg", "0", "--abort"]);
    assert_eq!(nothing.status.code(), Some(0), "{}", text(&nothing.stderr));
}

/// `out` exited with `code`; its stdout and stderr are shown if not.
/// `storctl repair --cluster FILE --pg 0 --replace F --with G`, then `extra`.
fn replace_args<'a>(file: &'a str, f: &'a str, g: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["repair", "--cluster", file, "--pg", "0", "--replace", f, "--with", g];
    args.extend_from_slice(extra);
    args
}

/// Run [`replace_args`].
fn replace_in_pg0(file: &str, f: &str, g: &str, extra: &[&str]) -> std::process::Output {
    storctl(&replace_args(file, f, g, extra))
}

fn expect_exit(out: &std::process::Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
