//! The reports' unit tests: hand-built records and timelines, and the figures and
//! documents made of them.

use std::collections::BTreeMap;

use super::*;
use crate::analysis::{MetricResult, Verdict};
use crate::model::{DeployHost, IntervalRecord, RollbackTiming, Slot};
use crate::model::{HostPhase, State};
use crate::timeline::{Event, Kind};
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
        reported: None,
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
        restart: false,
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
        database: Default::default(),
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

/// The start of the window of [`dora_history`], whose deployments are made after it.
const SINCE: u64 = 1000;

/// Seven deployments of `web` whose DORA figures are worked out by hand below.
fn dora_history() -> (Vec<DeploymentRecord>, BTreeMap<String, Vec<Event>>) {
    let since = SINCE;
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
    (records, events)
}

#[test]
fn dora_figures_match_a_history_computed_by_hand() {
    let (records, events) = dora_history();
    let s = stats(&records, &events, Some("web"), SINCE, SINCE + 30 * DAY);
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
    // d-02 served 10 % and was rolled back; d-04 was undone by hand. d-03 never served
    // a request: it failed, but no user saw it.
    assert_eq!(s.change_failures, 2);
    assert_eq!(s.failed_before_traffic, 1);
    assert_eq!(s.change_failure_rate, Some(0.4));
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
    let ids: Vec<&str> = h.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["d-2", "d-1"]);
    assert_eq!(h[0].state, State::Failed);
    assert_eq!(h[1].duration_s, Some(0.01));
    assert_eq!(history(&records, None, 0, 1).len(), 1);
    assert_eq!(history(&records, None, 1500, 10).len(), 2);
}

fn interval(at: u64, verdict: Verdict, metrics: Vec<MetricResult>) -> IntervalRecord {
    IntervalRecord {
        step: 0,
        traffic: 10,
        started_unix_ms: at,
        ended_unix_ms: at + 1000,
        new_requests: 100,
        old_requests: 900,
        verdict,
        metrics,
    }
}

fn rolled_back(d: &mut DeploymentRecord, first_bad: u64, done: u64) {
    d.rollback = Some(RollbackTiming {
        first_bad_unix_ms: first_bad,
        decided_unix_ms: first_bad,
        done_unix_ms: Some(done),
    });
    for h in d.hosts.values_mut() {
        h.phase = HostPhase::RolledBack;
        h.weight = 0;
    }
}

/// `step 1: moving to {traffic}%` at `at`, then the rollback.
fn served_then_rolled_back(at: u64, traffic: u32) -> Vec<Event> {
    vec![
        ev(at, Kind::StepStarted { step: 0, traffic }),
        ev(at + 100, Kind::StepHolding { step: 0, traffic }),
        ev(
            at + 5000,
            Kind::RollbackStarted {
                reason: "x".into(),
                first_bad_unix_ms: at + 4000,
                decided_unix_ms: at + 5000,
            },
        ),
    ]
}

#[test]
fn change_failures_are_the_deployments_that_degraded_service() {
    let mut records = Vec::new();
    let mut events = BTreeMap::new();
    // 1: preparation failed on a host, rolled back at once; never served a request.
    let mut prep = dep("d-1", "1", DAY, 3000, State::RolledBack);
    rolled_back(&mut prep, DAY + 3000, DAY + 3000);
    records.push(prep);
    // 2: aborted by an operator at 10 % with every interval passing: healthy.
    let mut healthy = dep("d-2", "2", 2 * DAY, 20_000, State::Aborted);
    healthy.analysis.intervals = vec![interval(2 * DAY + 2000, Verdict::Pass, vec![])];
    rolled_back(&mut healthy, 2 * DAY + 19_000, 2 * DAY + 19_500);
    records.push(healthy);
    events.insert(
        "d-2".to_string(),
        served_then_rolled_back(2 * DAY + 1000, 10),
    );
    // 3: aborted at 10 % after a failing interval: degraded service, restored in 3 s.
    let mut bad_abort = dep("d-3", "3", 3 * DAY, 20_000, State::Aborted);
    bad_abort.analysis.intervals =
        vec![interval(3 * DAY + 2000, Verdict::Fail("x".into()), vec![])];
    rolled_back(&mut bad_abort, 3 * DAY + 4000, 3 * DAY + 7000);
    records.push(bad_abort);
    events.insert(
        "d-3".to_string(),
        served_then_rolled_back(3 * DAY + 1000, 10),
    );
    // 4: rolled back automatically at 50 %: restored in 5 s.
    let mut auto = dep("d-4", "4", 4 * DAY, 20_000, State::RolledBack);
    rolled_back(&mut auto, 4 * DAY + 5000, 4 * DAY + 10_000);
    records.push(auto);
    events.insert(
        "d-4".to_string(),
        served_then_rolled_back(4 * DAY + 1000, 50),
    );
    // 5: a success.
    records.push(dep("d-5", "5", 5 * DAY, 20_000, State::Succeeded));

    let s = stats(&records, &events, None, 0, 10 * DAY);
    assert_eq!(s.deployments, 5);
    assert_eq!((s.rolled_back, s.aborted, s.succeeded), (2, 2, 1));
    assert_eq!(s.failed_before_traffic, 1, "d-1");
    assert_eq!(s.change_failures, 2, "d-3 and d-4");
    assert_eq!(s.change_failure_rate, Some(0.4));
    // Restore: 3 s and 5 s; the preparation failure restored nothing.
    assert_eq!(s.time_to_restore.count, 2);
    assert_eq!(s.time_to_restore.median_s, Some(4.0));
    assert_eq!(s.failures_by_phase.get("preparing"), Some(&1));
    assert_eq!(
        s.failures_by_phase.get("at 10%"),
        Some(&1),
        "the healthy abort is no failure"
    );
    assert_eq!(s.failures_by_phase.get("at 50%"), Some(&1));
}

