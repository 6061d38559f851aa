//! `cutover-measure database [deployments]`: the figures of database changes that ride
//! the rollout, from real deployments against a real PostgreSQL — the time `[database]`
//! adds before the first new slot starts (a trivial expand), the time from a rollback
//! decision to the abort starting, and how often each database command ran over many
//! deployments with the coordinator and agents restarted hard in between and mid-command.
//! Every migration script writes a row to a ledger table as it starts: the run counts
//! come from the database itself.

use std::collections::BTreeMap;
use std::time::Duration;

use tests::{Cluster, PlanBuilder, Postgres, Value, wait_until};

const LEDGER: &str = "create table cutover_ledger (deployment text not null, phase text not null, at timestamptz not null default now())";

/// A migration: its ledger row, then `rest`.
fn script(rest: &str) -> String {
    format!(
        "\\getenv deployment CUTOVER_DEPLOYMENT\n\\getenv phase CUTOVER_DB_PHASE\ninsert into cutover_ledger (deployment, phase) values (:'deployment', :'phase');\n{rest}"
    )
}

const DATABASE: &str = r#"schema = "app_${RELEASE}"
expand = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "db/expand.sql"]
contract = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "db/contract.sql"]
abort = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "db/abort.sql"]"#;

/// The sample at `version`, with a `[database]` whose expand also runs `expand`.
fn with_database(c: &Cluster, pg: &Postgres, version: &str, expand: &str) -> PlanBuilder {
    let mut b = c
        .plan(version)
        .database(DATABASE)
        .file("db/expand.sql", &script(expand))
        .file("db/contract.sql", &script(""))
        .file("db/abort.sql", &script(""));
    for (k, v) in pg.env() {
        b = b.env(&k, &v);
    }
    b
}

fn show(c: &Cluster, id: &str) -> Value {
    serde_json::from_str(&c.cli_ok(&["show", id, "--output", "json"])).expect("show json")
}

