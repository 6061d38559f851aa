use super::*;
use crate::model::{DeployHost, RollbackTiming, Slot};
use cutover_shared::plan::Plan;

const DAY: u64 = 86_400_000;

fn plan(version: &str, steps: &str, committed_at: Option<&str>) -> Plan {
    let committed = committed_at.map_or(String::new(), |c| format!("committed_at = \"{c}\"\n"));
    let text = format!(
        "service = \"web\"\n[release]\nversion = \"{version}\"\nartifact = \"file:///a.tar.gz\"\nsha256 = \"{}\"\n{committed}[run]\ncommand = [\"./web\"]\nlisten = 8080\n[health]\nhttp = \"/\"\n[strategy]\n{steps}\n",
        "1".repeat(64)
    );
    Plan::parse(&text, "p.toml").unwrap()
}

fn host(phase: HostPhase) -> DeployHost {
    DeployHost {
        phase,
        new_slot: Slot::Green,
        old_slot: Some(Slot::Blue),
        weight: 100,
        error: None,
        untouched: false,
        lost: false,
        old_front: None,
    }
}

/// A deployment created at `start` that ended `state` after `took` ms.
fn dep(id: &str, version: &str, start: u64, took: u64, state: State) -> DeploymentRecord {
    DeploymentRecord {
        id: id.into(),
        service: "web".into(),
        release: version.into(),
        plan: plan(
            version,
            "steps = [{ traffic = 10, hold = \"10s\" }, { traffic = 100 }]",
            None,
        ),
        plan_path: "p.toml".into(),
        previous_release: None,
        is_rollback: false,
        state,
        ending: None,
        step: 1,
        traffic: 100,
        reason: None,
        created_unix_ms: start,
        ended_unix_ms: Some(start + took),
        phase_started_unix_ms: start,
        step_switched_unix_ms: None,
        promoted: false,
        gate_passed: false,
        pause: None,
        hosts: [("web-1".to_string(), host(HostPhase::Switched))].into(),
        analysis: Default::default(),
        rollback: None,
    }
}

fn ev(at: u64, kind: Kind) -> Event {
    Event {
        at_unix_ms: at,
        kind,
    }
}

/// Timeline of a good 2-step deployment: prepare `prep` ms, switches of 100 ms.
fn good_events(start: u64, prep: u64) -> Vec<Event> {
    vec![
        ev(
            start + 10,
            Kind::HostPhase {
                host: "web-1".into(),
                phase: "fetching".into(),
            },
        ),
        ev(
            start + prep,
            Kind::HostReady {
                host: "web-1".into(),
                timings: None,
            },
        ),
        ev(
            start + prep,
            Kind::StepStarted {
                step: 0,
                traffic: 10,
            },
        ),
        ev(
            start + prep + 100,
            Kind::StepHolding {
                step: 0,
                traffic: 10,
            },
        ),
        ev(
            start + prep + 10_100,
            Kind::StepStarted {
                step: 1,
                traffic: 100,
            },
        ),
        ev(
            start + prep + 10_200,
            Kind::StepHolding {
                step: 1,
                traffic: 100,
            },
        ),
    ]
}

#[test]
fn spread_uses_nearest_rank_and_the_middle_pair() {
    let s = spread(&[1000, 2000, 3000, 4000]);
    assert_eq!(s.count, 4);
    assert_eq!(s.median_s, Some(2.5));
    assert_eq!(s.mean_s, Some(2.5));
    assert_eq!(s.p90_s, Some(4.0));
    let s = spread(&(1..=10).map(|i| i * 1000).collect::<Vec<_>>());
    assert_eq!((s.median_s, s.p90_s), (Some(5.5), Some(9.0)));
    assert_eq!(spread(&[]), Spread::default());
}

