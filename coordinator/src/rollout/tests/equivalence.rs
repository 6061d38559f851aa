//! The reshaped decision core against the one it replaced ([`super::legacy`]): both are
//! driven through the same random histories and must write the same deployment records
//! and the same timeline events, decision after decision.
//!
//! A history is a few deployments of one service on a small fleet: random plans (steps,
//! holds, gates, host waves, bake, analysis, failure tolerance, what a lost host means),
//! no-op and changed-spec redeployments and `cutover rollback`s, agents that apply
//! desired state late, slots that prepare slowly, fail, stall or turn unhealthy,
//! service errors and healing reports, hosts lost and back, request counters, and
//! operator commands at random times.

use std::collections::{BTreeMap, HashMap};

use cutover_proto::v1::{
    DesiredService, ObservedService, SlotMetrics, SlotPhase, SlotSpec, SlotStatus,
};
use cutover_shared::Duration;
use cutover_shared::plan::{Analysis, Count, Metric, MetricName, OnHostLost, Plan, Step};
use proptest::prelude::*;

use super::legacy::{self, Outcome};
use crate::model::{DeploymentRecord, Slot};
use crate::rollout::{Command, HostView};

const ACTOR: &str = "ops@desk";

/// Random choices, taken in order. Once the tape is spent every choice is the plain one
/// (nothing goes wrong), so a shrunk case reads as "all went well from there on".
struct Tape {
    draws: Vec<u8>,
    at: usize,
}

impl Tape {
    fn draw(&mut self) -> Option<u8> {
        let d = self.draws.get(self.at).copied();
        self.at += 1;
        d
    }

    /// A number below `n`; 0 once the tape is spent.
    fn pick(&mut self, n: u8) -> u8 {
        self.draw().map_or(0, |d| d % n)
    }

    /// True about once in `n` times; false once the tape is spent.
    fn one_in(&mut self, n: u16) -> bool {
        match (self.draw(), self.draw()) {
            (Some(a), Some(b)) => u16::from_le_bytes([a, b]) % n == 0,
            _ => false,
        }
    }

    /// True `percent` of the time; false once the tape is spent.
    fn chance(&mut self, percent: u32) -> bool {
        self.draw()
            .is_some_and(|d| u32::from(d) * 100 / 256 < percent)
    }
}

/// What becomes of a slot given a new spec on one host.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Healthy once it has prepared for this many reports.
    Healthy { ready_at: u32 },
    /// Fails at this many reports with one of [`ERRORS`] (shared, so that the same
    /// error can hit several hosts).
    Fails { at: u32, error: usize },
    /// Healthy, then unhealthy from `sick_at`; answers with errors while serving.
    Sickens { ready_at: u32, sick_at: u32 },
    /// Never gets past starting.
    Stalls,
}

const ERRORS: [&str; 3] = [
    "sha256 mismatch: expected 2222…, got 9999…",
    "process exited (exit status: 1): config missing",
    "disk full",
];

impl Fate {
    /// The fate of a slot given a release; a bad release (failing with `bad`) fails on
    /// about half the hosts.
    fn draw(tape: &mut Tape, bad: Option<usize>) -> Fate {
        let ready_at = u32::from(tape.pick(5));
        if let Some(error) = bad
            && tape.chance(50)
        {
            let at = u32::from(tape.pick(3));
            return Fate::Fails { at, error };
        }
        match tape.pick(24) {
            0..=18 => Fate::Healthy { ready_at },
            19 | 20 => Fate::Fails {
                at: u32::from(tape.pick(4)),
                error: usize::from(tape.pick(3)),
            },
            21 => Fate::Sickens {
                ready_at,
                sick_at: ready_at + 1 + u32::from(tape.pick(20)),
            },
            _ => Fate::Stalls,
        }
    }

    fn phase(self, age: u32) -> (SlotPhase, &'static str) {
        let preparing = [
            SlotPhase::Fetching,
            SlotPhase::Unpacking,
            SlotPhase::Starting,
        ];
        let stage = preparing[age.min(2) as usize];
        match self {
            Fate::Healthy { ready_at } if age >= ready_at => (SlotPhase::Healthy, ""),
            Fate::Fails { at, error } if age >= at => (SlotPhase::Failed, ERRORS[error]),
            Fate::Sickens { sick_at, .. } if age >= sick_at => {
                (SlotPhase::Unhealthy, "health check failed 3 times")
            }
            Fate::Sickens { ready_at, .. } if age >= ready_at => (SlotPhase::Healthy, ""),
            Fate::Stalls => (SlotPhase::Starting, ""),
            _ => (stage, ""),
        }
    }
}