/// When (ms after submission) the first event of `id`'s timeline that `pred` picks
/// happened.
fn offset_ms(c: &Cluster, id: &str, pred: impl Fn(&Value) -> bool) -> Option<f64> {
    show(c, id)["timeline"]
        .as_array()?
        .iter()
        .find(|e| pred(e))
        .and_then(|e| e["offset_s"].as_f64())
        .map(|s| s * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(deployments: usize) {
    let pg = Postgres::start();
    pg.sql(LEDGER);
    let mut c = Cluster::start(90, 3);
    let v1 = with_database(&c, &pg, "1.0.0", "")
        .keep_previous("0s")
        .write("v1");
    let (code, _, err) = c.deploy_wait(&v1);
    assert_eq!(code, 0, "{err}");
    overhead(&c, &pg);
    println!();
    abort_delay(&c, &pg);
    println!();
    exactly_once(&mut c, &pg, deployments);
}

/// Deploy to the first new slot starting and to every host ready, without and with a
/// trivial expand, and where the difference goes.
fn overhead(c: &Cluster, pg: &Postgres) {
    println!(
        "deploy to the first new slot starting, and to every host ready (3 hosts, each release fetched and unpacked, median of 9):"
    );
    let starting = |e: &Value| e["event"] == "host_phase" && e["phase"] == "starting";
    let stepped = |e: &Value| e["event"] == "step_started";
    let mut rows: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for i in 0..9 {
        let plain = c
            .plan(&format!("1.1.{i}"))
            .keep_previous("0s")
            .write(&format!("plain{i}"));
        let (code, id, err) = c.deploy_wait(&plain);
        assert_eq!(code, 0, "{err}");
        rows.entry("a: no [database], first slot starting")
            .or_default()
            .extend(offset_ms(c, &id, starting));
        rows.entry("b: no [database], every host ready")
            .or_default()
            .extend(offset_ms(c, &id, stepped));
        let db = with_database(c, pg, &format!("1.2.{i}"), "select 1;")
            .keep_previous("0s")
            .write(&format!("db{i}"));
        let (code, id, err) = c.deploy_wait(&db);
        assert_eq!(code, 0, "{err}");
        rows.entry("c: trivial expand, first slot starting")
            .or_default()
            .extend(offset_ms(c, &id, starting));
        rows.entry("d: trivial expand, every host ready")
            .or_default()
            .extend(offset_ms(c, &id, stepped));
        let sent = offset_ms(c, &id, |e| e["event"] == "database_started");
        let ended = offset_ms(c, &id, |e| e["event"] == "database_ended");
        if let (Some(sent), Some(ended)) = (sent, ended) {
            rows.entry("e: expand sent after").or_default().push(sent);
            rows.entry("f: expand sent to its end recorded (fetch, unpack, psql, report)")
                .or_default()
                .push(ended - sent);
        }
        let psql = show(c, &id)["database"]["expand"]["duration_s"].as_f64();
        rows.entry("g: psql itself, as the agent measured")
            .or_default()
            .extend(psql.map(|s| s * 1000.0));
    }
    let med: BTreeMap<&str, f64> = rows.into_iter().map(|(k, v)| (k, median(v))).collect();
    for (k, v) in &med {
        println!("  {k:<70} {v:>6.0} ms");
    }
    let get = |k: &str| {
        med.iter()
            .find(|(n, _)| n.starts_with(k))
            .map_or(f64::NAN, |(_, v)| *v)
    };
    println!(
        "  the database phase adds {:.0} ms to every host ready (d - b); the first slot starts {:.0} ms later or earlier (c - a: the runner already has the release unpacked)",
        get("d") - get("b"),
        get("c") - get("a")
    );
}

/// From the rollback decision to the abort starting, for aborts at 30 %.
fn abort_delay(c: &Cluster, pg: &Postgres) {
    println!("rollback decided to database abort started (`cutover abort` at 30%, 3 hosts):");
    let mut delays = Vec::new();
    for i in 0..5 {
        let plan = with_database(c, pg, &format!("1.3.{i}"), "")
            .steps(r#"[{ traffic = 30, hold = "1h" }, { traffic = 100 }]"#)
            .write(&format!("aborted{i}"));
        let id = c.deploy_until_holding(&plan);
        c.cli_ok(&["abort", &id]);
        wait_until(Duration::from_secs(30), "the abort run", || {
            c.status(&id)["database"]["phase"] == "aborted"
        });
        let decided = offset_ms(c, &id, |e| e["event"] == "rollback_started");
        let confirmed = offset_ms(c, &id, |e| e["event"] == "rollback_done");
        let abort = offset_ms(c, &id, |e| {
            e["event"] == "database_started" && e["phase"] == "abort"
        });
        let (Some(decided), Some(confirmed), Some(abort)) = (decided, confirmed, abort) else {
            panic!("{id}: timeline without a rollback and an abort");
        };
        println!(
            "  run {i}: every host back on the old slot after {:.0} ms, abort started after {:.0} ms",
            confirmed - decided,
            abort - decided
        );
        delays.push(abort - decided);
    }
    println!(
        "  median: {:.0} ms from the decision to the abort starting",
        median(delays)
    );
}

/// What is injected into deployment `i` of the exactly-once run.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The coordinator killed (-9) while the expand runs, then started again.
    CoordinatorMidExpand,
    /// The runner's agent killed (-9) and started again after the expand, while hosts
    /// prepare.
    AgentAfterExpand,
    /// The runner's agent killed (-9) while the expand runs, then started again: the
    /// deployment pauses (interrupted); it is aborted, so the abort runs.
    AgentMidExpand,
    /// The coordinator killed (-9) while the previous release's contract runs (the
    /// next deployment waits for it), then started again.
    CoordinatorMidContract,
}

/// `deployments` deployments with a restart injected into each: how often each
/// database command ran, per deployment.
fn exactly_once(c: &mut Cluster, pg: &Postgres, deployments: usize) {
    println!(
        "exactly once: {deployments} deployments with [database], a hard restart injected into each:"
    );
    let faults = [
        Fault::CoordinatorMidExpand,
        Fault::AgentAfterExpand,
        Fault::CoordinatorMidContract,
        Fault::AgentMidExpand,
    ];
    let mut injected: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids = Vec::new();
    // The last deployment that succeeded: its contract runs when the next one starts.
    let mut pending: Option<String> = None;
    for i in 0..deployments {
        let fault = faults[i % faults.len()];
        // A slow expand and contract, so a restart lands while they run; the old slot
        // is kept, so each contract runs when the next deployment needs the slot.
        // Agents back-off growing over restarts seconds apart may keep a host away for
        // up to a minute: not lost before that.
        let plan = with_database(c, pg, &format!("2.0.{i}"), "select pg_sleep(1.5);")
            .file("db/contract.sql", &script("select pg_sleep(1.5);"))
            .keep_previous("1h")
            .host_lost_after("2m")
            .write(&format!("once{i}"));
        let id = c.deploy(&plan);
        ids.push(id.clone());
        *injected.entry(format!("{fault:?}")).or_default() += 1;
        // The previous change is contracted before this deployment prepares.
        let contracting = pending.take();
        inject(c, pg, fault, &id, contracting.as_deref());
        wait_until(Duration::from_secs(120), "the deployment's end", || {
            let s = c.status(&id);
            s["state"]
                .as_str()
                .is_some_and(|st| ["succeeded", "rolled_back", "aborted", "failed"].contains(&st))
        });
        if c.status(&id)["state"] == "succeeded" {
            pending = Some(id.clone());
        }
    }
    // The last change is contracted too.
    if pending.is_some() {
        c.cli_ok(&["contract", "web", "--wait"]);
    }
    let these: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
    let counts = pg.sql(&format!(
        "select phase, count(*), max(n), sum(case when n > 1 then 1 else 0 end) from (select deployment, phase, count(*) as n from cutover_ledger where deployment in ({}) group by deployment, phase) p group by phase order by phase",
        these.join(", ")
    ));
    println!("  faults injected: {injected:?}");
    println!(
        "  ledger, per phase, over these deployments: deployments that ran it | most runs in one deployment | deployments that ran it more than once"
    );
    for line in counts.lines() {
        let f: Vec<&str> = line.split('|').collect();
        if let [phase, n, most, twice] = f[..] {
            println!("    {phase:<9} {n:>3} | {most} | {twice}");
        }
    }
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let state = c.status(id)["state"].as_str().unwrap_or("?").to_string();
        *tally.entry(state).or_default() += 1;
    }
    println!("  deployments ended: {tally:?}");
}

/// Injects `fault` into deployment `id`; `pending` is the deployment whose contract
/// runs before `id` prepares, if any.
fn inject(c: &mut Cluster, pg: &Postgres, fault: Fault, id: &str, pending: Option<&str>) {
    let phase = |c: &Cluster| c.status(id)["database"]["phase"].clone();
    match fault {
        Fault::CoordinatorMidContract => {
            if let Some(p) = pending {
                wait_until(Duration::from_secs(30), "the contract running", || {
                    ran(pg, p, "contract") == 1
                });
            }
            restart_coordinator(c);
        }
        Fault::CoordinatorMidExpand => {
            wait_until(Duration::from_secs(30), "the expand running", || {
                ran(pg, id, "expand") == 1
            });
            restart_coordinator(c);
        }
        Fault::AgentAfterExpand => {
            wait_until(Duration::from_secs(30), "the expand done", || {
                phase(c) == "expanded"
            });
            restart_agent(c, &runner(c, id));
        }
        Fault::AgentMidExpand => {
            wait_until(Duration::from_secs(30), "the expand running", || {
                ran(pg, id, "expand") == 1
            });
            restart_agent(c, &runner(c, id));
            wait_until(Duration::from_secs(30), "the deployment paused", || {
                c.status(id)["state"] == "paused"
            });
            println!(
                "  {id}: {}",
                c.status(id)["reason"].as_str().unwrap_or_default()
            );
            c.cli_ok(&["abort", id]);
        }
    }
}

/// How often `phase` of deployment `id` ran, from the ledger.
fn ran(pg: &Postgres, id: &str, phase: &str) -> usize {
    pg.sql(&format!(
        "select count(*) from cutover_ledger where deployment = '{id}' and phase = '{phase}'"
    ))
    .parse()
    .unwrap_or(0)
}

/// The host running `id`'s expand.
fn runner(c: &Cluster, id: &str) -> String {
    c.status(id)["database"]["expand"]["host"]
        .as_str()
        .unwrap_or("web-1")
        .to_string()
}

fn restart_coordinator(c: &mut Cluster) {
    if let Some(mut coord) = c.coordinator.take() {
        coord.kill();
    }
    c.start_coordinator();
    let names: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
    for name in names {
        wait_until(Duration::from_secs(120), "the agents back", || {
            c.connected(&name)
        });
    }
}

fn restart_agent(c: &mut Cluster, name: &str) {
    let Some(i) = c.agents.iter().position(|a| a.name == name) else {
        return;
    };
    c.agents[i].proc.kill();
    let (ip, data) = (c.agents[i].ip.clone(), c.agents[i].data_dir.clone());
    c.agents[i].proc = c.spawn_agent(name, &ip, &data);
    wait_until(Duration::from_secs(30), "the agent back", || {
        c.connected(name)
    });
}
