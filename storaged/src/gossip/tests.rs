use super::*;

const PG: Pg = 3;

fn digest(scl: u64, floor: u64) -> Digest {
    Digest {
        installed_epoch: 2,
        membership_epoch: 1,
        scl,
        highest_lsn: scl,
        floor,
    }
}

fn core_at(scl: u64) -> GossipCore {
    let mut core = GossipCore::new(1, unpaced(), 7);
    core.set_local(
        PG,
        Local {
            digest: digest(scl, 0),
            members: (1..=6).collect(),
            missing: Vec::new(),
        },
    );
    core
}

fn pulls(actions: &[Action]) -> Vec<(u64, NodeId, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Pull { id, to, after, .. } => Some((*id, *to, *after)),
            _ => None,
        })
        .collect()
}

fn digests_asked(actions: &[Action]) -> Vec<NodeId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendDigest { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

#[test]
fn digests_are_asked_of_every_peer_each_interval() {
    let mut core = core_at(10);
    let asked = digests_asked(&core.poll(0));
    assert_eq!(asked, vec![2, 3, 4, 5, 6]);
    assert!(core.poll(100).is_empty(), "not again within the interval");
    assert_eq!(core.poll(500).len(), 5);
}

#[test]
fn a_segment_in_step_with_its_peers_pulls_nothing() {
    let mut core = core_at(10);
    for p in 2..=6 {
        core.on_digest(0, PG, p, digest(10, 0)).unwrap();
    }
    assert!(pulls(&core.poll(0)).is_empty());
}

#[test]
fn a_segment_behind_pulls_from_a_peer_that_holds_the_range() {
    let mut core = core_at(10);
    core.on_digest(0, PG, 2, digest(50, 20)).unwrap(); // released past 10: cannot serve
    core.on_digest(0, PG, 3, digest(50, 5)).unwrap();
    let p = pulls(&core.poll(0));
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].1, p[0].2), (3, 10));
}

#[test]
fn gossip_from_a_non_member_or_a_stale_epoch_is_refused() {
    let mut core = core_at(10);
    assert_eq!(
        core.on_digest(0, PG, 9, digest(50, 0)),
        Err(Refusal::NotMember {
            pg: PG,
            from: 9,
            epoch: 1
        })
    );
    let mut stale = digest(50, 0);
    stale.installed_epoch = 1;
    assert_eq!(
        core.on_digest(0, PG, 2, stale),
        Err(Refusal::StaleEpoch { got: 1, current: 2 })
    );
    stale = digest(50, 0);
    stale.membership_epoch = 0;
    assert!(matches!(
        core.on_digest(0, PG, 2, stale),
        Err(Refusal::StaleMembership { .. })
    ));
    assert_eq!(
        core.on_digest(0, 99, 2, digest(50, 0)),
        Err(Refusal::UnknownPg { pg: 99 })
    );
    assert!(pulls(&core.poll(0)).is_empty(), "nothing refused is a source");
    assert_eq!(core.counters().digests_refused, 4);
}

#[test]
fn a_peer_at_a_newer_epoch_is_not_a_source() {
    // It may hold truncation ranges this segment has not installed yet.
    let mut core = core_at(10);
    let mut newer = digest(50, 0);
    newer.installed_epoch = 3;
    core.on_digest(0, PG, 2, newer).unwrap();
    assert!(pulls(&core.poll(0)).is_empty());
}

#[test]
fn holes_are_pulled_before_the_tail_and_each_range_once() {
    let mut core = GossipCore::new(1, unpaced(), 1);
    core.set_local(
        PG,
        Local {
            digest: Digest {
                highest_lsn: 40,
                ..digest(10, 0)
            },
            members: (1..=6).collect(),
            missing: vec![(10, 20), (30, 35)],
        },
    );
    for p in 2..=6 {
        core.on_digest(0, PG, p, digest(60, 0)).unwrap();
    }
    let afters: Vec<u64> = pulls(&core.poll(0)).iter().map(|p| p.2).collect();
    assert_eq!(afters, vec![10, 30, 40]);
    assert!(pulls(&core.poll(1)).is_empty(), "a range out is not asked twice");
}

