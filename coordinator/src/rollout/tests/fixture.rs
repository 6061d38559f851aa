//! What the rollout tests decide on: plans, a simulated fleet whose agents apply desired
//! state perfectly (or fail a release on a host, or go unreachable), and a bare
//! deployment for the tests of one transition.

use std::collections::BTreeMap;

use cutover_proto::v1::{
    DatabaseTaskState, DatabaseTaskStatus, DesiredService, ObservedService, SlotPhase, SlotSpec,
    SlotStatus,
};
use cutover_shared::plan::Plan;

use crate::model::DeploymentRecord;
use crate::rollout::machine::Machine;
use crate::rollout::{Command, HostView, Order, Submission, decide, submit};
use crate::timeline::{Event, Kind};

pub const SHA1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
pub const SHA2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

pub fn plan(version: &str, sha: &str, steps: &str) -> Plan {
    let text = format!(
        "service = \"web\"\n[release]\nversion = \"{version}\"\nartifact = \"file:///a.tar.gz\"\nsha256 = \"{sha}\"\n[run]\ncommand = [\"./web\"]\nlisten = 8080\n[health]\nhttp = \"/\"\n[strategy]\nmax_parallel = 1\n{steps}\n"
    );
    Plan::parse(&text, "p.toml").unwrap()
}

/// A simulated fleet: desired state per host, and agents that apply it perfectly.
pub struct Sim {
    pub desired: BTreeMap<String, DesiredService>,
    pub observed: BTreeMap<String, ObservedService>,
    /// Releases that fail on this host: version -> error.
    pub failing: BTreeMap<(String, String), String>,
    /// Hosts unreachable, and for how long (ms).
    pub lost: BTreeMap<String, u64>,
    /// Database tasks each host's agent knows, with their status.
    pub tasks: BTreeMap<String, Vec<DatabaseTaskStatus>>,
    /// How the agents end database tasks of a phase (`expand`...): succeed unless named.
    pub db: BTreeMap<String, TaskEnding>,
    /// How often each database task id was started, on any host.
    pub runs: BTreeMap<String, u32>,
}

/// How a simulated agent ends a database task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskEnding {
    /// Exit 0.
    Succeed,
    /// Exit with this code.
    Fail(i32),
    /// It keeps running.
    Hang,
}

impl Sim {
    pub fn new(hosts: &[&str]) -> Sim {
        Sim {
            desired: BTreeMap::new(),
            observed: hosts
                .iter()
                .map(|h| (h.to_string(), ObservedService::default()))
                .collect(),
            failing: BTreeMap::new(),
            lost: BTreeMap::new(),
            tasks: BTreeMap::new(),
            db: BTreeMap::new(),
            runs: BTreeMap::new(),
        }
    }

