//! storbench's cluster engine as scripts use it: stopped by a signal or by
//! a closed stdout, it leaves no daemon of its --local-cluster running; and
//! --verify-journal / --verify-only check acknowledged commits across a
//! kill -9 and restart of computed. Every command is bounded; every process
//! started is killed by PID at the end.

mod support;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    ClusterDir, STORBENCH, assert_quiet_sigpipe, pid_gone, pid_in, procs_in, run, run_into_closed_pipe, signal_of,
    storctl, text, wait_bounded, wait_until,
};
use tools::bench::verify_journal::{Entry, entry_line};

/// A dev cluster starts within this (7 daemons and a first commit).
const UP_LIMIT: Duration = Duration::from_secs(90);
/// storbench stops its cluster and exits within this after a signal.
const STOP_LIMIT: Duration = Duration::from_secs(60);

const DAEMONS: [&str; 7] = [
    "computed",
    "storaged-1",
    "storaged-2",
    "storaged-3",
    "storaged-4",
    "storaged-5",
    "storaged-6",
];

fn daemon_pids(dir: &Path) -> Option<Vec<i32>> {
    let mut pids = Vec::new();
    for name in DAEMONS {
        let pid = pid_in(dir, name)?;
        if pid_gone(pid) {
            return None;
        }
        pids.push(pid);
    }
    Some(pids)
}

#[test]
fn sigterm_sighup_or_sigint_stops_the_local_cluster_and_ends_storbench_by_it() {
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        let c = ClusterDir::new();
        let dir = c.path().join("local");
        let child = Command::new(STORBENCH)
            .args([
                "--engine=cluster",
                "--local-cluster=6",
                "--dir",
                dir.to_str().unwrap(),
                "--device-size=32m",
                "--runtime=10m",
                "--iodepth=2",
                "--output-format=json",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let bench = child.id() as i32;
        let mut pids = None;
        let up = wait_until(UP_LIMIT, || {
            pids = daemon_pids(&dir);
            pids.is_some()
        });
        if !up {
            // SAFETY: our own child, by PID.
            unsafe { libc::kill(bench, libc::SIGKILL) };
            let out = wait_bounded(child, STOP_LIMIT);
            panic!("the local cluster did not come up: {}", text(&out.stderr));
        }
        let pids = pids.unwrap();
        // SAFETY: our own child, by PID.
        unsafe { libc::kill(bench, signal) };
        let out = wait_bounded(child, STOP_LIMIT);
        let stderr = text(&out.stderr);
        assert_eq!(signal_of(&out.status), Some(signal), "{:?}: {stderr}", out.status);
        assert!(stderr.contains("stopping the local cluster"), "{stderr}");
        let left: Vec<i32> = pids.iter().copied().filter(|&p| !pid_gone(p)).collect();
        assert!(left.is_empty(), "signal {signal}: daemons left running: {left:?}");
        assert!(procs_in(&dir).is_empty(), "left running: {:?}", procs_in(&dir));
    }
}

#[test]
fn a_closed_stdout_still_stops_the_local_cluster() {
    let c = ClusterDir::new();
    let dir = c.path().join("local");
    let out = run_into_closed_pipe(
        STORBENCH,
        &[
            "--engine=cluster",
            "--local-cluster=6",
            "--dir",
            dir.to_str().unwrap(),
            "--device-size=32m",
            "--runtime=1",
            "--iodepth=2",
        ],
    );
    assert_quiet_sigpipe("storbench --local-cluster", &out);
    assert!(procs_in(&dir).is_empty(), "left running: {:?}", procs_in(&dir));
}

fn journal_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

/// Kills computed with SIGKILL and starts it again with the same command
/// line; returns once the cluster is healthy again.
fn restart_computed(c: &ClusterDir) -> std::process::Child {
    let pid = c.pid("computed");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // SAFETY: the cluster's computed, which this test started, by PID.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || pid_gone(pid)));
    let log = std::fs::File::create(c.path().join("logs").join("computed-restarted.log")).unwrap();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let healthy = wait_until(UP_LIMIT, || {
        storctl(&["status", "--cluster", &c.cluster_file()]).status.code() == Some(0)
    });
    assert!(healthy, "computed did not recover within {UP_LIMIT:?}");
    child
}

#[test]
fn a_verify_journal_is_checked_after_computed_is_killed_and_restarted() {
    let c = ClusterDir::new();
    let out = c.up(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let journal = c.path().join("journal");
    let journal_arg = journal.to_string_lossy().into_owned();
    let commit = |runtime: &str| {
        run(
            STORBENCH,
            &[
                "--engine=cluster",
                "--cluster",
                &c.cluster_file(),
                runtime,
                "--iodepth=4",
                "--bs=256",
                "--pages-per-txn=2",
                "--verify",
                "--verify-journal",
                &journal_arg,
                "--output-format=json",
            ],
        )
    };
    let first = commit("--runtime=2");
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let v: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let commits = v["jobs"][0]["write"]["total_ios"].as_u64().unwrap() as usize;
    assert_eq!(
        journal_lines(&journal),
        1 + commits,
        "a header and a line per acknowledged commit"
    );
    // A second run appends to the same journal.
    let second = commit("--runtime=1");
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let v: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    let more = v["jobs"][0]["write"]["total_ios"].as_u64().unwrap() as usize;
    assert_eq!(journal_lines(&journal), 1 + commits + more);

    let mut computed = restart_computed(&c);
    let verify_only = || support::verify_only(&c.cluster_file(), &journal);
    let out = verify_only();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("{} journaled commits", commits + more)),
        "{stderr}"
    );
    assert!(stderr.contains("0 missing, 0 wrong"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // A crash while a line was written: the torn line is ignored.
    let whole = std::fs::metadata(&journal).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
    f.write_all(b"c 1 99 256 3:0 3:2").unwrap();
    drop(f);
    let out = verify_only();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("torn"), "{}", text(&out.stderr));

    // A journaled commit that was never written: listed, exit 1.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(whole)
        .unwrap();
    let forged = Entry {
        committer: 99,
        seq: 12345,
        bs: 256,
        ranges: vec![(1, 512)],
    };
    let mut f = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
    f.write_all(entry_line(&forged).as_bytes()).unwrap();
    drop(f);
    let out = verify_only();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("page 1 bytes 512..768: journaled committer 99 commit 12345"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of "), "{stderr}");

    let _ = computed.kill();
    let _ = computed.wait();
}