#[test]
fn typical_durations_come_from_past_successes_only() {
    let mut records = Vec::new();
    let mut events = BTreeMap::new();
    for (i, prep) in [2000u64, 4000, 6000].into_iter().enumerate() {
        let start = i as u64 * DAY;
        let id = format!("d-{i}");
        records.push(dep(&id, "1", start, prep + 10_300, State::Succeeded));
        events.insert(id, good_events(start, prep));
    }
    // A rolled-back one with a very slow preparation does not count.
    records.push(dep("d-9", "2", 9 * DAY, 99_000, State::RolledBack));
    events.insert("d-9".into(), good_events(9 * DAY, 90_000));
    let t = typical(&records, &events, "web");
    assert_eq!(t.deployments, 3);
    assert_eq!(t.prepare.median_s, Some(4.0));
    assert_eq!(t.prepare.p90_s, Some(6.0));
    // Hosts: first phase (start + 10) to ready.
    assert_eq!(t.host_prepare.median_s, Some(3.99));
    assert_eq!(t.switch.median_s, Some(0.1));
    assert_eq!(t.switch.count, 6);
    assert_eq!(t.total.median_s, Some(14.3));
}

#[test]
fn eta_adds_typical_switches_and_the_holds_left() {
    let t = Typical {
        deployments: 3,
        prepare: spread(&[4000]),
        switch: spread(&[100]),
        ..Typical::default()
    };
    let mut d = dep("d-1", "2", 0, 0, State::Preparing);
    d.ended_unix_ms = None;
    d.step = 0;
    // Preparing for 1 s: 3 s of typical preparation left, then two switches, a 10 s
    // hold and no bake.
    assert_eq!(eta_ms(&d, &[], &t, 1000), Some(3000 + 100 + 10_000 + 100));
    // Holding at step 1 for 4 s of its 10 s; the last step still to switch.
    d.state = State::Progressing;
    d.step_switched_unix_ms = Some(20_000);
    let started = vec![ev(
        19_000,
        Kind::StepStarted {
            step: 0,
            traffic: 10,
        },
    )];
    assert_eq!(eta_ms(&d, &started, &t, 24_000), Some(6000 + 100));
    // No history: only what the plan waits.
    assert_eq!(
        eta_ms(&d, &started, &Typical::default(), 24_000),
        Some(6000)
    );
    d.state = State::Succeeded;
    assert_eq!(eta_ms(&d, &started, &t, 24_000), None);
}

#[test]
fn a_host_three_times_slower_than_the_rest_is_a_straggler() {
    let mut d = dep("d-1", "2", 0, 0, State::Preparing);
    d.ended_unix_ms = None;
    d.hosts = [
        ("web-1".to_string(), host(HostPhase::Ready)),
        ("web-2".to_string(), host(HostPhase::Ready)),
        ("web-3".to_string(), host(HostPhase::Preparing)),
    ]
    .into();
    let events: Vec<Event> = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|h| {
            ev(
                0,
                Kind::HostPhase {
                    host: h.to_string(),
                    phase: "fetching".into(),
                },
            )
        })
        .chain([
            ev(
                2000,
                Kind::HostReady {
                    host: "web-1".into(),
                    timings: None,
                },
            ),
            ev(
                3000,
                Kind::HostReady {
                    host: "web-2".into(),
                    timings: None,
                },
            ),
        ])
        .collect();
    let t = Typical::default();
    // Median 2.5 s: 7.5 s is the limit.
    assert!(stragglers(&d, &events, &t, 7000).is_empty());
    assert_eq!(
        stragglers(&d, &events, &t, 8000),
        vec![("web-3".to_string(), 8.0)]
    );
}