    pub fn views(&self) -> BTreeMap<String, HostView<'_>> {
        self.observed
            .keys()
            .map(|h| {
                (
                    h.clone(),
                    HostView {
                        connected: !self.lost.contains_key(h),
                        lost_ms: self.lost.get(h).copied().unwrap_or(0),
                        desired: self.desired.get(h),
                        observed: self.observed.get(h),
                    },
                )
            })
            .collect()
    }

    /// Writes targets (bumping generations) like the engine does.
    pub fn apply(&mut self, targets: BTreeMap<String, DesiredService>) {
        for (h, mut t) in targets {
            t.generation = self.desired.get(&h).map_or(0, |d| d.generation) + 1;
            self.desired.insert(h, t);
        }
    }

    /// Agents converge: every slot's release runs healthy (or fails), weights applied,
    /// a database task they do not know yet runs. Unreachable hosts report nothing.
    pub fn converge(&mut self) {
        self.run_tasks();
        for (h, d) in &self.desired {
            if self.lost.contains_key(h) {
                continue;
            }
            let status = |spec: &Option<SlotSpec>| {
                spec.as_ref().map(|s| {
                    let v = s.release.as_ref().unwrap().version.clone();
                    match self.failing.get(&(h.clone(), v.clone())) {
                        Some(e) => SlotStatus {
                            release: v,
                            phase: SlotPhase::Failed as i32,
                            error: e.clone(),
                            ..Default::default()
                        },
                        None => SlotStatus {
                            release: v,
                            phase: SlotPhase::Healthy as i32,
                            ..Default::default()
                        },
                    }
                })
            };
            let o = ObservedService {
                service: d.service.clone(),
                generation: d.generation,
                blue: status(&d.blue),
                green: status(&d.green),
                blue_weight: if d.blue.is_some() { d.blue_weight } else { 0 },
                green_weight: if d.green.is_some() { d.green_weight } else { 0 },
                error: String::new(),
                healing: String::new(),
                database_tasks: self.tasks.get(h).cloned().unwrap_or_default(),
                ..Default::default()
            };
            self.observed.insert(h.clone(), o);
        }
    }

    /// Each reachable agent starts the database task its desired state names, unless it
    /// knows it already, and ends it as [`Sim::db`] says.
    fn run_tasks(&mut self) {
        for (h, d) in &self.desired {
            let Some(t) = &d.database_task else { continue };
            let known = self.tasks.entry(h.clone()).or_default();
            if self.lost.contains_key(h) || known.iter().any(|k| k.id == t.id) {
                continue;
            }
            *self.runs.entry(t.id.clone()).or_default() += 1;
            let ending = self
                .db
                .get(&t.phase)
                .copied()
                .unwrap_or(TaskEnding::Succeed);
            let (state, exit_code, exit) = match ending {
                TaskEnding::Succeed => (
                    DatabaseTaskState::Succeeded,
                    Some(0),
                    "exit status: 0".to_string(),
                ),
                TaskEnding::Fail(c) => (
                    DatabaseTaskState::Failed,
                    Some(c),
                    format!("exit status: {c}"),
                ),
                TaskEnding::Hang => (DatabaseTaskState::Running, None, String::new()),
            };
            known.insert(
                0,
                DatabaseTaskStatus {
                    id: t.id.clone(),
                    state: state as i32,
                    exit_code,
                    exit,
                    tail: vec![format!("{} on {h}", t.phase)],
                    started_unix_ms: 1,
                    duration_ms: 250,
                    log: format!(
                        "/data/{h}/logs/deployments/{}/{}.log",
                        t.deployment, t.phase
                    ),
                },
            );
        }
    }

    /// A new deployment of `p` over every host, as the engine creates it.
    pub fn start(&self, p: &Plan) -> DeploymentRecord {
        let hosts = self
            .observed
            .keys()
            .map(|h| (h.clone(), self.desired.get(h).cloned()))
            .collect();
        let s = Submission {
            id: "d-1".into(),
            plan: p.clone(),
            plan_path: "p.toml".into(),
            is_rollback: false,
            restart: false,
            previous_release: None,
            actor: "ops@desk",
            database: Default::default(),
        };
        submit(s, &hosts, 0).deployment
    }

    /// Runs decide/apply/converge until the deployment ends or `max` rounds pass.
    pub fn run(
        &mut self,
        mut dep: DeploymentRecord,
        mut now: u64,
        step_ms: u64,
        max: usize,
    ) -> (DeploymentRecord, u64) {
        for _ in 0..max {
            let d = decide(&dep, &self.views(), None, now);
            dep = d.deployment;
            self.apply(d.targets);
            self.converge();
            if dep.state.is_final() {
                break;
            }
            now += step_ms;
        }
        (dep, now)
    }

    pub fn live(&self, h: &str) -> Option<String> {
        let d = self.desired.get(h)?;
        let s = d.live_slot()?;
        d.slot(s)
            .and_then(SlotSpec::release_key)
            .map(|(v, _)| v.to_string())
    }
}

/// Decides, applies and converges until `done` holds (at most 100 simulated seconds).
pub fn run_until(
    sim: &mut Sim,
    mut dep: DeploymentRecord,
    mut now: u64,
    done: impl Fn(&DeploymentRecord) -> bool,
) -> (DeploymentRecord, u64) {
    let limit = now + 100_000;
    while !done(&dep) {
        let d = decide(&dep, &sim.views(), None, now);
        dep = d.deployment;
        sim.apply(d.targets);
        sim.converge();
        now += 100;
        assert!(now < limit, "condition not reached: {dep:?}");
    }
    (dep, now)
}