#[test]
fn no_peer_gets_more_than_its_inflight_limit() {
    let mut core = GossipCore::new(1, unpaced(), 1);
    let missing: Vec<LsnRange> = (0..10).map(|i| (10 + i * 10, 15 + i * 10)).collect();
    core.set_local(
        PG,
        Local {
            digest: Digest {
                highest_lsn: 120,
                ..digest(10, 0)
            },
            members: (1..=6).collect(),
            missing,
        },
    );
    core.on_digest(0, PG, 2, digest(200, 0)).unwrap();
    let p = pulls(&core.poll(0));
    assert_eq!(p.len(), 2, "inflight_per_peer_max");
    assert!(p.iter().all(|x| x.1 == 2));
}

#[test]
fn a_request_that_times_out_is_asked_of_another_peer() {
    let mut core = core_at(10);
    core.on_digest(0, PG, 2, digest(50, 0)).unwrap();
    let first = pulls(&core.poll(0));
    assert_eq!(first[0].1, 2);
    // Peer 2 never answers; both keep gossiping.
    let deadline = GossipConfig::default().timeout_max_ms;
    for p in [2, 3] {
        core.on_digest(deadline, PG, p, digest(50, 0)).unwrap();
    }
    let actions = core.poll(deadline);
    assert!(actions.contains(&Action::Abandon { id: first[0].0 }));
    let again = pulls(&actions);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].2, 10);
    assert_eq!(again[0].1, 3, "the peer that timed out now looks slow");
    assert_eq!(core.counters().pulls_timed_out, 1);
}

#[test]
fn the_fastest_peer_is_preferred() {
    let mut core = core_at(10);
    core.config.explore_percent = 0;
    for p in [2, 3] {
        core.on_digest(0, PG, p, digest(1000, 0)).unwrap();
    }
    // Teach it: 2 answers in 80 ms, 3 in 5 ms.
    for (peer, took) in [(2, 80), (3, 5)] {
        core.start(0, PG, peer, 999, 1, false);
        let id = core.next_id - 1;
        core.on_pulled(took, id, 1);
    }
    let p = pulls(&core.poll(100));
    assert_eq!(p[0].1, 3);
}

#[test]
fn stale_digests_do_not_choose_a_source() {
    let mut core = core_at(10);
    core.on_digest(0, PG, 2, digest(50, 0)).unwrap();
    let config = unpaced();
    let later = config.digest_interval_ms * config.digest_stale_intervals + 1;
    assert!(pulls(&core.poll(later)).is_empty());
}

#[test]
fn behind_every_peers_floor_it_hydrates_once() {
    let mut core = core_at(10);
    core.on_digest(0, PG, 2, digest(50, 30)).unwrap();
    core.on_digest(0, PG, 3, digest(50, 40)).unwrap();
    let actions = core.poll(0);
    let hydrations: Vec<&Action> = actions.iter().filter(|a| matches!(a, Action::Hydrate { .. })).collect();
    assert_eq!(hydrations.len(), 1);
    assert!(pulls(&actions).is_empty());
    assert!(
        !core.poll(1).iter().any(|a| matches!(a, Action::Hydrate { .. })),
        "one at a time"
    );
}

/// A core at SCL `scl` paced at 1 MiB/s, in pulls of at most 1 MiB.
fn paced_core_at(scl: u64) -> GossipCore {
    let config = GossipConfig {
        rate_bytes_per_s: 1 << 20,
        pull_bytes_max: 1 << 20,
        ..GossipConfig::default()
    };
    let mut core = GossipCore::new(1, config, 1);
    core.set_local(
        PG,
        Local {
            digest: digest(scl, 0),
            members: (1..=6).collect(),
            missing: Vec::new(),
        },
    );
    core
}

#[test]
fn the_rate_ceiling_holds_pulls_back_and_pressure_halves_it() {
    let mut core = paced_core_at(10);
    core.on_digest(0, PG, 2, digest(50, 0)).unwrap();
    assert!(pulls(&core.poll(0)).is_empty(), "no budget yet");
    let p = pulls(&core.poll(1000));
    assert_eq!(p.len(), 1);
    core.on_pulled(1001, p[0].0, 1 << 20);
    core.on_digest(1001, PG, 2, digest(50, 0)).unwrap();
    assert!(
        pulls(&core.poll(1002)).is_empty(),
        "the megabyte spent the second's budget"
    );

    core.observe_foreground(100.0);
    core.observe_foreground(400.0);
    assert_eq!(core.rate_factor(), 0.5);
    for _ in 0..10 {
        core.observe_foreground(1000.0);
    }
    assert_eq!(core.rate_factor(), RATE_FACTOR_MIN, "never below the floor");
    let steps_back = (1.0 / RATE_FACTOR_MIN) as usize;
    for _ in 0..steps_back {
        core.observe_foreground(100.0);
    }
    assert_eq!(core.rate_factor(), 1.0);

    // The foreground stops: repair does not stay slowed down for it.
    for _ in 0..10 {
        core.observe_foreground(1000.0);
    }
    for _ in 0..steps_back {
        core.observe_no_foreground();
    }
    assert_eq!(core.rate_factor(), 1.0);
}