#[test]
fn dora_figures_match_a_history_computed_by_hand() {
    let since = 1000;
    let now = since + 30 * DAY;
    let mut records = Vec::new();
    let mut events = BTreeMap::new();
    // 1: success, 60 s, committed 1 h before it ended.
    let mut d1 = dep("d-01", "1", DAY, 60_000, State::Succeeded);
    d1.plan = plan(
        "1",
        "steps = [{ traffic = 100 }]",
        Some("1970-01-02T00:00:00Z"),
    );
    // ended at DAY + 60 s; committed at DAY: lead 60 s.
    records.push(d1);
    // 2: rolled back automatically at 10 %: first bad 1 s before done.
    let mut d2 = dep("d-02", "2", 2 * DAY, 20_000, State::RolledBack);
    d2.rollback = Some(RollbackTiming {
        first_bad_unix_ms: 2 * DAY + 15_000,
        decided_unix_ms: 2 * DAY + 15_500,
        done_unix_ms: Some(2 * DAY + 16_000),
    });
    d2.hosts.get_mut("web-1").unwrap().phase = HostPhase::RolledBack;
    events.insert(
        "d-02".to_string(),
        vec![
            ev(
                2 * DAY + 5000,
                Kind::StepStarted {
                    step: 0,
                    traffic: 10,
                },
            ),
            ev(
                2 * DAY + 5100,
                Kind::StepHolding {
                    step: 0,
                    traffic: 10,
                },
            ),
            ev(
                2 * DAY + 15_500,
                Kind::RollbackStarted {
                    reason: "x".into(),
                    first_bad_unix_ms: 2 * DAY + 15_000,
                    decided_unix_ms: 2 * DAY + 15_500,
                },
            ),
        ],
    );
    // 3: failed while preparing on web-2.
    records.push(dep("d-03", "3", 3 * DAY, 5000, State::Failed));
    events.insert(
        "d-03".to_string(),
        vec![ev(
            3 * DAY + 4000,
            Kind::HostFailed {
                host: "web-2".into(),
                error: "disk".into(),
            },
        )],
    );
    records.push(d2);
    // 4: success, 40 s; then 5: manual rollback of it taking 2 s.
    records.push(dep("d-04", "4", 4 * DAY, 40_000, State::Succeeded));
    let mut r = dep("d-05", "1", 5 * DAY, 2000, State::Succeeded);
    r.is_rollback = true;
    r.previous_release = Some("4".into());
    records.push(r);
    // 6: success, 80 s, not undone. 7: before the window.
    records.push(dep("d-06", "5", 6 * DAY, 80_000, State::Succeeded));
    let mut old = dep("d-00", "0", 0, 1000, State::Failed);
    old.created_unix_ms = since - 1;
    records.push(old);

    let s = stats(&records, &events, Some("web"), since, now);
    assert_eq!(
        s.deployments, 5,
        "rollbacks and deployments before the window left out"
    );
    assert_eq!(
        (
            s.succeeded,
            s.rolled_back,
            s.failed,
            s.aborted,
            s.rolled_back_manually
        ),
        (3, 1, 1, 0, 1)
    );
    assert_eq!(s.change_failure_rate, Some(0.6));
    assert_eq!(s.days, 30.0);
    assert_eq!(s.deployments_per_day, 0.167);
    // Restore: 1 s (automatic) and 2 s (manual).
    assert_eq!(s.time_to_restore.count, 2);
    assert_eq!(s.time_to_restore.mean_s, Some(1.5));
    assert_eq!(s.time_to_restore.median_s, Some(1.5));
    // Durations of the successes: 60, 40, 80 s.
    assert_eq!(s.deployment_duration.median_s, Some(60.0));
    assert_eq!(s.lead_time.count, 1);
    assert_eq!(s.lead_time.median_s, Some(60.0));
    assert_eq!(s.failures_by_phase.get("at 10%"), Some(&1));
    assert_eq!(s.failures_by_phase.get("preparing"), Some(&1));
    assert_eq!(
        s.failures_by_phase.get("after success (manual rollback)"),
        Some(&1)
    );
    assert_eq!(s.failures_by_host.get("web-2"), Some(&1));
}

#[test]
fn history_is_newest_first_and_filtered() {
    let mut records = vec![
        dep("d-1", "1", 1000, 10, State::Succeeded),
        dep("d-2", "2", 2000, 10, State::Failed),
    ];
    let mut other = dep("d-3", "9", 3000, 10, State::Succeeded);
    other.service = "api".into();
    records.push(other);
    let h = history(&records, Some("web"), 0, 10);
    let ids: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d-2", "d-1"]);
    assert_eq!(history(&records, None, 0, 1).as_array().unwrap().len(), 1);
    assert_eq!(
        history(&records, None, 1500, 10).as_array().unwrap().len(),
        2
    );
}