/// v1 live on the fleet, then v2 with `steps` submitted; returns it and the time.
pub fn v2_over_v1(sim: &mut Sim, steps: &str) -> (DeploymentRecord, u64) {
    let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    (sim.start(&plan("2", SHA2, steps)), now)
}

/// v1 live on the fleet, then v2 holding at 10 % on every host.
pub fn holding_v2(sim: &mut Sim) -> (DeploymentRecord, u64) {
    let steps = "steps = [{ traffic = 10, hold = \"10s\" }, { traffic = 100 }]";
    let (dep, now) = v2_over_v1(sim, steps);
    run_until(sim, dep, now, |d| d.step_switched_unix_ms.is_some())
}

/// A deployment of v2 over v1 on hosts `a` and `b` (both running v1 in blue), with two
/// steps, for the tests of one transition.
pub fn deployment() -> DeploymentRecord {
    let mut sim = Sim::new(&["a", "b"]);
    let (_, _) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    sim.start(&plan(
        "2",
        SHA2,
        "steps = [{ traffic = 10, hold = \"5s\" }, { traffic = 100 }]",
    ))
}

/// Runs `run` on a machine over `d` at `now` whose hosts are reachable and report
/// nothing; returns the record it came to.
pub fn on_record<R>(
    d: DeploymentRecord,
    now: u64,
    run: impl FnOnce(&mut Machine<'_, '_>) -> R,
) -> DeploymentRecord {
    let views = views(&d);
    let mut m = Machine::new(d, &views, now);
    run(&mut m);
    m.finish().0
}

/// Every host of `d` reachable, with nothing written or reported.
pub fn views(d: &DeploymentRecord) -> BTreeMap<String, HostView<'static>> {
    d.hosts
        .keys()
        .map(|h| {
            let view = HostView {
                connected: true,
                ..HostView::default()
            };
            (h.clone(), view)
        })
        .collect()
}

/// The operator's `command`, as a test gives it.
pub fn ops(command: Command) -> Order<'static> {
    Order {
        command,
        actor: "ops@desk",
    }
}

/// The operator's `command` for a decision.
pub fn order(command: Command) -> Option<Order<'static>> {
    Some(ops(command))
}

impl Sim {
    /// Sets the report of `host`'s agent: it runs what it was sent, and the new slot of
    /// `d` on it is in `phase` (with `error`).
    pub fn report(&mut self, d: &DeploymentRecord, host: &str, phase: SlotPhase, error: &str) {
        self.converge();
        let slot = d.hosts[host].new_slot;
        let o = self.observed.get_mut(host).expect("a host of the fleet");
        let status = SlotStatus {
            release: d.release.clone(),
            phase: phase as i32,
            error: error.into(),
            fetch_ms: 1200,
            unpack_ms: 80,
            start_ms: 900,
            ..Default::default()
        };
        match slot {
            crate::model::Slot::Blue => o.blue = Some(status),
            crate::model::Slot::Green => o.green = Some(status),
        }
    }

    /// Decides once at `now`, writes and converges; returns the decision's record and
    /// events.
    pub fn step(&mut self, d: &DeploymentRecord, now: u64) -> (DeploymentRecord, Vec<Event>) {
        let out = decide(d, &self.views(), None, now);
        self.apply(out.targets);
        self.converge();
        (out.deployment, out.events)
    }
}

/// Runs one phase of the machine over `d` at `now`, as `sim` reports; returns the
/// record it came to and the events it made (what the phase returns is dropped).
pub fn phase<R>(
    sim: &Sim,
    d: &DeploymentRecord,
    now: u64,
    run: impl FnOnce(&mut Machine<'_, '_>) -> R,
) -> (DeploymentRecord, Vec<Event>) {
    let views = sim.views();
    let mut m = Machine::new(d.clone(), &views, now);
    run(&mut m);
    m.finish()
}

/// The kinds of `events`, for comparing.
pub fn kinds(events: &[Event]) -> Vec<Kind> {
    events.iter().map(|e| e.kind.clone()).collect()
}