#[test]
fn a_host_failure_that_rolls_the_fleet_back_counts_for_that_host() {
    // The decision that sees web-2 fail its preparation also rolls the fleet back, so
    // web-2 goes from preparing to rolled back in one step, with its error.
    let mut before = dep("d-1", "2", DAY, 0, State::Preparing);
    before.ended_unix_ms = None;
    before.hosts = [
        ("web-1".to_string(), host(HostPhase::Ready)),
        ("web-2".to_string(), host(HostPhase::Preparing)),
    ]
    .into();
    let mut after = before.clone();
    after.state = State::RolledBack;
    after.ended_unix_ms = Some(DAY + 4000);
    after.reason = Some("host web-2: disk full".into());
    rolled_back(&mut after, DAY + 4000, DAY + 4000);
    if let Some(h) = after.hosts.get_mut("web-2") {
        h.error = Some("disk full".into());
    }
    // What that decision writes to the timeline.
    let evs = vec![
        ev(
            DAY + 4000,
            Kind::HostFailed {
                host: "web-2".into(),
                error: "disk full".into(),
            },
        ),
        ev(
            DAY + 4000,
            Kind::RollbackStarted {
                reason: "host web-2: disk full".into(),
                first_bad_unix_ms: DAY + 4000,
                decided_unix_ms: DAY + 4000,
            },
        ),
    ];
    // From the timeline, and from the record alone (timelines written before the event
    // was recorded): once per deployment.
    let records = vec![after.clone()];
    for events in [
        BTreeMap::from([("d-1".to_string(), evs.clone())]),
        BTreeMap::new(),
    ] {
        let s = stats(&records, &events, None, 0, 2 * DAY);
        assert_eq!(
            s.failures_by_host,
            BTreeMap::from([("web-2".to_string(), 1)])
        );
    }
    // `show` names it where it failed.
    let shown = show(&after, &evs, &Typical::default(), DAY + 5000);
    let failed = shown.failure.expect("a failure").hosts;
    assert_eq!(
        failed,
        [FailedHost {
            name: "web-2".into(),
            error: Some("disk full".into())
        }]
    );
}

#[test]
fn a_finished_deployment_is_not_holding() {
    let mut d = dep("d-1", "2", DAY, 30_000, State::Succeeded);
    d.step_switched_unix_ms = Some(DAY + 29_700);
    let v = show(&d, &[], &Typical::default(), DAY + 90_000);
    assert!(!v.holding);
    assert_eq!(v.hold_s, None);
    // Time in its last phase stops at the end: 0.3 s, not 60.3 s.
    assert_eq!(v.phase_elapsed_s, 0.3);

    // Holding at the last step waits its hold and then the bake.
    let mut d = dep("d-2", "2", DAY, 0, State::Progressing);
    d.ended_unix_ms = None;
    d.plan = plan(
        "2",
        "bake = \"5m\"\nsteps = [{ traffic = 10, hold = \"10s\" }, { traffic = 100, hold = \"30s\" }]",
        None,
    );
    d.step_switched_unix_ms = Some(DAY + 1000);
    let v = show(&d, &[], &Typical::default(), DAY + 4000);
    assert!(v.holding);
    assert_eq!(v.hold_s, Some(330.0));
    assert_eq!(v.bake_s, Some(300.0));
    assert_eq!(v.phase_elapsed_s, 3.0);
}