/// One slot as its agent runs it.
#[derive(Clone, Debug)]
struct SlotRun {
    spec: SlotSpec,
    fate: Fate,
    /// Reports since the spec arrived.
    age: u32,
    requests: u64,
    errors: u64,
    latency: [u64; 3],
}

/// One host: what the coordinator wrote for it, what its agent runs and reports.
#[derive(Default)]
struct SimHost {
    desired: Option<DesiredService>,
    observed: Option<ObservedService>,
    runs: [Option<SlotRun>; 2],
    /// How long the host has been unreachable, while it is.
    lost_ms: Option<u64>,
    /// Reports left before a stuck agent applies desired state again.
    stuck: u32,
}

impl SimHost {
    /// The agent takes the desired state it was sent and reports.
    fn act(&mut self, tape: &mut Tape, tick_ms: u64, bad: &BTreeMap<String, usize>) {
        if let Some(ms) = self.lost_ms.as_mut() {
            *ms += tick_ms;
            if tape.chance(15) {
                self.lost_ms = None;
            }
            return;
        }
        if tape.chance(2) {
            self.lost_ms = Some(0);
            return;
        }
        let Some(d) = self.desired.clone() else {
            return;
        };
        // A late agent reports what it ran before; now and then one is stuck for a while.
        if tape.one_in(100) {
            self.stuck = 12;
        }
        self.stuck = self.stuck.saturating_sub(1);
        let applied = self.stuck == 0 && !tape.chance(20);
        let generation = if applied {
            d.generation
        } else {
            self.observed.as_ref().map_or(0, |o| o.generation)
        };
        if applied {
            for s in Slot::BOTH {
                let same = self.runs[s.index()]
                    .as_ref()
                    .is_some_and(|r| Some(&r.spec) == d.slot(s));
                if !same {
                    self.runs[s.index()] = d.slot(s).map(|spec| SlotRun {
                        spec: spec.clone(),
                        fate: Fate::draw(tape, bad_for(bad, spec)),
                        age: 0,
                        requests: 0,
                        errors: 0,
                        latency: [0; 3],
                    });
                }
            }
        }
        let weights = self
            .observed
            .as_ref()
            .filter(|_| !applied)
            .map_or([d.blue_weight, d.green_weight], |o| {
                [o.blue_weight, o.green_weight]
            });
        let status = |run: &mut Option<SlotRun>, weight: u32, tape: &mut Tape| {
            let run = run.as_mut()?;
            let (phase, error) = run.fate.phase(run.age);
            run.age += 1;
            if weight > 0 && phase == SlotPhase::Healthy {
                let n = u64::from(weight) * (1 + u64::from(tape.pick(3)));
                run.requests += n;
                run.errors += match run.fate {
                    Fate::Sickens { .. } => n / 4,
                    _ => u64::from(tape.chance(10)),
                };
                run.latency[usize::from(tape.pick(3))] += n;
            }
            Some(SlotStatus {
                release: run.spec.release.as_ref().map(|r| r.version.clone())?,
                phase: phase as i32,
                error: error.to_string(),
                fetch_ms: 100 + u64::from(run.age),
                unpack_ms: 20,
                start_ms: 300,
                metrics: Some(SlotMetrics {
                    requests: run.requests,
                    responses_5xx: run.errors,
                    latency_bucket_le_us: vec![5_000, 50_000, u64::MAX],
                    latency_counts: run.latency.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        let [bw, gw] = weights;
        let blue = status(&mut self.runs[0], bw, tape);
        let green = status(&mut self.runs[1], gw, tape);
        self.observed = Some(ObservedService {
            service: d.service.clone(),
            generation,
            blue_weight: if blue.is_some() { bw } else { 0 },
            green_weight: if green.is_some() { gw } else { 0 },
            blue,
            green,
            error: if tape.one_in(300) {
                "bind 0.0.0.0:8080: Address already in use".into()
            } else {
                String::new()
            },
            healing: if tape.one_in(400) {
                "new slot crashed".into()
            } else {
                String::new()
            },
        });
    }
}

/// The error a bad release fails with, if `spec` runs one.
fn bad_for(bad: &BTreeMap<String, usize>, spec: &SlotSpec) -> Option<usize> {
    let (version, _) = spec.release_key()?;
    bad.get(version).copied()
}

/// The fleet both cores decide on.
struct Fleet {
    hosts: BTreeMap<String, SimHost>,
    /// Releases that fail on many hosts with the same error, by version.
    bad: BTreeMap<String, usize>,
}

impl Fleet {
    fn new(n: usize) -> Fleet {
        Fleet {
            hosts: (0..n)
                .map(|i| (format!("h{i}"), SimHost::default()))
                .collect(),
            bad: BTreeMap::new(),
        }
    }

    fn views(&self, dep: &DeploymentRecord) -> BTreeMap<String, HostView<'_>> {
        dep.hosts
            .keys()
            .filter_map(|name| {
                let h = self.hosts.get(name)?;
                let view = HostView {
                    connected: h.lost_ms.is_none(),
                    lost_ms: h.lost_ms.unwrap_or(0),
                    desired: h.desired.as_ref(),
                    observed: h.observed.as_ref(),
                };
                Some((name.clone(), view))
            })
            .collect()
    }

    /// Writes targets as the engine does: each with the next generation.
    fn write(&mut self, targets: &BTreeMap<String, DesiredService>) {
        for (name, t) in targets {
            if let Some(h) = self.hosts.get_mut(name) {
                let mut t = t.clone();
                t.generation = h.desired.as_ref().map_or(0, |d| d.generation) + 1;
                h.desired = Some(t);
            }
        }
    }

    fn act(&mut self, tape: &mut Tape, tick_ms: u64) {
        for h in self.hosts.values_mut() {
            h.act(tape, tick_ms, &self.bad);
        }
    }
}

/// One deployment of a history, as drawn.
#[derive(Clone, Debug)]
struct PlanCase {
    /// (traffic, hold index, pause, hosts) per step; normalised into a valid ladder.
    steps: Vec<(u32, u8, bool, Option<u32>)>,
    bake: bool,
    /// 0: every host at once.
    max_parallel: u32,
    max_failed_hosts: u32,
    on_host_lost: u8,
    host_lost_after_s: u64,
    deadline_s: u64,
    /// (interval s, failure limit, min requests, judge latency too)
    analysis: Option<(u64, u32, u64, bool)>,
    /// 0..=5 a new release, 6 the live plan again, 7 the live release with another
    /// command, 8 `cutover rollback`.
    kind: u8,
    other_port: bool,
    /// The release fails with this error (of [`ERRORS`]) on about half the hosts.
    bad: Option<usize>,
}

fn plan_case() -> impl Strategy<Value = PlanCase> {
    (
        proptest::collection::vec(
            (
                1u32..=100,
                0u8..3,
                proptest::bool::weighted(0.15),
                proptest::option::of(1u32..4),
            ),
            1..4,
        ),
        any::<bool>(),
        0u32..3,
        0u32..3,
        0u8..3,
        prop_oneof![Just(1u64), Just(3)],
        prop_oneof![Just(3u64), Just(10), Just(60)],
        proptest::option::of((
            1u64..4,
            1u32..3,
            prop_oneof![Just(0u64), Just(20)],
            any::<bool>(),
        )),
        0u8..9,
        proptest::bool::weighted(0.2),
        proptest::option::weighted(0.2, 0usize..3),
    )
        .prop_map(
            |(
                steps,
                bake,
                max_parallel,
                max_failed_hosts,
                on_host_lost,
                lost,
                deadline,
                analysis,
                kind,
                other_port,
                bad,
            )| PlanCase {
                steps,
                bake,
                max_parallel,
                max_failed_hosts,
                on_host_lost,
                host_lost_after_s: lost,
                deadline_s: deadline,
                analysis,
                kind,
                other_port,
                bad,
            },
        )
}

const SHA: [&str; 10] = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "1111111111111111111111111111111111111111111111111111111111111111",
    "2222222222222222222222222222222222222222222222222222222222222222",
    "3333333333333333333333333333333333333333333333333333333333333333",
    "4444444444444444444444444444444444444444444444444444444444444444",
    "5555555555555555555555555555555555555555555555555555555555555555",
    "6666666666666666666666666666666666666666666666666666666666666666",
    "7777777777777777777777777777777777777777777777777777777777777777",
    "8888888888888888888888888888888888888888888888888888888888888888",
    "9999999999999999999999999999999999999999999999999999999999999999",
];

fn base_plan(version: usize) -> Plan {
    let text = format!(
        "service = \"web\"\n[release]\nversion = \"{version}\"\nartifact = \"file:///a.tar.gz\"\nsha256 = \"{}\"\n[run]\ncommand = [\"./web\"]\nlisten = 8080\n[health]\nhttp = \"/\"\n",
        SHA[version % SHA.len()]
    );
    Plan::parse(&text, "p.toml").expect("the base plan parses")
}

/// A valid ladder from the drawn steps: traffic never goes down and ends at 100, host
/// waves never shrink and the last step covers every host.
fn ladder(steps: &[(u32, u8, bool, Option<u32>)]) -> Vec<Step> {
    let mut traffic: Vec<u32> = steps.iter().map(|s| s.0).collect();
    traffic.sort_unstable();
    let mut hosts: Vec<u32> = steps.iter().filter_map(|s| s.3).collect();
    hosts.sort_unstable();
    let mut hosts = hosts.into_iter();
    let holds = [
        Duration::ZERO,
        Duration::from_secs(1),
        Duration::from_secs(4),
    ];
    let mut out: Vec<Step> = steps
        .iter()
        .zip(traffic)
        .map(|(s, traffic)| Step {
            traffic,
            hold: holds[usize::from(s.1)],
            pause: s.2,
            hosts: s.3.and_then(|_| hosts.next()).map(Count::Hosts),
        })
        .collect();
    // Steps with hosts first, then the ones that take every host.
    out.sort_by_key(|s| s.hosts.is_none());
    let mut fixed: Vec<Step> = Vec::new();
    let mut last_traffic = 1;
    for mut s in out {
        s.traffic = s.traffic.max(last_traffic);
        last_traffic = s.traffic;
        fixed.push(s);
    }
    if let Some(last) = fixed.last_mut() {
        last.traffic = 100;
        last.hosts = None;
    }
    fixed
}

fn analysis(a: Option<(u64, u32, u64, bool)>) -> Option<Analysis> {
    let (interval, failure_limit, min_requests, latency) = a?;
    let mut metric = vec![Metric {
        name: MetricName::ErrorRate,
        max: Some(0.05),
        min: None,
        max_vs_baseline: None,
        judge: None,
        confidence: None,
    }];
    if latency {
        metric.push(Metric {
            name: MetricName::LatencyP99,
            max: None,
            min: None,
            max_vs_baseline: Some(1.5),
            judge: None,
            confidence: None,
        });
    }
    Some(Analysis {
        interval: Duration::from_secs(interval),
        failure_limit,
        min_requests,
        metric,
    })
}

/// The service as the coordinator keeps it between deployments.
#[derive(Default)]
struct Service {
    live: Option<Plan>,
    previous: Option<Plan>,
}

impl Service {
    /// The plan a drawn deployment submits, and whether it is a `cutover rollback`.
    fn plan(&self, c: &PlanCase, n: usize) -> (Plan, bool) {
        if c.kind == 8
            && let Some(mut prev) = self.previous.clone()
        {
            prev.strategy.steps = vec![Step {
                traffic: 100,
                hold: Duration::ZERO,
                pause: false,
                hosts: None,
            }];
            prev.strategy.bake = Duration::ZERO;
            prev.strategy.max_parallel = Count::Percent(100);
            return (prev, true);
        }
        let mut p = match (&self.live, c.kind) {
            (Some(live), 6) => return (live.clone(), false),
            (Some(live), 7) => {
                let mut p = live.clone();
                p.run.command.push(format!("--workers={n}"));
                p
            }
            _ => base_plan(n),
        };
        let s = &mut p.strategy;
        s.steps = ladder(&c.steps);
        s.bake = if c.bake {
            Duration::from_secs(2)
        } else {
            Duration::ZERO
        };
        s.max_parallel = match c.max_parallel {
            0 => Count::Percent(100),
            n => Count::Hosts(n),
        };
        s.max_failed_hosts = c.max_failed_hosts;
        s.on_host_lost = match c.on_host_lost {
            0 => OnHostLost::Pause,
            1 => OnHostLost::Rollback,
            _ => OnHostLost::Continue,
        };
        s.host_lost_after = Duration::from_secs(c.host_lost_after_s);
        s.progress_deadline = Duration::from_secs(c.deadline_s);
        p.analysis = analysis(c.analysis);
        if c.other_port {
            p.run.listen = 9090;
        }
        (p, false)
    }

    fn ended(&mut self, d: &DeploymentRecord) {
        if d.state == crate::model::State::Succeeded
            && let Some(replaced) = self.live.replace(d.plan.clone())
        {
            self.previous = Some(replaced);
        }
    }
}

#[derive(Clone, Debug)]
struct History {
    hosts: usize,
    tick_ms: u64,
    deployments: Vec<PlanCase>,
    /// (deployment, tick, command)
    commands: Vec<(usize, usize, u8)>,
    tape: Vec<u8>,
}

fn history() -> impl Strategy<Value = History> {
    (
        1usize..5,
        prop_oneof![Just(100u64), Just(400), Just(1500)],
        proptest::collection::vec(plan_case(), 1..5),
        proptest::collection::vec((0usize..5, 0usize..80, 0u8..4), 0..6),
        proptest::collection::vec(any::<u8>(), 0..6000),
    )
        .prop_map(|(hosts, tick_ms, deployments, commands, tape)| History {
            hosts,
            tick_ms,
            deployments,
            commands,
            tape,
        })
}

fn command(c: u8) -> Command {
    match c {
        0 => Command::Pause,
        1 => Command::Resume,
        2 => Command::Promote,
        _ => Command::Abort,
    }
}

/// The reshaped core, as the engine drives it.
mod reshaped {
    use super::*;
    use crate::rollout::{Decision, Order, Submission, decide, submit};

    fn outcome(d: Decision) -> Outcome {
        Outcome {
            record: d.deployment,
            targets: d.targets,
            events: d.events,
        }
    }

    pub fn create(new: legacy::New<'_>, now: u64) -> Outcome {
        let s = Submission {
            id: new.id,
            plan: new.plan,
            plan_path: new.path,
            is_rollback: new.is_rollback,
            previous_release: new.previous_release,
            actor: new.actor,
        };
        outcome(submit(s, &new.desired, now))
    }

    pub fn step(
        dep: &DeploymentRecord,
        views: &BTreeMap<String, HostView<'_>>,
        command: Option<(Command, &str)>,
        now: u64,
    ) -> Outcome {
        let order = command.map(|(command, actor)| Order { command, actor });
        outcome(decide(dep, views, order, now))
    }
}

/// The record without the fields the reshaped core added for its own bookkeeping (the
/// preparation phase last recorded per host).
fn comparable(d: &DeploymentRecord) -> DeploymentRecord {
    let mut d = d.clone();
    for h in d.hosts.values_mut() {
        h.reported = None;
    }
    d
}

fn same(old: &Outcome, new: &Outcome, at: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        comparable(&old.record),
        comparable(&new.record),
        "records differ {}",
        at
    );
    prop_assert_eq!(&old.targets, &new.targets, "targets differ {}", at);
    prop_assert_eq!(&old.events, &new.events, "events differ {}", at);
    Ok(())
}

/// What the histories run so far went through: event kinds written and the states
/// deployments ended in, by name.
type Seen = BTreeMap<String, usize>;

/// Runs one history through both cores, counting into `seen` what it went through.
fn run(h: &History, seen: &mut Seen) -> Result<(), TestCaseError> {
    let mut fleet = Fleet::new(h.hosts);
    let mut tape = Tape {
        draws: h.tape.clone(),
        at: 0,
    };
    let mut service = Service::default();
    let mut now = 1_000_000;
    for (n, case) in h.deployments.iter().enumerate() {
        let (plan, is_rollback) = service.plan(case, n + 1);
        if let Some(error) = case.bad {
            fleet.bad.insert(plan.release.version.clone(), error);
        }
        let desired: BTreeMap<String, Option<DesiredService>> = fleet
            .hosts
            .iter()
            .filter(|(_, host)| host.lost_ms.is_none())
            .map(|(name, host)| (name.clone(), host.desired.clone()))
            .collect();
        if desired.is_empty() {
            fleet.act(&mut tape, h.tick_ms);
            continue;
        }
        let new = || legacy::New {
            id: format!("d-{}", n + 1),
            plan: plan.clone(),
            path: "p.toml".into(),
            is_rollback,
            actor: ACTOR,
            previous_release: service.live.as_ref().map(|p| p.release.version.clone()),
            desired: desired.clone(),
        };
        let old = legacy::create(new(), now);
        let created = reshaped::create(new(), now);
        same(&old, &created, &format!("creating d-{}", n + 1))?;
        for e in &created.events {
            *seen.entry(kind_name(e)).or_default() += 1;
        }
        let mut dep = created.record;
        let mut seen_old = HashMap::new();
        for tick in 0..200 {
            if dep.state.is_final() {
                break;
            }
            let mut cmd = h
                .commands
                .iter()
                .find(|(d, t, _)| *d == n && *t == tick)
                .map(|(_, _, c)| (command(*c), ACTOR));
            // Whatever still runs late in a history is aborted, so that it ends.
            if tick == 150 {
                cmd = Some((Command::Abort, ACTOR));
            }
            let views = fleet.views(&dep);
            let old = legacy::step(&dep, &views, cmd, &mut seen_old, now);
            let new = reshaped::step(&dep, &views, cmd, now);
            drop(views);
            same(
                &old,
                &new,
                &format!("at d-{} tick {tick} ({now} ms)", n + 1),
            )?;
            for e in &new.events {
                *seen.entry(kind_name(e)).or_default() += 1;
            }
            dep = new.record;
            fleet.write(&new.targets);
            fleet.act(&mut tape, h.tick_ms);
            now += h.tick_ms;
        }
        *seen
            .entry(format!("ended {}", dep.state.as_str()))
            .or_default() += 1;
        for why in REASONS {
            if dep.reason.as_deref().is_some_and(|r| r.contains(why)) {
                *seen.entry(why.to_string()).or_default() += 1;
            }
        }
        service.ended(&dep);
        // Sometimes keep_previous passes before the next deployment.
        if dep.state == crate::model::State::Succeeded && tape.chance(50) {
            retire(&mut fleet)?;
            *seen.entry("retired".into()).or_default() += 1;
        }
    }
    Ok(())
}

/// Retires the previous release as the old engine did and as rollout does now, checks
/// that they agree, and writes it.
fn retire(fleet: &mut Fleet) -> Result<(), TestCaseError> {
    let desired: BTreeMap<String, DesiredService> = fleet
        .hosts
        .iter()
        .filter_map(|(name, h)| Some((name.clone(), h.desired.clone()?)))
        .collect();
    let old: BTreeMap<String, DesiredService> = desired
        .iter()
        .filter_map(|(name, d)| Some((name.clone(), legacy::retire(d)?)))
        .collect();
    let svc = crate::model::ServiceRecord {
        name: "web".into(),
        retire_previous_at_unix_ms: Some(0),
        ..Default::default()
    };
    let new = crate::rollout::retire(&svc, &desired, 0).map(|r| r.targets);
    prop_assert_eq!(Some(&old), new.as_ref(), "retiring differs");
    fleet.write(&old);
    Ok(())
}

/// Reasons for a rollback or pause a history should reach.
const REASONS: [&str; 9] = [
    "aborted by operator",
    "a release fault",
    "while serving",
    "the agent moved its traffic back",
    "unreachable for more than",
    "passed while preparing",
    "passed while switching",
    "no conclusive analysis interval",
    "analysis failed",
];

fn kind_name(e: &crate::timeline::Event) -> String {
    serde_json::to_value(e)
        .ok()
        .and_then(|v| v.get("event").and_then(|k| k.as_str()).map(String::from))
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_reshaped_core_writes_what_the_old_one_wrote(h in history()) {
        run(&h, &mut Seen::new())?;
    }
}

/// The histories are worth comparing: across a few hundred of them, every kind of event
/// is written and deployments end every way they can.
#[test]
fn the_histories_reach_every_event_and_every_end() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config::default());
    let mut seen = Seen::new();
    for _ in 0..300 {
        let h = history().new_tree(&mut runner).unwrap().current();
        run(&h, &mut seen).unwrap();
    }
    for what in [
        "submitted",
        "host_phase",
        "host_ready",
        "host_failed",
        "host_lost",
        "step_started",
        "step_holding",
        "interval",
        "paused",
        "command",
        "rollback_started",
        "rollback_done",
        "ended",
        "ended succeeded",
        "ended rolled_back",
        "ended failed",
        "ended aborted",
        "retired",
    ]
    .into_iter()
    .chain(REASONS)
    {
        assert!(
            seen.contains_key(what),
            "no history reached {what}: {seen:?}"
        );
    }
}
