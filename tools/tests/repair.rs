//! Repair between peers, with the real daemons on 127.0.0.1: a segment that
//! lacks records — its node was down while more than computed holds was
//! written, its log had damaged blocks, its device was reformatted — refills
//! from its PG's peers by gossip, and then carries the write quorum with
//! two other nodes down, every acknowledged commit read back
//! (`storbench --verify-only` over the journal of the commits made while it
//! was behind).

mod support;

use std::time::Duration;

use support::*;

/// How long a node may take to catch up, at most (a few MiB on a debug build).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_node_down_past_computeds_hold_catches_up_by_gossip_and_carries_the_quorum() {
    let c = cluster_with_small_hold();
    let journal = c.path().join("journal");
    kill_node(&c, 6);
    commit_with_journal(&c, &journal, 3, None);
    assert!(!caught_up(&c, 6), "node 6 was down: {}", status(&c));
    start_node(&c, 6);
    assert!(
        wait_until(CATCH_UP_LIMIT, || caught_up(&c, 6)),
        "node 6 did not catch up: {}\n{}\n{}",
        status(&c),
        log_tail(&c, "storaged-6.again"),
        log_tail(&c, "storaged-1")
    );
    carries_the_quorum(&c, 6, [4, 5], &journal);
}

#[test]
fn a_node_with_damaged_log_blocks_refills_its_holes_and_carries_the_quorum() {
    let c = cluster_with_small_hold();
    let journal = c.path().join("journal");
    // Killed under load: its log holds records not yet coalesced.
    commit_with_journal(&c, &journal, 4, Some(6));
    // Three blocks in the middle of node 6's live log.
    let dev = c.path().join("dev6");
    let dev_arg = dev.to_string_lossy().into_owned();
    let inspect = storctl(&["inspect", "--device", &dev_arg, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let (tail, head) = (
        report["log"]["tail_seq"].as_u64().unwrap(),
        report["log"]["head_seq"].as_u64().unwrap(),
    );
    assert!(head > tail + 16, "node 6's live log is too short to damage: {report}");
    let log_start = report["superblock"]["log_start_block"].as_u64().unwrap();
    let log_blocks = report["superblock"]["log_blocks"].as_u64().unwrap();
    let middle = tail + (head - tail) / 2;
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        for seq in middle..middle + 3 {
            let block = log_start + (seq - 1) % log_blocks;
            f.write_all_at(&[0xA5; 512], block * 4096 + 1024).unwrap();
        }
        f.sync_all().unwrap();
    }
    start_node(&c, 6);
    assert!(
        wait_until(CATCH_UP_LIMIT, || caught_up(&c, 6)),
        "node 6 did not refill its holes: {}\n{}\n{}",
        status(&c),
        log_tail(&c, "storaged-6.again"),
        log_tail(&c, "storaged-1")
    );
    carries_the_quorum(&c, 6, [4, 5], &journal);
}

#[test]
fn a_reformatted_node_refills_every_segment_it_holds_and_carries_the_quorum() {
    let c = cluster_with_small_hold();
    let journal = c.path().join("journal");
    commit_with_journal(&c, &journal, 3, None);
    kill_node(&c, 6);
    let dev = format!("{}/dev6", c.arg());
    let format = run(
        storaged_bin().to_str().unwrap(),
        &["format", "--device", &dev, "--node-id", "6", "--force"],
    );
    assert_eq!(format.status.code(), Some(0), "{}", text(&format.stderr));
    start_node(&c, 6);
    assert!(
        wait_until(CATCH_UP_LIMIT, || caught_up(&c, 6)),
        "reformatted node 6 did not refill: {}\n{}\n{}",
        status(&c),
        log_tail(&c, "storaged-6.again"),
        log_tail(&c, "storaged-1")
    );
    carries_the_quorum(&c, 6, [4, 5], &journal);
}