#[test]
fn latency_figures_carry_their_unit() {
    let latency = MetricResult {
        name: "latency_p99".into(),
        new: Some(212.0),
        old: Some(180.5),
        verdict: Verdict::Pass,
    };
    let errors = MetricResult {
        name: "error_rate".into(),
        new: Some(0.031),
        old: None,
        verdict: Verdict::Pass,
    };
    let mut d = dep("d-1", "2", DAY, 0, State::Progressing);
    d.ended_unix_ms = None;
    d.analysis.intervals = vec![interval(DAY, Verdict::Pass, vec![latency, errors])];
    let v = show(&d, &[], &Typical::default(), DAY + 2000);
    let m = v.last_interval.expect("an interval").metrics;
    assert_eq!(m[0].text, "latency_p99 212.0ms vs 180.5ms");
    assert_eq!(m[0].unit, "ms");
    assert_eq!(m[1].text, "error_rate 3.10% vs -");
    assert_eq!(m[1].unit, "ratio");
    // The timeline's interval event says the same.
    let evs = [Event::interval(&d.analysis.intervals[0])];
    assert!(
        evs.iter().any(|e| e
            .describe()
            .contains("[latency_p99 212.0ms vs 180.5ms, error_rate 3.10% vs -]")),
        "{:?}",
        evs.iter().map(Event::describe).collect::<Vec<_>>()
    );
}

/// One event of every kind, a second apart from `start`.
fn every_kind(start: u64) -> Vec<Event> {
    let host = || "web-1".to_string();
    let kinds = vec![
        Kind::Submitted {
            release: "2".into(),
            previous_release: Some("1".into()),
            hosts: 1,
            steps: 2,
            actor: "ops@desk".into(),
        },
        Kind::HostPhase {
            host: host(),
            phase: "fetching".into(),
        },
        Kind::HostReady {
            host: host(),
            timings: Some(crate::timeline::Timings {
                fetch_ms: 120,
                unpack_ms: 30,
                start_ms: 800,
            }),
        },
        Kind::HostFailed {
            host: "web-2".into(),
            error: "disk full".into(),
        },
        Kind::HostLost {
            host: "web-3".into(),
        },
        Kind::StepStarted {
            step: 0,
            traffic: 10,
        },
        Kind::StepHolding {
            step: 0,
            traffic: 10,
        },
        Kind::Interval {
            step: 0,
            traffic: 10,
            verdict: "fail".into(),
            why: "error_rate 40.00% above max 1.00%".into(),
            new_requests: 10,
            old_requests: 90,
            figures: vec!["error_rate 40.00% vs 0.00%".into()],
        },
        Kind::Paused { reason: None },
        Kind::Command {
            command: "resume".into(),
            actor: String::new(),
        },
        Kind::RollbackStarted {
            reason: "analysis failed".into(),
            first_bad_unix_ms: start + 7000,
            decided_unix_ms: start + 10_000,
        },
        Kind::RollbackDone,
        Kind::Ended {
            state: "rolled_back".into(),
            reason: Some("analysis failed".into()),
        },
    ];
    kinds
        .into_iter()
        .zip(0..)
        .map(|(kind, i)| ev(start + i * 1000, kind))
        .collect()
}

/// A deployment rolled back at 10 % after a failing interval, with every kind of event,
/// and the report `show` makes of it.
fn rolled_back_story() -> Show {
    let mut d = dep("d-7", "2", DAY, 12_000, State::RolledBack);
    d.previous_release = Some("1".into());
    d.reason = Some("analysis failed".into());
    let errors = MetricResult {
        name: "error_rate".into(),
        new: Some(0.4),
        old: None,
        verdict: Verdict::Fail("above max".into()),
    };
    d.analysis.intervals = vec![interval(
        DAY + 7000,
        Verdict::Fail("error_rate".into()),
        vec![errors],
    )];
    rolled_back(&mut d, DAY + 7000, DAY + 11_000);
    d.hosts.insert("web-2".into(), host(HostPhase::Failed));
    if let Some(h) = d.hosts.get_mut("web-2") {
        h.error = Some("disk full".into());
    }
    let past = dep("d-6", "1", 0, 30_000, State::Succeeded);
    let events = BTreeMap::from([("d-6".to_string(), good_events(0, 2000))]);
    let typical = typical(&[past], &events, "web");
    show(&d, &every_kind(DAY), &typical, DAY + 60_000)
}