/// The defaults without the rate ceiling: these tests are about choices, not pace.
fn unpaced() -> GossipConfig {
    GossipConfig {
        rate_bytes_per_s: 0,
        ..GossipConfig::default()
    }
}

/// A refused request (a hydration a peer cannot serve, say) is not asked
/// again at once and for ever: the segment waits for a digest interval.
#[test]
fn a_failed_request_is_not_asked_again_before_a_digest_interval() {
    let mut core = core_at(10);
    core.on_digest(0, PG, 2, digest(50, 0)).unwrap();
    let first = pulls(&core.poll(0));
    assert_eq!(first.len(), 1);
    core.on_failed(1, first[0].0);
    assert!(pulls(&core.poll(2)).is_empty(), "asked again at once");
    let interval = unpaced().digest_interval_ms;
    core.on_digest(1 + interval, PG, 2, digest(50, 0)).unwrap();
    assert_eq!(pulls(&core.poll(1 + interval)).len(), 1);
}

/// A segment counts as holding what its peers hold only when enough of
/// them were heard lately (a commit is on 3 peers besides it, at most 2
/// may be unheard) and none is ahead of it.
#[test]
fn caught_up_needs_three_fresh_peers_none_ahead() {
    let mut core = core_at(50);
    core.on_digest(0, PG, 2, digest(50, 0)).unwrap();
    core.on_digest(0, PG, 3, digest(40, 0)).unwrap();
    assert_eq!(core.caught_up(0, PG), None, "two peers heard");
    core.on_digest(0, PG, 4, digest(50, 0)).unwrap();
    assert_eq!(core.caught_up(0, PG), Some(50));
    core.on_digest(1, PG, 5, digest(60, 0)).unwrap();
    assert_eq!(core.caught_up(1, PG), None, "peer 5 is ahead");
    // Long unheard, the peers' word is stale.
    let stale = unpaced().digest_interval_ms * unpaced().digest_stale_intervals + 10;
    core.on_digest(stale, PG, 5, digest(50, 0)).unwrap();
    assert_eq!(core.caught_up(stale, PG), None, "only peer 5 is fresh");
}

fn hydrations(actions: &[Action]) -> Vec<(u64, NodeId)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Hydrate { id, from, .. } => Some((*id, *from)),
            _ => None,
        })
        .collect()
}

/// The first time after `from` that `donor` is asked for a hydration, the
/// peers' digests kept fresh; the hydration then ends as `outcome` says.
fn next_hydration_from(core: &mut GossipCore, from: Millis, able: &[NodeId], failed: bool) -> (Millis, NodeId) {
    let mut t = from;
    loop {
        t += 10;
        assert!(t < from + 1_000_000, "never asked again");
        for &p in able {
            core.on_digest(t, PG, p, digest(50, 30)).unwrap();
        }
        if let Some(&(id, donor)) = hydrations(&core.poll(t)).first() {
            if failed {
                core.on_failed(t, id);
            } else {
                core.on_pulled(t, id, 0);
            }
            return (t, donor);
        }
    }
}

/// A donor whose hydration failed is not chosen again while another can
/// serve; alone, it waits twice as long after each failure in a row (not
/// one digest interval each time, for ever); a success forgets its failures.
#[test]
fn a_refused_donor_backs_off_exponentially_and_others_go_first() {
    let interval = unpaced().digest_interval_ms;
    let mut core = core_at(10);
    let (t, donor) = next_hydration_from(&mut core, 0, &[2], true);
    assert_eq!(donor, 2);
    // Node 3 can serve too: it is asked next, not node 2 again.
    let (_, donor) = next_hydration_from(&mut core, t, &[2, 3], true);
    assert_eq!(donor, 3);

    // Alone, node 2 is asked again 1, 2, 4, 8, 16 intervals after each
    // failure in a row, never sooner.
    let mut core = core_at(10);
    let (mut t, _) = next_hydration_from(&mut core, 0, &[2], true);
    let mut waits = Vec::new();
    for _ in 0..5 {
        let (next, donor) = next_hydration_from(&mut core, t, &[2], true);
        assert_eq!(donor, 2);
        waits.push((next - t) / interval);
        t = next;
    }
    assert_eq!(waits, vec![1, 2, 4, 8, 16], "in digest intervals, rounded down");
    // A success forgets them: the next failure costs one interval again.
    let (t, _) = next_hydration_from(&mut core, t, &[2], false);
    let (t, _) = next_hydration_from(&mut core, t, &[2], true);
    let (next, _) = next_hydration_from(&mut core, t, &[2], true);
    assert_eq!((next - t) / interval, 1);
}