/// The JSON text the coordinator sends for `report`.
fn sent<T: serde::Serialize>(report: &T) -> String {
    serde_json::to_string(&crate::views::to_value(report)).unwrap()
}

/// The CLI reads each report as the coordinator wrote it: nothing lost or changed on the
/// way, the timeline's events included, so `--output json` prints what was sent.
#[test]
fn reports_read_back_as_they_were_written() {
    let shown = rolled_back_story();
    assert!(shown.failure.is_some() && shown.last_interval.is_some());
    assert_eq!(shown.timeline.len(), 13);
    let text = sent(&shown);
    let back: Show = serde_json::from_str(&text).unwrap();
    assert_eq!(back, shown);
    assert_eq!(sent(&back), text);

    let records = vec![
        dep("d-1", "1", DAY, 10, State::Succeeded),
        dep("d-2", "2", 2 * DAY, 20, State::RolledBack),
    ];
    let rows = history(&records, None, 0, 10);
    let back: Vec<HistoryRow> = serde_json::from_str(&sent(&rows)).unwrap();
    assert_eq!(back, rows);

    let figures = stats(&records, &BTreeMap::new(), None, 0, 3 * DAY);
    let back: Stats = serde_json::from_str(&sent(&figures)).unwrap();
    assert_eq!(back, figures);
}