/// A hydration fetches batch after batch for as long as it runs: each
/// batch is charged to the repair budget, and the next waits until the
/// rate (halved under foreground pressure) has paid for it.
#[test]
fn a_hydration_is_paced_by_the_rate_and_slows_under_foreground_pressure() {
    let mut core = paced_core_at(10);
    // The foreground's latency before any repair: the baseline.
    core.observe_foreground(100.0);
    core.on_digest(0, PG, 2, digest(50, 30)).unwrap();
    let started = hydrations(&core.poll(0));
    assert_eq!(started.len(), 1);
    let id = started[0].0;
    core.on_progress(1, id, 2 << 20);
    assert!(!core.hydration_may_go_on(), "two megabytes spent two seconds' budget");
    core.poll(1001);
    assert!(!core.hydration_may_go_on());
    core.poll(2101);
    assert!(core.hydration_may_go_on(), "paid for after two seconds");

    core.on_progress(2102, id, 2 << 20);
    core.observe_foreground(400.0);
    assert_eq!(core.rate_factor(), 0.5);
    core.poll(4202);
    assert!(
        !core.hydration_may_go_on(),
        "at half the rate, two seconds pay for one megabyte"
    );
    core.poll(6303);
    assert!(core.hydration_may_go_on());

    // Its end charges nothing more: the batches paid their way.
    core.on_pulled(6304, id, 4 << 20);
    assert!(core.hydration_may_go_on(), "the bytes were charged once, as they came");
    assert_eq!(core.counters().bytes_pulled, 4 << 20);
}

/// A node that starts repairing at once has never seen the foreground
/// without its repair: it yields until it has, and takes its baseline from
/// a sample while nothing is in flight.
#[test]
fn without_a_baseline_taken_while_idle_repair_yields_to_the_foreground() {
    let mut core = core_at(10);
    core.on_digest(0, PG, 2, digest(50, 30)).unwrap();
    let started = hydrations(&core.poll(0));
    assert_eq!(started.len(), 1);
    for _ in 0..8 {
        core.observe_foreground(5000.0);
    }
    assert_eq!(
        core.rate_factor(),
        RATE_FACTOR_MIN,
        "slowed appends from the start count as slowed"
    );
    core.on_pulled(10, started[0].0, 0);
    core.observe_foreground(1000.0);
    assert!(core.rate_factor() > RATE_FACTOR_MIN, "an idle sample is the baseline");
    core.observe_foreground(5000.0);
    assert_eq!(
        core.rate_factor(),
        RATE_FACTOR_MIN,
        "five times the baseline halves it again"
    );
}

/// `storctl repair --pg` asks a segment to fill its gaps now: every
/// peer's digest is asked at once, within the interval, and a segment
/// waiting out a failed request's back-off (or a failed donor's) asks
/// again at once.
#[test]
fn fill_now_asks_every_peer_at_once_and_drops_the_back_offs() {
    let mut core = core_at(10);
    core.on_digest(0, PG, 2, digest(50, 0)).unwrap();
    let first = pulls(&core.poll(0));
    assert_eq!(first.len(), 1);
    core.on_failed(1, first[0].0);
    assert!(core.poll(2).is_empty(), "nothing due within the interval");

    assert!(core.fill_now(PG));
    let asked = core.poll(3);
    let digests = digests_asked(&asked);
    assert_eq!(digests, vec![2, 3, 4, 5, 6]);
    // Node 2's digest is still fresh: it is asked again at once.
    assert_eq!(pulls(&asked).len(), 1, "the back-off held the pull back");

    assert!(!core.fill_now(PG + 1), "a PG the node holds no segment of");
}