fn keys(v: &serde_json::Value) -> Vec<&str> {
    v.as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// The field names the dashboard, `cutover watch` and scripts read: a rename in a report
/// type compiles on both ends, so this is where it shows.
#[test]
fn show_keeps_the_field_names_its_readers_use() {
    let v = crate::views::to_value(&rolled_back_story());
    assert_eq!(
        keys(&v),
        [
            "bake_s",
            "created_at",
            "database",
            "elapsed_s",
            "ended_at",
            "eta_s",
            "failure",
            "hold_s",
            "holding",
            "host_prepare_s",
            "hosts",
            "id",
            "last_interval",
            "phase_elapsed_s",
            "plan",
            "plan_path",
            "previous_release",
            "reason",
            "release",
            "service",
            "state",
            "step",
            "steps",
            "stragglers",
            "timeline",
            "traffic",
            "typical",
        ]
    );
    assert_eq!(keys(&v["failure"]), ["hosts", "phase", "reason"]);
    assert_eq!(keys(&v["failure"]["hosts"][0]), ["error", "name"]);
    assert_eq!(keys(&v["hosts"][0]), ["error", "name", "phase", "weight"]);
    assert_eq!(
        keys(&v["last_interval"]),
        [
            "metrics",
            "new_requests",
            "old_requests",
            "traffic",
            "verdict"
        ]
    );
    assert_eq!(
        keys(&v["last_interval"]["metrics"][0]),
        ["name", "new", "old", "text", "threshold", "unit", "verdict"]
    );
    assert_eq!(
        keys(&v["typical"]),
        [
            "deployments",
            "expand",
            "host_prepare",
            "prepare",
            "switch",
            "total"
        ]
    );
    assert_eq!(
        keys(&v["typical"]["prepare"]),
        ["count", "mean_s", "median_s", "p90_s"]
    );
    assert_eq!(
        keys(&v["timeline"][0]),
        [
            "actor",
            "at",
            "at_unix_ms",
            "event",
            "hosts",
            "offset_s",
            "previous_release",
            "release",
            "steps",
            "text"
        ]
    );
    assert_eq!(v["timeline"][0]["event"], "submitted");
    assert_eq!(v["state"], "rolled_back");
    assert_eq!(v["hosts"][1]["phase"], "failed");
}

#[test]
fn history_rows_keep_the_field_names_their_readers_use() {
    let records = vec![dep("d-1", "1", DAY, 10, State::Succeeded)];
    let row = crate::views::to_value(&history(&records, None, 0, 1));
    assert_eq!(
        keys(&row[0]),
        [
            "created_at",
            "database",
            "duration_s",
            "ended_at",
            "id",
            "previous_release",
            "reason",
            "release",
            "restart",
            "rollback",
            "service",
            "state"
        ]
    );
}

#[test]
fn stats_keep_the_field_names_their_readers_use() {
    let records = vec![dep("d-1", "1", DAY, 10, State::Succeeded)];
    let figures = crate::views::to_value(&stats(&records, &BTreeMap::new(), None, 0, DAY));
    assert_eq!(
        keys(&figures),
        [
            "aborted",
            "change_failure_rate",
            "change_failures",
            "days",
            "deployment_duration",
            "deployments",
            "deployments_per_day",
            "failed",
            "failed_before_traffic",
            "failures_by_host",
            "failures_by_phase",
            "lead_time",
            "rolled_back",
            "rolled_back_manually",
            "service",
            "since",
            "succeeded",
            "time_to_restore"
        ]
    );
}

/// `show` carries the plan that was deployed, with the values of its secret variables
/// masked wherever they appear.
#[test]
fn show_includes_the_plan_with_secret_values_masked() {
    let mut d = dep("d-1", "1", DAY, 10, State::Succeeded);
    d.plan
        .run
        .env
        .insert("DATABASE_URL".into(), "postgres://app:hunter22@db".into());
    d.plan.run.env.insert("WORKERS".into(), "4".into());
    d.plan.run.secret_env = vec!["DATABASE_URL".into()];
    d.plan.run.command.push("postgres://app:hunter22@db".into());
    let shown = show(&d, &[], &Typical::default(), 2 * DAY);
    assert_eq!(shown.plan_path, "p.toml");
    let plan = shown.plan.as_ref().unwrap();
    assert_eq!(plan.run.env["DATABASE_URL"], "********");
    assert_eq!(plan.run.env["WORKERS"], "4");
    let text = sent(&shown);
    assert!(!text.contains("hunter22"), "{text}");
    assert!(text.contains("\"secret_env\":[\"DATABASE_URL\"]"), "{text}");
}

/// A deployment whose expand failed, and one whose contract failed after success.
fn database_history() -> (Vec<DeploymentRecord>, BTreeMap<String, Vec<Event>>) {
    let ended = |at: u64, phase: &str, ok: bool, duration_ms: u64| {
        ev(
            at,
            Kind::DatabaseEnded {
                phase: phase.into(),
                host: "web-1".into(),
                task: format!("d/{phase}"),
                ok,
                exit: if ok {
                    "exit status: 0"
                } else {
                    "exit status: 3"
                }
                .into(),
                exit_code: Some(if ok { 0 } else { 3 }),
                duration_ms,
                tail: vec![],
                log: String::new(),
            },
        )
    };
    let mut good = dep("d-1", "1", DAY, 20_000, State::Succeeded);
    good.plan = plan("1", "steps = [{ traffic = 100 }]", None);
    let mut good_events = vec![ended(DAY + 1_500, "expand", true, 1_400)];
    good_events.extend(good_events_after(DAY, 2_000));
    good_events.push(ended(DAY + 30_000, "contract", false, 300));
    let mut bad = dep("d-2", "2", 2 * DAY, 1_000, State::RolledBack);
    bad.hosts = [("web-1".to_string(), host(HostPhase::Waiting))].into();
    let bad_events = vec![
        ended(2 * DAY + 500, "expand", false, 400),
        ev(
            2 * DAY + 500,
            Kind::RollbackStarted {
                reason: "database expand failed".into(),
                first_bad_unix_ms: 2 * DAY + 500,
                decided_unix_ms: 2 * DAY + 500,
            },
        ),
        ended(2 * DAY + 900, "abort", true, 300),
    ];
    let events = [
        ("d-1".to_string(), good_events),
        ("d-2".to_string(), bad_events),
    ]
    .into();
    (vec![good, bad], events)
}

/// The one step of a plan going to 100 % after `prep` ms.
fn good_events_after(start: u64, prep: u64) -> Vec<Event> {
    vec![
        ev(
            start + prep,
            Kind::StepStarted {
                step: 0,
                traffic: 100,
            },
        ),
        ev(
            start + prep + 100,
            Kind::StepHolding {
                step: 0,
                traffic: 100,
            },
        ),
    ]
}

#[test]
fn database_commands_count_where_they_failed_and_the_expand_is_a_typical_time() {
    let (records, events) = database_history();
    let s = stats(&records, &events, None, 0, 3 * DAY);
    assert_eq!(s.failed_before_traffic, 1, "a failed expand served nobody");
    assert_eq!(
        s.failures_by_phase,
        [
            ("database contract".to_string(), 1),
            ("database expand".to_string(), 1)
        ]
        .into()
    );
    let t = typical(&records, &events, "web");
    assert_eq!((t.expand.count, t.expand.median_s), (1, Some(1.4)));
    assert_eq!(
        t.prepare.median_s,
        Some(2.0),
        "preparation includes the expand"
    );
    assert_eq!(
        super::failure::failure(&records[1], &events["d-2"]).map(|f| f.phase),
        Some("database expand".to_string())
    );
}
